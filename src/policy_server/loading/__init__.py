"""Loading: policy folders and repositories on disk, archives, and the original's file commands."""
