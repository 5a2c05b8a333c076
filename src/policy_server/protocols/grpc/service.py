"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` on `--grpc-port`,
served on the same event loop as the HTTP routes, through the same data plane.

Inputs come in `raw_input_contents` or in typed contents; outputs always go out in
`raw_output_contents`, which is what `tritonclient.grpc` reads (and the KServe client reads
either). `ModelStreamInfer` answers a stream's requests in order, one at a time, so a client
can step an episode over one stream. The key comes as the `access-token` metadata.
Under `--workers` every worker listens on the port (SO_REUSEPORT), and the kernel spreads
the connections.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

from policy_server.errors import PolicyServerError
from policy_server.logs import access_log, log_request
from policy_server.metrics import Metrics
from policy_server.protocols.auth import TOKEN_NAME
from policy_server.protocols.grpc import stubs
from policy_server.protocols.v2.dataplane import DataPlane, InferRequest, InferResponse
from policy_server.protocols.v2.errors import http_status
from policy_server.protocols.v2.tensors import (
    InvalidTensor,
    checked_datatype,
    checked_shape,
    from_bytes,
    from_values,
    to_bytes,
)

logger = logging.getLogger(__name__)
SERVICE = "inference.GRPCInferenceService"
# The typed contents field of each datatype.
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _status_codes() -> dict[int, Any]:
    import grpc

    return {
        400: grpc.StatusCode.INVALID_ARGUMENT,
        401: grpc.StatusCode.UNAUTHENTICATED,
        403: grpc.StatusCode.PERMISSION_DENIED,
        404: grpc.StatusCode.NOT_FOUND,
        413: grpc.StatusCode.RESOURCE_EXHAUSTED,
        503: grpc.StatusCode.UNAVAILABLE,
        504: grpc.StatusCode.DEADLINE_EXCEEDED,
    }


class Inference:
    """The service's methods; `servicer()` mixes them into the generated base class, whose
    other methods (Triton's repository, statistics, shared memory) answer UNIMPLEMENTED."""

    def __init__(self, plane: DataPlane, metrics: Metrics, pb2: ModuleType) -> None:
        self.plane = plane
        self.metrics = metrics
        self.pb2 = pb2
        self.codes = _status_codes()

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return await self._call(
            "ServerLive", context, lambda: self.pb2.ServerLiveResponse(live=True)
        )

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return await self._call(
            "ServerReady", context, lambda: self.pb2.ServerReadyResponse(ready=self.plane.ready())
        )

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return await self._call(
            "ServerMetadata",
            context,
            lambda: self.pb2.ServerMetadataResponse(**self.plane.server_metadata()),
        )

    async def ModelReady(self, request: Any, context: Any) -> Any:
        def answer() -> Any:
            ready = self.plane.model_ready(request.name, request.version or None, _key(context))
            return self.pb2.ModelReadyResponse(ready=ready)

        return await self._call("ModelReady", context, answer)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        def answer() -> Any:
            found = self.plane.model_metadata(request.name, request.version or None, _key(context))
            tensors = self.pb2.ModelMetadataResponse.TensorMetadata
            return self.pb2.ModelMetadataResponse(
                name=found["name"],
                versions=found["versions"],
                platform=found["platform"],
                inputs=[tensors(**spec) for spec in found["inputs"]],
                outputs=[tensors(**spec) for spec in found["outputs"]],
            )

        return await self._call("ModelMetadata", context, answer)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        started = time.perf_counter()
        answered = ("", "")
        try:
            answer = await self.plane.infer(read_request(request), _key(context))
        except PolicyServerError as error:
            self._record("ModelInfer", self.codes.get(http_status(error)), answered, started)
            await context.abort(self._code(error), error.message)
        answered = (answer.model, answer.version)
        self._record("ModelInfer", None, answered, started)
        return write_response(self.pb2, answer)

    async def ModelStreamInfer(self, requests: AsyncIterator[Any], context: Any) -> Any:
        key = _key(context)
        async for request in requests:
            started = time.perf_counter()
            try:
                answer = await self.plane.infer(read_request(request), key)
            except PolicyServerError as error:
                status = self.codes.get(http_status(error))
                self._record("ModelStreamInfer", status, ("", ""), started)
                yield self.pb2.ModelStreamInferResponse(error_message=error.message)
                continue
            self._record("ModelStreamInfer", None, (answer.model, answer.version), started)
            yield self.pb2.ModelStreamInferResponse(infer_response=write_response(self.pb2, answer))

    async def _call(self, method: str, context: Any, answer: Any) -> Any:
        started = time.perf_counter()
        try:
            result = answer()
        except PolicyServerError as error:
            self._record(method, self.codes.get(http_status(error)), ("", ""), started)
            await context.abort(self._code(error), error.message)
        self._record(method, None, ("", ""), started)
        return result

    def _code(self, error: PolicyServerError) -> Any:
        import grpc

        return self.codes.get(http_status(error), grpc.StatusCode.INTERNAL)

    def _record(self, method: str, status: Any, answered: tuple[str, str], started: float) -> None:
        seconds = time.perf_counter() - started
        route = f"/{SERVICE}/{method}"
        code = "OK" if status is None else status.name
        self.metrics.count_request(route, "GRPC", code, "grpc", answered, seconds)
        if access_log.isEnabledFor(logging.INFO):
            log_request(uuid.uuid4().hex, "GRPC", route, route, code, "grpc", answered, seconds)


def _key(context: Any) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == TOKEN_NAME:
            return str(value)
    return None


def _parameters(parameters: Any) -> dict[str, Any]:
    values = {}
    for name, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[name] = getattr(parameter, choice)
    return values


def read_request(message: Any) -> InferRequest:
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidTensor(
            f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs: give one per input"
        )
    inputs = []
    for index, item in enumerate(message.inputs):
        name = item.name
        datatype = checked_datatype(name, item.datatype)
        shape = checked_shape(name, list(item.shape))
        if raw:
            inputs.append(from_bytes(name, datatype, shape, raw[index]))
        else:
            values = getattr(item.contents, _CONTENTS[datatype])
            inputs.append(from_values(name, datatype, shape, list(values)))
    outputs = [output.name for output in message.outputs] or None
    return InferRequest(
        message.model_name,
        message.model_version or None,
        inputs,
        outputs,
        _parameters(message.parameters),
        message.id or None,
    )


def write_response(pb2: ModuleType, answer: InferResponse) -> Any:
    output = pb2.ModelInferResponse.InferOutputTensor
    response = pb2.ModelInferResponse(
        model_name=answer.model,
        model_version=answer.version,
        id=answer.id or "",
        outputs=[output(name=t.name, datatype=t.datatype, shape=t.shape) for t in answer.outputs],
        raw_output_contents=[to_bytes(t) for t in answer.outputs],
    )
    for name, value in answer.parameters.items():
        parameter = response.parameters[name]
        if isinstance(value, str):
            parameter.string_param = value
        else:
            parameter.int64_param = value
    return response


class GrpcServer:
    """`inference.GRPCInferenceService` on a port, started and stopped with the app."""

    def __init__(
        self,
        plane: DataPlane,
        metrics: Metrics,
        host: str,
        port: int,
        *,
        shared_port: bool,
        max_message_bytes: int,
        grace_s: float,
    ) -> None:
        self.plane = plane
        self.metrics = metrics
        self.address = f"[{host}]:{port}" if ":" in host else f"{host or '[::]'}:{port}"
        self.shared_port = shared_port
        self.max_message_bytes = max_message_bytes
        self.grace_s = grace_s
        self._server: Any = None

    async def start(self) -> None:
        from grpc import aio

        pb2, pb2_grpc = stubs.load()
        servicer_class = type("Servicer", (Inference, pb2_grpc.GRPCInferenceServiceServicer), {})
        options = [
            # Every worker of `--workers` binds the port; one process alone refuses a taken one.
            ("grpc.so_reuseport", int(self.shared_port)),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", -1),
        ]
        server = aio.server(options=options)
        pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            servicer_class(self.plane, self.metrics, pb2), server
        )
        try:
            bound = server.add_insecure_port(self.address)
        except RuntimeError:
            bound = 0
        if not bound:
            raise OSError(f"cannot listen for gRPC on {self.address}; check --grpc-port")
        await server.start()
        self._server = server
        logger.info("gRPC (Open Inference Protocol) on %s", self.address)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(self.grace_s)
            self._server = None
