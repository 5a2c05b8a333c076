"""The Open Inference Protocol over REST (KServe V2, Triton's HTTP/REST protocol), on the
server's own port, with the binary tensor extension.

What the real clients do decides a few things the protocol text leaves open: no
Content-Type is required (`tritonclient.http` sends none, the KServe SDK
`application/octet-stream`), `binary_data_output` asks for every output in binary unless an
output's own `binary_data` says otherwise, and every answer names `model_name`.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
from fastapi import Body, Path, Security
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from policy_server.errors import PolicyServerError
from policy_server.protocols.auth import header_scheme, supplied_key
from policy_server.protocols.routes import DirectRoute, read_body
from policy_server.protocols.routes import header as raw_header
from policy_server.protocols.v2.dataplane import DataPlane, InferRequest, InferResponse
from policy_server.protocols.v2.errors import http_status
from policy_server.protocols.v2.models import (
    V2Error,
    V2InferenceRequest,
    V2InferenceResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
)
from policy_server.protocols.v2.tensors import (
    InvalidTensor,
    checked_datatype,
    checked_shape,
    from_bytes,
    from_values,
    to_bytes,
    to_values,
)

HEADER_LENGTH = "inference-header-content-length"
_HEADER_LENGTH = HEADER_LENGTH.encode()
Handler = Callable[[Request], Awaitable[Response]]
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": V2Error, "description": text}
    for status, text in (
        (400, "Bad tensors or parameters (the message names the tensor)"),
        (401, "Missing API key"),
        (403, "Wrong API key"),
        (404, "No such model or version"),
        (503, "No version of the model can answer now (loading, failed or draining)"),
        (504, "The model did not answer within the inference time-out"),
    )
}
# With the binary tensor extension: the JSON, then the outputs' bytes.
_BINARY: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/octet-stream": {}},
        "description": "The answer; with binary outputs, its JSON (of the length in "
        "`Inference-Header-Content-Length`) then the outputs' bytes",
    }
}
_NOT_READY: dict[int | str, dict[str, Any]] = {503: {"model": V2Ready, "description": "Not ready"}}


class V2Route(DirectRoute):
    """A route of the Open Inference Protocol's REST API."""

    protocol = "v2"


def v2_routes(plane: DataPlane) -> list[BaseRoute]:
    handlers = Handlers(plane)
    model = "/v2/models/{model_name}"
    version = model + "/versions/{model_version}"
    open_routes = [
        (
            "/v2",
            "v2_server_metadata",
            handlers.server_metadata,
            V2ServerMetadata,
            "Server metadata",
        ),
        ("/v2/health/live", "v2_server_live", handlers.live, V2Live, "Liveness"),
        ("/v2/health/ready", "v2_server_ready", handlers.ready, V2Ready, "Readiness"),
    ]
    # Not ready is 503 (the KServe SDK reads the body of either).
    routes: list[BaseRoute] = [
        V2Route(
            path,
            _endpoint(),
            handler,
            methods=["GET"],
            operation_id=op_id,
            summary=summary,
            tags=["v2"],
            response_model=response,
            responses=_NOT_READY if path.endswith("ready") else {},
        )
        for path, op_id, handler, response, summary in open_routes
    ]
    keyed = [
        (model, "v2_model_metadata", handlers.model_metadata, V2ModelMetadata, "GET"),
        (version, "v2_model_version_metadata", handlers.model_metadata, V2ModelMetadata, "GET"),
        (model + "/ready", "v2_model_ready", handlers.model_ready, V2ModelReady, "GET"),
        (version + "/ready", "v2_model_version_ready", handlers.model_ready, V2ModelReady, "GET"),
        (model + "/infer", "v2_model_infer", handlers.infer, V2InferenceResponse, "POST"),
        (version + "/infer", "v2_model_version_infer", handlers.infer, V2InferenceResponse, "POST"),
    ]
    for path, op_id, handler, response, method in keyed:
        routes.append(
            V2Route(
                path,
                _endpoint(True, "{model_version}" in path, method == "POST"),
                handler,
                methods=[method],
                operation_id=op_id,
                summary=_SUMMARIES[op_id.removeprefix("v2_").replace("version_", "")],
                tags=["v2"],
                response_model=response,
                responses=_ERRORS | _responses_of(path),
                dependencies=[Security(header_scheme)],
            )
        )
    return routes


def _responses_of(path: str) -> dict[int | str, dict[str, Any]]:
    if path.endswith("/ready"):
        return {503: {"model": V2ModelReady, "description": "Not ready"}}
    return _BINARY if path.endswith("/infer") else {}


_SUMMARIES = {
    "model_metadata": "Model metadata: its versions and its input and output tensors",
    "model_ready": "Whether the model (or version) can answer",
    "model_infer": "Inference on tensors (Open Inference Protocol, binary tensors too)",
}


def _endpoint(keyed: bool = False, versioned: bool = False, body: bool = False) -> Any:
    """A function whose signature tells FastAPI what the route takes; it is never called."""

    async def endpoint(**_: Any) -> None:  # pragma: no cover - never called
        raise NotImplementedError

    names = ("model_name", "model_version")[: (1 + versioned) if keyed else 0]
    parameters = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[str, Path()])
        for name in names
    ]
    if body:
        parameters.append(
            inspect.Parameter(
                "body",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[V2InferenceRequest, Body()],
            )
        )
    endpoint.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return endpoint


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status, media_type="application/json")


def error_body(error: PolicyServerError) -> Response:
    return _json({"error": error.message}, http_status(error))


class Handlers:
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def server_metadata(self, _: Request) -> Response:
        return _json(self.plane.server_metadata())

    async def live(self, _: Request) -> Response:
        return _json({"live": True})

    async def ready(self, _: Request) -> Response:
        ready = self.plane.ready()
        return _json({"ready": ready}, 200 if ready else 503)

    async def model_metadata(self, request: Request) -> Response:
        name, version = _model(request)
        try:
            return _json(self.plane.model_metadata(name, version, supplied_key(request)))
        except PolicyServerError as error:
            return error_body(error)

    async def model_ready(self, request: Request) -> Response:
        name, version = _model(request)
        try:
            ready = self.plane.model_ready(name, version, supplied_key(request))
        except PolicyServerError as error:
            return error_body(error)
        return _json({"name": name, "ready": ready}, 200 if ready else 503)

    async def infer(self, request: Request) -> Response:
        name, version = _model(request)
        try:
            self.plane.check(name, version, supplied_key(request))  # before the body is read
            body = await read_body(request.receive)
            length = raw_header(request.scope, _HEADER_LENGTH)
            infer, binary = parse_request(
                name, version, body, None if length is None else length.decode("latin-1")
            )
            answer = await self.plane.infer(infer, supplied_key(request))
        except PolicyServerError as error:
            return error_body(error)
        request.scope["policy_server.answered"] = (answer.model, answer.version)
        return render_response(answer, binary)


def _model(request: Request) -> tuple[str, str | None]:
    params = request.path_params
    return params["model_name"], params.get("model_version") or None


# --- the body, JSON and binary ---------------------------------------------------------------


class BinaryOutputs:
    """Which outputs are answered in binary: those asked so, else all when the request's
    `binary_data_output` says so."""

    def __init__(self, default: bool, each: dict[str, bool]) -> None:
        self.default = default
        self.each = each

    def __call__(self, name: str) -> bool:
        return self.each.get(name, self.default)


def parse_request(
    model: str, version: str | None, body: bytes, header_length: str | None
) -> tuple[InferRequest, BinaryOutputs]:
    header, binary = _split(body, header_length)
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError as error:
        raise InvalidTensor(f"the request is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise InvalidTensor("the request must be a JSON object")
    parameters = _parameters(document.get("parameters"), "request")
    default_binary = parameters.pop("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise InvalidTensor("parameter 'binary_data_output' must be a bool")
    inputs, offset = [], 0
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidTensor("'inputs' must be a non-empty list of tensors")
    for item in raw_inputs:
        tensor, offset = _input(item, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise InvalidTensor(
            f"{len(binary) - offset} bytes after the JSON that no input's binary_data_size claims"
        )
    names, each = _outputs(document.get("outputs"))
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidTensor("'id' must be a string")
    request = InferRequest(model, version, inputs, names, parameters, request_id)
    return request, BinaryOutputs(default_binary, each)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise InvalidTensor(
            f"{HEADER_LENGTH} is {header_length!r}, for a body of {len(body)} bytes"
        )
    length = int(header_length)
    return body[:length], body[length:]


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidTensor(f"the {where}'s 'parameters' must be an object")
    return dict(value)


def _input(item: Any, binary: bytes, offset: int) -> tuple[Any, int]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise InvalidTensor("every input must be an object with a 'name'")
    name = item["name"]
    datatype = checked_datatype(name, item.get("datatype"))
    shape = checked_shape(name, item.get("shape"))
    parameters = _parameters(item.get("parameters"), f"input '{name}'")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in item:
            raise InvalidTensor(f"input '{name}': no 'data' and no binary_data_size")
        return from_values(name, datatype, shape, item["data"]), offset
    if type(size) is not int or size < 0 or offset + size > len(binary):
        raise InvalidTensor(
            f"input '{name}': binary_data_size {size!r} goes beyond the {len(binary)} "
            "bytes after the JSON"
        )
    return from_bytes(name, datatype, shape, binary[offset : offset + size]), offset + size


def _outputs(value: Any) -> tuple[list[str] | None, dict[str, bool]]:
    if value is None:
        return None, {}
    if not isinstance(value, list):
        raise InvalidTensor("'outputs' must be a list")
    names, each = [], {}
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidTensor("every requested output must be an object with a 'name'")
        name = item["name"]
        parameters = _parameters(item.get("parameters"), f"output '{name}'")
        flag = parameters.get("binary_data")
        if flag is not None:
            if not isinstance(flag, bool):
                raise InvalidTensor(f"output '{name}': binary_data must be a bool")
            each[name] = flag
        names.append(name)
    return names, each


def render_response(answer: InferResponse, binary: BinaryOutputs) -> Response:
    outputs, chunks = [], []
    for tensor in answer.outputs:
        described: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if binary(tensor.name):
            raw = to_bytes(tensor)
            described["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            described["data"] = to_values(tensor)
        outputs.append(described)
    document: dict[str, Any] = {"model_name": answer.model, "model_version": answer.version}
    if answer.id is not None:
        document["id"] = answer.id
    if answer.parameters:
        document["parameters"] = answer.parameters
    document["outputs"] = outputs
    header = orjson.dumps(document)
    if not chunks:
        return Response(header, 200, media_type="application/json")
    return Response(
        b"".join((header, *chunks)),
        200,
        headers={HEADER_LENGTH: str(len(header))},
        media_type="application/octet-stream",
    )
