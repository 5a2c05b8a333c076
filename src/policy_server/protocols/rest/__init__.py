"""The HTTP layer: FastAPI routes over the policy service."""
