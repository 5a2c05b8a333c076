"""Reference (b): the HTTP ceiling. The same FastAPI validation of the same Observation model
as the project's /predict, then a constant answer: no model, no sampling.

    python bench/references/ceiling.py POLICY_FOLDER PORT
"""

import sys
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from policy_server.policy.observation import observation_model
from policy_server.policy.schema import load_schema

ANSWER = {"actions": [0], "probability": 1.0, "log_probability": 0.0, "value": 0.0}


def build(folder: Path) -> FastAPI:
    model = observation_model(load_schema(folder / "schema.yaml"))
    assert model is not None, "the ceiling needs a schema with observations"
    app = FastAPI()

    @app.post("/predict")
    async def predict(observation: model) -> dict[str, Any]:  # type: ignore[valid-type]
        return ANSWER

    return app


if __name__ == "__main__":
    uvicorn.run(
        build(Path(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning"
    )
