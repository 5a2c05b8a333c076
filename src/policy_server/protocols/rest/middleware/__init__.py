"""ASGI middlewares of the REST app, one per file, named by what it does."""
