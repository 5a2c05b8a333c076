"""Start-up refuses broken policies with a message a user can act on."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.policies import EXAMPLE, ROOT, shared_model


def serve(folder: Path, cache: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "policy_server.hosting.cli",
            "serve",
            str(folder),
            "--port",
            "1",
            "--cache-dir",
            str(cache),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )


def copy_example(tmp_path: Path, schema: str | None = None) -> Path:
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "saved_model.zip").write_bytes((EXAMPLE / "saved_model.zip").read_bytes())
    (folder / "schema.yaml").write_text(schema or (EXAMPLE / "schema.yaml").read_text())
    return folder


@pytest.mark.models
def test_lpoc_is_refused_naming_both_widths(tmp_path: Path) -> None:
    result = serve(shared_model("lpoc"), tmp_path)
    assert result.returncode == 2
    assert "schema.yaml describes 11 observation values but the model takes 14" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ("observations: {a: {type: str}}\nparameters: {}\n", "unknown type 'str'"),
        ("observations: {a: {type: float}}\n", "'parameters' is missing"),
        ("- just a list\n", "must be a mapping"),
        ("observations: {a: {type: float}}\nparameters: {api_key: k}\n", "describes 1 observation"),
    ],
)
def test_broken_schema_is_refused_at_start(tmp_path: Path, schema: str, message: str) -> None:
    result = serve(copy_example(tmp_path, schema), tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_api_key_is_refused_unless_no_auth(tmp_path: Path) -> None:
    schema = (EXAMPLE / "schema.yaml").read_text().replace('api_key: "cartpole-demo-key"', "")
    result = serve(copy_example(tmp_path, schema), tmp_path)
    assert result.returncode == 2
    assert "no API key configured" in result.stderr and "--no-auth" in result.stderr


def test_broken_archive_and_missing_model_are_refused(tmp_path: Path) -> None:
    folder = copy_example(tmp_path)
    (folder / "saved_model.zip").write_bytes(b"garbage")
    result = serve(folder, tmp_path)
    assert result.returncode == 2 and "not a valid zip archive" in result.stderr
    with zipfile.ZipFile(folder / "saved_model.zip", "w") as bundle:
        bundle.writestr("readme.txt", "no model here")
    result = serve(folder, tmp_path)
    assert result.returncode == 2 and "not a SavedModel" in result.stderr
    (folder / "saved_model.zip").unlink()
    result = serve(folder, tmp_path)
    assert result.returncode == 2
    expected = "a policy folder holds schema.yaml beside saved_model.zip (or model.onnx"
    assert result.stderr.strip().splitlines() == [
        f"policy-server: cannot serve: {folder}: has schema.yaml but no model; {expected}, or "
        "an unzipped SavedModel: saved_model.pb)"
    ]
    result = serve(tmp_path / "nowhere", tmp_path)
    assert result.returncode == 2 and "no such folder" in result.stderr


def test_a_policy_folder_without_schema_names_both_files(tmp_path: Path) -> None:
    folder = tmp_path / "exported"
    folder.mkdir()
    shutil.copy(EXAMPLE / "saved_model.zip", folder)
    result = serve(folder, tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line == (
        f"policy-server: cannot serve: {folder}: has saved_model.zip but no schema.yaml; a "
        "policy folder holds schema.yaml beside saved_model.zip (or model.onnx, or an unzipped "
        "SavedModel: saved_model.pb)"
    )
    (folder / "saved_model.zip").unlink()
    result = serve(folder, tmp_path)
    assert result.returncode == 2
    assert "holds no policy; expected PATH/schema.yaml beside PATH/saved_model.zip" in result.stderr
