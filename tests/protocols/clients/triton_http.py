"""Runs a list of operations with `tritonclient.http`, unmodified, and prints their results as
one JSON line. Run by tests/oip.py in the `triton` client environment:

    python triton_http.py HOST:PORT OPERATIONS_JSON
"""

import json
import sys

import numpy as np
import tritonclient.http as client_module
from tritonclient.utils import InferenceServerException


def tensors(spec):
    inputs = []
    for name, (datatype, values) in spec.items():
        array = np.array(values, dtype=object if datatype == "BYTES" else None)
        if datatype == "FP32":
            array = array.astype(np.float32)
        elif datatype == "INT64":
            array = array.astype(np.int64)
        elif datatype == "BOOL":
            array = array.astype(bool)
        tensor = client_module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)  # binary_data=True: the client's default
        inputs.append(tensor)
    return inputs


def plain(value):
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return [v.decode() if isinstance(v, bytes) else v for v in value.reshape(-1)]
        return value.tolist()
    return value


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
        return client.get_server_metadata(headers=headers)
    if kind == "model_metadata":
        return client.get_model_metadata(model, version, headers=headers)
    if kind == "model_ready":
        return client.is_model_ready(model, version, headers=headers)
    outputs = None
    if operation.get("outputs") is not None:
        outputs = [
            client_module.InferRequestedOutput(name, binary_data=operation.get("binary", True))
            for name in operation["outputs"]
        ]
    sequence = operation.get("sequence") or {}
    result = client.infer(
        model,
        tensors(operation["inputs"]),
        model_version=version,
        outputs=outputs,
        sequence_id=sequence.get("id", 0),
        sequence_start=sequence.get("start", False),
        sequence_end=sequence.get("end", False),
        headers=headers,
        parameters=operation.get("parameters"),
    )
    response = result.get_response()
    return {
        "model_name": response["model_name"],
        "model_version": response["model_version"],
        "parameters": response.get("parameters", {}),
        "binary": [
            o["name"] for o in response["outputs"] if "binary_data_size" in o.get("parameters", {})
        ],
        "outputs": {o["name"]: plain(result.as_numpy(o["name"])) for o in response["outputs"]},
    }


def main():
    client = client_module.InferenceServerClient(url=sys.argv[1])
    results = []
    for operation in json.loads(sys.argv[2]):
        try:
            results.append({"ok": run(client, operation)})
        except InferenceServerException as error:
            results.append({"error": {"status": error.status(), "message": error.message()}})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
