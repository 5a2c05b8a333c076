"""ONNX Runtime: conversion agrees with TensorFlow, the cache skips TensorFlow, model.onnx."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from policy_server.errors import PolicyLoadError
from policy_server.loading.loader import load_policy
from policy_server.runtime.convert import convert
from policy_server.runtime.onnx import OnnxRuntime
from policy_server.settings import Settings
from tests.policies import EXAMPLE, ROOT, linear_onnx_policy, shared_model
from tests.reference import load_signature, reference_outputs
from tests.runtime.test_tensorflow import EXPECTED, runtime_for


@pytest.mark.models
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_onnx_agrees_with_tensorflow(name: str, tmp_path: Path) -> None:
    folder = shared_model(name)
    tensorflow = runtime_for(folder, tmp_path / "cache")
    onnx = convert(tensorflow, tmp_path / "policy.onnx")
    assert isinstance(onnx, OnnxRuntime) and (tmp_path / "policy.onnx").is_file()
    assert onnx.action_space == tensorflow.action_space
    width = tensorflow.observation_width
    rng = np.random.default_rng(1)
    observations = np.concatenate([rng.normal(size=(50, width)), rng.uniform(-50, 50, (50, width))])
    observations = observations.astype(np.float32)
    reference = reference_outputs(
        load_signature(folder / "saved_model.zip", tmp_path / "ref"), observations
    )
    got = onnx.forward(observations)
    np.testing.assert_allclose(got.logits, reference[tensorflow.layout.logits_output], atol=1e-4)
    assert got.value is not None
    np.testing.assert_allclose(got.value, reference["vf_preds"], rtol=1e-3, atol=1e-3)


PROBE = """
import sys
from pathlib import Path
from policy_server.loading.loader import load_policy
from policy_server.settings import Settings
policy = load_policy(Settings(policy_path=Path(sys.argv[1]), cache_dir=Path(sys.argv[2])))
print(policy.runtime.name, "tensorflow" in sys.modules)
"""


def test_second_start_uses_the_cache_without_tensorflow(tmp_path: Path) -> None:
    def start() -> str:
        result = subprocess.run(
            [sys.executable, "-c", PROBE, str(EXAMPLE), str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            check=True,
        )
        return result.stdout.strip()

    assert start() == "onnx True", "the first start converts with TensorFlow"
    assert list(tmp_path.glob("*/policy.onnx"))
    assert start() == "onnx False", "later starts load the cached ONNX only"


def test_runtime_choice(tmp_path: Path) -> None:
    settings = Settings(policy_path=EXAMPLE, cache_dir=tmp_path, runtime="tensorflow")
    assert load_policy(settings).runtime.name == "tensorflow"
    assert not list(tmp_path.glob("*/policy.onnx")), "tensorflow never converts"
    onnx = load_policy(settings.model_copy(update={"runtime": "onnx"}))
    assert onnx.runtime.name == "onnx"


def test_corrupt_cache_falls_back_to_conversion(tmp_path: Path) -> None:
    settings = Settings(policy_path=EXAMPLE, cache_dir=tmp_path)
    load_policy(settings)
    cached = next(tmp_path.glob("*/policy.onnx"))
    cached.write_bytes(b"garbage")
    assert load_policy(settings).runtime.name == "onnx"
    assert cached.read_bytes() != b"garbage", "a bad cache entry is replaced"


SCHEMA = """\
observations:
  position: {type: "List[float]", max_items: 3}
parameters:
  api_key: k
  action_space: {type: Discrete, n: 4}
  logits_output: logits
  value_output: value
"""


def test_model_onnx_policy(tmp_path: Path) -> None:
    weights = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    bias = np.array([0.0, 0.5, -0.5, 1.0], dtype=np.float32)
    linear_onnx_policy(tmp_path / "model.onnx", weights, bias)
    (tmp_path / "schema.yaml").write_text(SCHEMA)
    policy = load_policy(Settings(policy_path=tmp_path, cache_dir=tmp_path / "cache"))
    assert policy.runtime.name == "onnx" and policy.runtime.observation_width == 3
    obs = np.array([[1.0, -2.0, 0.5]], dtype=np.float32)
    outputs = policy.runtime.forward(obs)
    np.testing.assert_allclose(outputs.logits, obs @ weights + bias, rtol=1e-6)
    assert outputs.value is not None
    np.testing.assert_allclose(outputs.value, [-0.5])
    # Large batches run on a multi-threaded session: same answers.
    many = (
        np.random.default_rng(2).normal(size=(OnnxRuntime.LARGE_BATCH + 44, 3)).astype(np.float32)
    )
    np.testing.assert_allclose(
        policy.runtime.forward(many).logits, many @ weights + bias, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("  action_space: {type: Discrete, n: 4}\n", "", "needs parameters.action_space"),
        ("n: 4}", "n: 5}", "has 4 values but the action space"),
        ("logits_output: logits", "logits_output: nothing", "no output 'nothing'"),
        ("{type: Discrete, n: 4}", "{type: Tuple}", "unknown action space"),
    ],
)
def test_model_onnx_policy_refused_with_reason(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    linear_onnx_policy(tmp_path / "model.onnx", np.ones((3, 4)), np.zeros(4))
    assert old in SCHEMA
    (tmp_path / "schema.yaml").write_text(SCHEMA.replace(old, new))
    with pytest.raises(PolicyLoadError, match=message):
        load_policy(Settings(policy_path=tmp_path, cache_dir=tmp_path / "cache"))
