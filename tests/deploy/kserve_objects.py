"""Checks KServe objects against the KServe SDK's own models of its CRDs: every key must be a
field of the model the SDK generated from the CRD's schema (KServe's, or Kubernetes' own
for the pod spec parts), every value of the field's type, every required field present.
Run by tests/deploy/test_manifests.py in the `kserve` client environment (the SDK pins
protobuf below 7):

    python kserve_objects.py FILE.yaml

Prints one JSON line: {"objects": [kind, ...], "errors": [...]}.
"""

import json
import re
import sys

import kserve
import kubernetes.client
import yaml

KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
SCALARS = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str}


def model_class(name):
    found = getattr(kserve, name, None) or getattr(kubernetes.client, name, None)
    if found is None:
        raise LookupError(f"no model {name} in the KServe SDK or the Kubernetes client")
    return found


def check(value, type_name, where, errors):
    if type_name == "object":
        return
    listed = re.fullmatch(r"[Ll]ist\[(.+)\]", type_name)
    if listed:
        if not isinstance(value, list):
            errors.append(f"{where}: a list expected, got {value!r}")
            return
        for index, item in enumerate(value):
            check(item, listed.group(1), f"{where}[{index}]", errors)
        return
    mapping = re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name)
    if mapping:
        if not isinstance(value, dict):
            errors.append(f"{where}: a mapping expected, got {value!r}")
            return
        for key, item in value.items():
            check(item, mapping.group(1) or mapping.group(2), f"{where}.{key}", errors)
        return
    if type_name in SCALARS:
        if not isinstance(value, SCALARS[type_name]) or (
            type_name != "bool" and isinstance(value, bool)
        ):
            errors.append(f"{where}: {type_name} expected, got {value!r}")
        return
    check_model(value, model_class(type_name), where, errors)


def check_model(value, cls, where, errors):
    if not isinstance(value, dict):
        errors.append(f"{where}: an object ({cls.__name__}) expected, got {value!r}")
        return
    by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(by_json))
    for key in unknown:
        errors.append(f"{where}.{key}: not a field of {cls.__name__}")
    for key, item in value.items():
        if key in by_json:
            check(item, cls.openapi_types[by_json[key]], f"{where}.{key}", errors)
    try:  # the generated setters refuse a required field left out
        cls(**{by_json[key]: item for key, item in value.items() if key in by_json})
    except (ValueError, TypeError) as error:
        errors.append(f"{where}: {error}")


def main():
    objects, errors = [], []
    with open(sys.argv[1]) as handle:
        for document in yaml.safe_load_all(handle):
            kind = (document.get("apiVersion"), document.get("kind"))
            if kind not in KINDS:
                errors.append(f"not a KServe object: {kind}")
                continue
            objects.append(kind[1])
            check_model(document, model_class(KINDS[kind]), kind[1], errors)
    print(json.dumps({"objects": objects, "errors": errors}))


if __name__ == "__main__":
    main()
