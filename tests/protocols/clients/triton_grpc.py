"""Runs a list of operations with `tritonclient.grpc`, unmodified, and prints their results as
one JSON line; `stream` runs its steps over one `ModelStreamInfer` stream. Run by
tests/oip.py in the `triton` client environment:

    python triton_grpc.py HOST:PORT OPERATIONS_JSON
"""

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as client_module
from tritonclient.utils import InferenceServerException


def tensors(spec):
    inputs = []
    for name, (datatype, values) in spec.items():
        dtype = {"FP32": np.float32, "INT64": np.int64, "BOOL": bool}[datatype]
        array = np.array(values, dtype=dtype)
        tensor = client_module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def plain(value):
    if value.dtype == object:
        return [v.decode() if isinstance(v, bytes) else v for v in value.reshape(-1)]
    return value.tolist()


def answer(result):
    response = result.get_response(as_json=True)
    return {
        "model_name": response["model_name"],
        "model_version": response["model_version"],
        "parameters": {
            name: next(iter(value.values()))
            for name, value in response.get("parameters", {}).items()
        },
        "outputs": {o["name"]: plain(result.as_numpy(o["name"])) for o in response["outputs"]},
    }


def infer_arguments(operation):
    outputs = None
    if operation.get("outputs") is not None:
        outputs = [client_module.InferRequestedOutput(name) for name in operation["outputs"]]
    sequence = operation.get("sequence") or {}
    return {
        "model_name": operation.get("model", ""),
        "inputs": tensors(operation["inputs"]),
        "model_version": operation.get("version", ""),
        "outputs": outputs,
        "sequence_id": sequence.get("id", 0),
        "sequence_start": sequence.get("start", False),
        "sequence_end": sequence.get("end", False),
        "parameters": operation.get("parameters"),
    }


def stream(client, operation, headers):
    answers = queue.Queue()
    client.start_stream(
        callback=lambda result, error: answers.put((result, error)), headers=headers
    )
    results = []
    for step in operation["steps"]:
        client.async_stream_infer(**infer_arguments(step))
        result, error = answers.get(timeout=60)  # one step at a time: the next reads this one
        if error is not None:
            results.append({"error": {"status": error.status(), "message": error.message()}})
        else:
            results.append({"ok": answer(result)})
    client.stop_stream()
    return results


def run(client, operation):
    kind = operation["op"]
    headers = {"access-token": operation["key"]} if operation.get("key") else None
    model = operation.get("model", "")
    version = operation.get("version", "")
    if kind == "live":
        return client.is_server_live(headers=headers)
    if kind == "ready":
        return client.is_server_ready(headers=headers)
    if kind == "server_metadata":
        return client.get_server_metadata(headers=headers, as_json=True)
    if kind == "model_metadata":
        return client.get_model_metadata(model, version, headers=headers, as_json=True)
    if kind == "model_ready":
        return client.is_model_ready(model, version, headers=headers)
    if kind == "stream":
        return stream(client, operation, headers)
    return answer(client.infer(**infer_arguments(operation), headers=headers))


def main():
    client = client_module.InferenceServerClient(url=sys.argv[1])
    results = []
    for operation in json.loads(sys.argv[2]):
        try:
            if operation.get("new_connection"):
                client = client_module.InferenceServerClient(url=sys.argv[1])
            results.append({"ok": run(client, operation)})
        except InferenceServerException as error:
            results.append({"error": {"status": error.status(), "message": error.message()}})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
