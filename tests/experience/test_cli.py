"""The commands as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from policy_server.experience.cli import main
from tests.experience.test_evaluation import CANDIDATE, log_bandit, policy_folder

ROOT = Path(__file__).resolve().parents[2]


def test_evaluate_prints_the_json_report(tmp_path: Path) -> None:
    log_bandit(tmp_path / "log", 200, seed=1)
    policy_folder(tmp_path / "candidate", *CANDIDATE)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "policy_server.experience.cli",
            "evaluate",
            str(tmp_path / "log"),
            str(tmp_path / "candidate"),
            "--json",
            "--bootstrap",
            "50",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "POLICY_SERVER_CACHE_DIR": str(tmp_path / "cache")},
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["n"] == 200
    assert list(report["estimators"]) == ["ips", "snips", "wis", "dr"]
    assert set(report["estimators"]["dr"]) == {"estimate", "ci_low", "ci_high"}
    assert report["ess"] > 0 and "logged_value" in report


def test_evaluate_prints_a_table_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_bandit(tmp_path / "log", 100, seed=1)
    policy_folder(tmp_path / "candidate", *CANDIDATE)
    code = main(
        ["evaluate", str(tmp_path / "log"), str(tmp_path / "candidate"), "--bootstrap", "20"]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("policy bandit: 100 episodes, 100 decisions")
    assert [line.split()[0] for line in lines[1:6]] == ["logged", "ips", "snips", "wis", "dr"]


def test_export_writes_and_summarises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log_bandit(tmp_path / "log", 30, seed=1)
    assert main(["export-experience", str(tmp_path / "log"), str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "rllib" and summary["steps"] == 30
    assert len(Path(summary["out"]).read_text().splitlines()) == 30


def test_a_missing_log_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export-experience", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "no such decision-log directory" in capsys.readouterr().err
