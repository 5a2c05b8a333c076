"""Reference (a): the original Pathmind request path without Ray.

FastAPI validates a pydantic Observation built from schema.yaml, then every request makes one
TensorFlow `serving_default` call with freshly built inputs, and answers the graph's own
sampled action and probability, as the original's predict handler did.

    python bench/references/original.py POLICY_FOLDER PORT
"""

import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import uvicorn
import yaml
from fastapi import FastAPI
from pydantic import create_model

TYPES: dict[str, Any] = {"int": int, "float": float, "bool": bool}


def build(folder: Path, extract_to: Path) -> FastAPI:
    schema = yaml.safe_load((folder / "schema.yaml").read_text())
    with zipfile.ZipFile(folder / "saved_model.zip") as archive:
        archive.extractall(extract_to)
    model = tf.saved_model.load(str(extract_to))
    signature = model.signatures["serving_default"]
    _, specs = signature.structured_input_signature
    names = list(schema["observations"])
    fields: dict[str, Any] = {n: (TYPES[s["type"]], ...) for n, s in schema["observations"].items()}
    observation_model = create_model("Observation", **fields)
    app = FastAPI()

    @app.post("/predict")
    def predict(payload: observation_model) -> dict[str, Any]:  # type: ignore[valid-type]
        obs = np.array([[float(getattr(payload, n)) for n in names]], dtype=np.float32)
        inputs = {}
        for key, spec in specs.items():
            shape = [1 if d is None else d for d in spec.shape.as_list()]
            if key == "observations":
                inputs[key] = tf.constant(obs)
            elif key == "seq_lens":
                inputs[key] = tf.ones(shape, spec.dtype)
            else:
                inputs[key] = tf.zeros(shape, spec.dtype)
        result = signature(**inputs)
        actions = [int(result[k].numpy()[0]) for k in sorted(result) if k.startswith("actions")]
        return {"actions": actions, "probability": float(result["action_prob"].numpy()[0])}

    return app


if __name__ == "__main__":
    folder, port = Path(sys.argv[1]), int(sys.argv[2])
    app = build(folder, Path(sys.argv[3]) if len(sys.argv) > 3 else Path(f"/tmp/original-{port}"))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
