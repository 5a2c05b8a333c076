"""`uvicorn app:app` serves saved_model.zip and schema.yaml from the working folder or BASE_PATH."""

from policy_server.server import app_from_environment

app = app_from_environment()
