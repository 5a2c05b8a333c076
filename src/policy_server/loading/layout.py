"""The files of a policy folder, named once: what a user hands over and what is derived."""

from policy_server.runtime.saved_model import SAVED_MODEL_FILES

SCHEMA_NAME = "schema.yaml"
ARCHIVE_NAME = "saved_model.zip"
ONNX_NAME = "model.onnx"
# Where the original's `generate.py unzip` extracts the archive, inside the policy folder.
UNZIPPED_FOLDER = "models"
# Any of these marks a folder as holding a model.
MODEL_FILES = (
    ARCHIVE_NAME,
    ONNX_NAME,
    SAVED_MODEL_FILES[0],
    f"{UNZIPPED_FOLDER}/{SAVED_MODEL_FILES[0]}",
)
# What a first-time user is told a policy folder needs, wherever one is found lacking.
EXPECTED = (
    f"a policy folder holds {SCHEMA_NAME} beside {ARCHIVE_NAME} (or {ONNX_NAME}, or an "
    f"unzipped SavedModel: {SAVED_MODEL_FILES[0]})"
)
