"""Peer: Ray Serve serving the ONNX model policy-server converted, with the same work per
request as policy-server's /predict (see onnx_policy.py): a FastAPI ingress deployment (one
replica) behind Serve's HTTP proxy; the route validates the typed observation with pydantic,
checks the `access-token` header, runs the forward pass and samples the action.

    python bench/references/rayserve_peer.py POLICY_FOLDER POLICY_ONNX PORT
"""

import signal
import sys
import time
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Header, HTTPException
from onnx_policy import OnnxPolicy, api_key, authorized
from ray import serve


def application(folder: Path, onnx: Path) -> Any:
    observation_type = OnnxPolicy(folder, onnx).observation
    key = api_key(folder)
    app = FastAPI()

    # Enough requests in flight per replica for 32 connections, as policy-server's Ray backend.
    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
    @serve.ingress(app)
    class PolicyIngress:
        def __init__(self) -> None:
            self.policy = OnnxPolicy(folder, onnx)

        @app.post("/predict")
        async def predict(
            self,
            observation: observation_type,  # type: ignore[valid-type]
            access_token: str | None = Header(None, alias="access-token"),
        ) -> dict[str, Any]:
            if not authorized(access_token, key):
                raise HTTPException(status_code=403, detail="missing or wrong access-token")
            return self.policy.act(self.policy.values(observation))

    return PolicyIngress.bind()


def stop(*_: Any) -> None:
    serve.shutdown()
    ray.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    folder, onnx, port = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    ray.init(
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(folder, onnx), name="peer", route_prefix="/")
    signal.signal(signal.SIGTERM, stop)
    deadline = time.monotonic() + 24 * 3600
    while time.monotonic() < deadline:
        time.sleep(1)
    stop()
