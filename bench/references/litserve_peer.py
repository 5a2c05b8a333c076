"""Peer: LitServe serving the ONNX model policy-server converted, with the same work per
request as policy-server's /predict (see onnx_policy.py). `authorize` checks the
`access-token` header in the HTTP process; `decode_request` validates the typed observation
with pydantic in the inference worker, `predict` runs the forward pass and samples the action.
LitServe's defaults otherwise: one inference worker, one API server process, no batching.

    python bench/references/litserve_peer.py POLICY_FOLDER POLICY_ONNX PORT
"""

import sys
from pathlib import Path
from typing import Any

import litserve
from fastapi import Header, HTTPException
from onnx_policy import OnnxPolicy, api_key, authorized
from pydantic import ValidationError


class PolicyAPI(litserve.LitAPI):
    def __init__(self, folder: Path, onnx: Path) -> None:
        super().__init__(api_path="/predict")
        self.folder, self.onnx = folder, onnx
        self.key = api_key(folder)

    def setup(self, device: str) -> None:
        self.policy = OnnxPolicy(self.folder, self.onnx)

    def authorize(self, access_token: str | None = Header(None, alias="access-token")) -> None:
        if not authorized(access_token, self.key):
            raise HTTPException(status_code=403, detail="missing or wrong access-token")

    def decode_request(self, request: dict[str, Any]) -> list[float]:
        try:
            return self.policy.values(self.policy.observation.model_validate(request))
        except ValidationError as error:
            raise HTTPException(status_code=422, detail=error.errors()) from None

    def predict(self, row: list[float]) -> dict[str, Any]:
        return self.policy.act(row)

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


if __name__ == "__main__":
    folder, onnx, port = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    server = litserve.LitServer(PolicyAPI(folder, onnx), accelerator="cpu", workers_per_device=1)
    server.run(
        host="127.0.0.1",
        port=port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )
