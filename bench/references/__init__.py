"""Reference servers the benchmark builds and runs beside the project's, in the same run."""
