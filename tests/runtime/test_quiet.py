"""A first load prints nothing from TensorFlow, absl or tf2onnx; our own messages remain."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from policy_server.runtime.quiet import native_notices_dropped
from tests.policies import ROOT, shared_model

FIRST_LOAD = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO)
from policy_server.loading.archive import extract_cached
from policy_server.runtime.convert import convert
from policy_server.runtime.tensorflow import TensorFlowRuntime
from policy_server.policy.schema import load_schema
folder, cache = Path(sys.argv[1]), Path(sys.argv[2])
schema = load_schema(folder / "schema.yaml")
model = extract_cached(folder / "saved_model.zip", cache, 10**9)
runtime = TensorFlowRuntime(model, schema.parameters)
convert(runtime, cache / "policy.onnx", schema)
logging.getLogger("policy_server.loading.loader").info("loaded %s", runtime.action_space)
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
    assert lines == ["INFO:policy_server.loading.loader:loaded MultiDiscrete(nvec=(6, 6, 6))"], (
        lines
    )
    assert (tmp_path / "policy.onnx").is_file()


NOTICES = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1795632287.887153    7075 port.cc:153] oneDNN custom operations are on.\n"
    "ours: a line another thread logs meanwhile\n"
    "E0000 00:00:1795632288.000001    7075 cuda_dnn.cc:8310] Unable to register cuDNN factory\n"
)


def test_native_notices_are_dropped_and_other_lines_kept(capfd: pytest.CaptureFixture[str]) -> None:
    with native_notices_dropped():
        os.write(2, NOTICES.encode())
    assert capfd.readouterr().err == "ours: a line another thread logs meanwhile\n"


def test_everything_is_replayed_when_the_import_fails(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ImportError), native_notices_dropped():
        os.write(2, NOTICES.encode())
        raise ImportError("libtensorflow_framework.so.2: cannot open shared object file")
    assert capfd.readouterr().err == NOTICES
