"""Each extra brings what its code imports: from a fresh clone, a fresh virtual environment
per extra imports every module that extra serves; and without any extra, the code that needs
one says which `pip install` line and which `make` target bring it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.fresh import clean_env, fresh_clone, fresh_venv
from tests.servers import free_port

pytestmark = pytest.mark.extras

# What each extra serves, as the code that uses it: importing the modules is not enough
# where they import the extra's packages only when called.
SERVES = {
    "tensorflow": "from policy_server.runtime.tensorflow import import_tensorflow\n"
    "import_tensorflow()",
    "onnx": "from policy_server.runtime.onnx import import_onnxruntime\n"
    "import_onnxruntime()\n"
    "import onnx",  # tf2onnx imports TensorFlow: converting needs both (make serve's pair)
    "ui": "import policy_server.ui.page, policy_server.ui.client, policy_server.ui.backends",
    "clients": "import subprocess\n"
    "from policy_server.protocols.rest.sdks import find_java, generator_jar\n"
    "assert generator_jar().is_file()\n"
    "subprocess.run([find_java(), '-version'], check=True, capture_output=True)",
    "ray": "import policy_server.serving.ray_backend, policy_server.hosting.ray_app",
    "experience": "import pyarrow.parquet, minari, vowpalwabbit, gymnasium\n"
    "from minari.data_collector import EpisodeBuffer\n"
    "import policy_server.experience.export",
    "examples": "import gymnasium",
    "bench": "import litserve",
}


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fresh_clone(tmp_path_factory.mktemp("clone"))


@pytest.mark.parametrize("extra", sorted(SERVES))
def test_an_extra_brings_what_its_code_imports(extra: str, clone: Path, tmp_path: Path) -> None:
    bin_dir = fresh_venv(clone, tmp_path / "venv", extra)
    result = subprocess.run(
        [str(bin_dir / "python"), "-c", SERVES[extra]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    assert result.returncode == 0, f"the {extra} extra:\n{result.stderr[-4000:]}"


def test_without_extras_each_missing_one_says_how_to_install_it(
    clone: Path, tmp_path: Path
) -> None:
    bin_dir = fresh_venv(clone, tmp_path / "venv", "")
    env = clean_env(POLICY_SERVER_CACHE_DIR=str(tmp_path / "cache"))

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, cwd=clone, capture_output=True, text=True, timeout=300, env=env
        )

    assert run(str(bin_dir / "policy-server"), "--help").returncode == 0
    page = run(str(bin_dir / "policy-server"), "ui")
    assert page.returncode == 2
    assert page.stderr.strip() == (
        "policy-server: the page needs the ui extra (No module named 'streamlit'): "
        "pip install 'policy-server[ui]' (in a checkout: pip install -e '.[ui]', or make ui)"
    )
    served = run(
        str(bin_dir / "policy-server"),
        *("serve", "examples/cartpole", "--port", str(free_port()), "--metrics-port", "0"),
    )
    assert served.returncode == 2, served.stderr
    [line] = served.stderr.strip().splitlines()
    assert line.startswith("policy-server: cannot serve: serving a SavedModel needs the ")
    assert "pip install 'policy-server[tensorflow]'" in line and "make serve" in line
    for code, extra, target in (
        ("from policy_server.runtime.onnx import import_onnxruntime as f; f()", "onnx", "serve"),
        ("import policy_server.ui.client", "ui", "ui"),
        ("import policy_server.serving.ray_backend", "ray", "install"),
        (
            "from policy_server.protocols.rest.sdks import generator_jar as f; f()",
            "clients",
            "install",
        ),
    ):
        refused = run(str(bin_dir / "python"), "-c", code)
        assert refused.returncode == 1
        last = refused.stderr.strip().splitlines()[-1]
        assert f"pip install 'policy-server[{extra}]'" in last, last
        assert f"make {target}" in last, last
