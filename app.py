"""`uvicorn app:app` serves saved_model.zip and schema.yaml from the working folder or BASE_PATH.

A policy already in place is loaded at import, so that one that cannot be served stops
`uvicorn app:app` at once (exit code 2). While the folder holds no schema.yaml yet (the
original's test suite imports this module before copying the policy in), the app is built
at its first start or request.
"""

from fastapi import FastAPI

from policy_server.hosting.app import build_app
from policy_server.hosting.lazy_app import LazyApp
from policy_server.loading.layout import SCHEMA_NAME
from policy_server.logs import configure_logging
from policy_server.settings import Settings


def _build() -> FastAPI:
    settings = Settings()
    configure_logging(settings.log_level)
    return build_app(settings)


app = LazyApp(_build)

_folder = Settings().policy_path
if not _folder.is_dir() or (_folder / SCHEMA_NAME).is_file():
    app.load_or_exit()
