"""A first load prints nothing from TensorFlow, absl or tf2onnx; our own messages remain."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, shared_model

FIRST_LOAD = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO)
from policy_server.archive import extract_cached
from policy_server.runtime.convert import convert
from policy_server.runtime.tensorflow import TensorFlowRuntime
from policy_server.schema import load_schema
folder, cache = Path(sys.argv[1]), Path(sys.argv[2])
schema = load_schema(folder / "schema.yaml")
model = extract_cached(folder / "saved_model.zip", cache, 10**9)
runtime = TensorFlowRuntime(model, schema.parameters)
convert(runtime, cache / "policy.onnx", schema)
logging.getLogger("policy_server.loader").info("loaded %s", runtime.action_space)
"""


@pytest.mark.models
def test_first_load_of_a_real_policy_is_quiet(tmp_path: Path) -> None:
    # simple_scheduling, a TF 1.15 export with reference variables, was the noisiest.
    folder = shared_model("simple_scheduling")
    result = subprocess.run(
        [sys.executable, "-c", FIRST_LOAD, str(folder), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=True,
    )
    lines = result.stderr.splitlines()
    assert lines == ["INFO:policy_server.loader:loaded MultiDiscrete(nvec=(6, 6, 6))"], lines
    assert (tmp_path / "policy.onnx").is_file()
