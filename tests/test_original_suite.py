"""The original server's own test suite, ../shared/original-tests/test_app.py, run as it is
against our app.py and generate.py, from a working folder holding its example policy."""

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from tests.policies import ROOT, shared_model

ORIGINAL_SUITE = ROOT.parent / "shared" / "original-tests" / "test_app.py"
ORIGINAL_TESTS = {
    "test_health_check",
    "test_docs",
    "test_redoc",
    "test_predict_no_auth",
    "test_predict_bad_observations",
    "test_predict",
    "test_clients",
}


def test_the_original_suite_passes_as_it_is(tmp_path: Path) -> None:
    if not ORIGINAL_SUITE.is_file():
        pytest.skip(f"needs the original server's test suite: {ORIGINAL_SUITE} is absent")
    example = tmp_path / "examples" / "mouse_and_cheese"
    example.mkdir(parents=True)
    for name in ("schema.yaml", "saved_model.zip"):
        shutil.copyfile(shared_model("mouse_and_cheese") / name, example / name)
    report = tmp_path / "report.xml"
    env = os.environ | {
        # `import app` and `import generate` find ours; the package comes from the install.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONDONTWRITEBYTECODE": "1",
        "POLICY_SERVER_CACHE_DIR": str(tmp_path / "cache"),
        "POLICY_SERVER_METRICS_PORT": "0",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(ORIGINAL_SUITE),
            "--rootdir",
            str(tmp_path),
            "-p",
            "no:cacheprovider",
            "--junitxml",
            str(report),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    cases = ElementTree.parse(report).getroot().iter("testcase")
    passed = {
        case.get("name")
        for case in cases
        if not any(child.tag in {"failure", "error", "skipped"} for child in case)
    }
    assert passed == ORIGINAL_TESTS
    assert (tmp_path / "models" / "saved_model.pb").is_file(), "copy_server_files unzips"
