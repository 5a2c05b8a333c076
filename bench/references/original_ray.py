"""Reference (c): the original Pathmind design with Ray.

FastAPI validates the Observation, then awaits a Ray Serve deployment handle whose replica
makes one TensorFlow `serving_default` call per request (no batching), as the original's
app.py did through its Ray Serve handle.

    python bench/references/original_ray.py POLICY_FOLDER PORT
"""

import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import ray
import uvicorn
import yaml
from fastapi import FastAPI
from pydantic import create_model
from ray import serve

TYPES: dict[str, Any] = {"int": int, "float": float, "bool": bool}


@serve.deployment(ray_actor_options={"num_cpus": 1})
class TensorFlowPolicy:
    def __init__(self, archive: str) -> None:
        import tensorflow as tf

        self.tf = tf
        folder = tempfile.mkdtemp()
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(folder)
        self.signature = tf.saved_model.load(folder).signatures["serving_default"]
        _, self.specs = self.signature.structured_input_signature

    def __call__(self, values: list[float]) -> dict[str, Any]:
        tf = self.tf
        inputs = {}
        for key, spec in self.specs.items():
            shape = [1 if d is None else d for d in spec.shape.as_list()]
            if key == "observations":
                inputs[key] = tf.constant([values], tf.float32)
            elif key == "seq_lens":
                inputs[key] = tf.ones(shape, spec.dtype)
            else:
                inputs[key] = tf.zeros(shape, spec.dtype)
        result = self.signature(**inputs)
        actions = [int(result[k].numpy()[0]) for k in sorted(result) if k.startswith("actions")]
        return {"actions": actions, "probability": float(result["action_prob"].numpy()[0])}


def build(folder: Path) -> FastAPI:
    schema = yaml.safe_load((folder / "schema.yaml").read_text())
    names = list(schema["observations"])
    fields: dict[str, Any] = {n: (TYPES[s["type"]], ...) for n, s in schema["observations"].items()}
    observation_model = create_model("Observation", **fields)
    ray.init(include_dashboard=False)
    serve.start(proxy_location="Disabled")
    handle = serve.run(
        TensorFlowPolicy.bind(str(folder / "saved_model.zip")), name="original", route_prefix=None
    )
    app = FastAPI()

    @app.post("/predict")
    async def predict(payload: observation_model) -> dict[str, Any]:  # type: ignore[valid-type]
        return await handle.remote([float(getattr(payload, n)) for n in names])

    return app


if __name__ == "__main__":
    uvicorn.run(
        build(Path(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning"
    )
