"""Schemathesis against live servers: every operation of the published OpenAPI document, with
and without the key, passes all of Schemathesis' checks (documented statuses, responses that
match their schemas, no server errors, negative data refused...).

Two servers cover the kinds of policy: the bundled typed example alone, and a repository of
a typed default, a tuple policy, a raw-only policy and a policy with a `url_path`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case
from schemathesis.checks import CheckFunction
from schemathesis.core.result import Ok
from schemathesis.schemas import APIOperation as Operation
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.policies import EXAMPLE, EXAMPLE_KEY, SHARED_MODELS, linear_onnx_policy
from tests.servers import RunningServer, serving

RAW_ONLY = f"""\
parameters:
  api_key: {EXAMPLE_KEY}
  action_space: {{type: Discrete, n: 4}}
  logits_output: logits
  value_output: value
"""
REPOSITORY = "default: cartpole\n"
NON_FINITE = "the model produced non-finite logits"
EXAMPLES = 6  # per operation: about 100 operations in all, on 2 cores


def repository(root: Path) -> Path:
    shutil.copytree(EXAMPLE, root / "cartpole")
    raw = root / "raw"
    raw.mkdir()
    linear_onnx_policy(raw / "model.onnx", np.ones((3, 4), np.float32), np.zeros(4, np.float32))
    (raw / "schema.yaml").write_text(RAW_ONLY)
    prefixed = root / "prefixed"
    shutil.copytree(EXAMPLE, prefixed)
    schema = (prefixed / "schema.yaml").read_text()
    (prefixed / "schema.yaml").write_text(schema + "  url_path: /api/v1\n")
    scheduling = SHARED_MODELS / "simple_scheduling"
    if (scheduling / "saved_model.zip").is_file():  # a tuple (MultiDiscrete) policy
        shutil.copytree(scheduling, root / "scheduling", ignore=shutil.ignore_patterns("*.md"))
        (scheduling_schema := root / "scheduling" / "schema.yaml").write_text(
            scheduling_schema.read_text().replace("1234567asdfgh", EXAMPLE_KEY)
        )
    (root / "repository.yaml").write_text(REPOSITORY)
    return root


@pytest.fixture(scope="module", params=["typed", "repository"])
def server(
    request: pytest.FixtureRequest, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp(request.param)
    policy = EXAMPLE if request.param == "typed" else repository(tmp / "policies")
    flags = ("--admin-key", "contract-admin", "--poll-interval-s", "0", "--max-body-bytes")
    with serving(policy, cache_dir, tmp, EXAMPLE_KEY, *flags, str(1024**2)) as running:
        yield running


def check_operation(server: RunningServer, operation: Operation[Any, Any, Any, Any]) -> None:
    key = "contract-admin" if operation.path.startswith("/admin") else EXAMPLE_KEY

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def keeps_contract(case: Case[Any]) -> None:
        for headers in ({"access-token": key}, {}):
            response = case.call(base_url=server.url, headers=headers, timeout=30)
            # Schema-valid observations far outside a model's training range can make its
            # logits overflow: refused (422) for a reason no schema can state.
            excluded: list[CheckFunction] = (
                [positive_data_acceptance] if NON_FINITE in response.text else []
            )
            # A V2 inference body that fits the protocol's schema may name tensors the
            # model does not have: the document cannot state each model's tensors (its
            # metadata route does), so such a body is refused with a documented 400.
            if operation.path.endswith("/infer"):
                excluded = [positive_data_acceptance]
            case.validate_response(response, excluded_checks=excluded)

    keeps_contract()


def test_every_operation_keeps_its_contract(server: RunningServer) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        try:
            check_operation(server, operation)
        except Exception as error:  # every operation is checked; all failures are shown
            failures.append(f"{operation.method.upper()} {operation.path}: {error}")
    assert not failures, "\n\n".join(failures)
