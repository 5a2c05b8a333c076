"""Runs a list of operations with the KServe SDK's InferenceRESTClient (protocol v2) or
InferenceGRPCClient, unmodified, and prints their results as one JSON line. Run by
tests/oip.py in the `kserve` client environment:

    python kserve_client.py rest http://HOST:PORT OPERATIONS_JSON
    python kserve_client.py grpc HOST:PORT OPERATIONS_JSON
"""

import asyncio
import json
import sys

import grpc
import httpx
import numpy as np
from kserve import (
    InferenceGRPCClient,
    InferenceRESTClient,
    InferInput,
    InferRequest,
    RESTConfig,
)
from kserve.protocol.infer_type import RequestedOutput


def request(operation):
    inputs = []
    for name, (datatype, values) in operation["inputs"].items():
        dtype = {"FP32": np.float32, "INT64": np.int64, "BOOL": bool}[datatype]
        array = np.array(values, dtype=dtype)
        tensor = InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=operation.get("binary", True))
        inputs.append(tensor)
    outputs = None
    if operation.get("outputs") is not None:
        outputs = [RequestedOutput(name) for name in operation["outputs"]]
    return InferRequest(
        operation["model"],
        inputs,
        parameters=operation.get("parameters"),
        request_outputs=outputs,
        model_version=operation.get("version"),
    )


def plain(output):
    array = output.as_numpy()
    if array.dtype == object:
        return [v.decode() if isinstance(v, bytes) else v for v in array.reshape(-1)]
    return array.tolist()


def answer(response):
    parameters = response.parameters or {}
    if not isinstance(parameters, dict):  # gRPC: a map of InferParameter
        parameters = {
            name: getattr(value, value.WhichOneof("parameter_choice"))
            for name, value in parameters.items()
        }
    return {
        "model_name": response.model_name,
        "parameters": parameters,
        "outputs": {output.name: plain(output) for output in response.outputs},
    }


async def rest(url, operation):
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    headers = {"access-token": operation["key"]} if operation.get("key") else None
    kind = operation["op"]
    try:
        if kind == "live":
            return await client.is_server_live(url, headers=headers)
        if kind == "ready":
            return await client.is_server_ready(url, headers=headers)
        if kind == "model_ready":
            return await client.is_model_ready(url, operation["model"], headers=headers)
        return answer(await client.infer(url, request(operation), operation["model"], headers))
    finally:
        await client.close()


async def rpc(url, operation):
    client = InferenceGRPCClient(url, retries=0)
    headers = (("access-token", operation["key"]),) if operation.get("key") else None
    kind = operation["op"]
    try:
        if kind == "live":
            return await client.is_server_live(headers=headers)
        if kind == "ready":
            return await client.is_server_ready(headers=headers)
        if kind == "model_ready":
            return await client.is_model_ready(operation["model"], headers=headers)
        return answer(await client.infer(request(operation), headers=headers))
    finally:
        await client.close()


async def main():
    transport, url, operations = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    results = []
    for operation in operations:
        try:
            run = rest if transport == "rest" else rpc
            results.append({"ok": await run(url, operation)})
        except httpx.HTTPStatusError as error:
            status = error.response.status_code
            results.append({"error": {"status": str(status), "message": str(error)}})
        except grpc.RpcError as error:
            results.append({"error": {"status": error.code().name, "message": error.details()}})
    print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
