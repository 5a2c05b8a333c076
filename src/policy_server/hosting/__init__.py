"""Hosting: building the app, one process or a supervisor of workers, the CLI."""
