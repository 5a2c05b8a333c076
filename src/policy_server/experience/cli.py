"""The `export-experience` and `evaluate` commands, for `policy-server`'s parser to include.

Wiring: `add_commands(subparsers)` in `build_parser`, then `run(arguments)` when
`arguments.command in COMMANDS`. `python -m policy_server.experience.cli` runs them alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from policy_server.errors import PolicyLoadError
from policy_server.experience.export import FORMATS

COMMANDS = ("export-experience", "evaluate")


def add_commands(commands: Any) -> None:
    """Add both commands to an `add_subparsers()` object."""
    _add_export(commands.add_parser("export-experience", help="export a decision log"))
    _add_evaluate(
        commands.add_parser("evaluate", help="estimate a candidate policy on a decision log")
    )


def _add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log_dir", metavar="LOG_DIR", type=Path, help="the --decision-log folder")
    parser.add_argument(
        "out",
        metavar="OUT",
        help="folder to write; for --format minari, the dataset id "
        "(e.g. policy-server/cartpole-v0), written under MINARI_DATASETS_PATH",
    )
    parser.add_argument("--format", choices=FORMATS, default="rllib", help="default: rllib")
    parser.add_argument(
        "--default-reward",
        type=float,
        default=None,
        help="reward for decisions that have none yet; without it they are left out, with "
        "the rest of their episode",
    )
    parser.add_argument("--policy", help="the policy to export when the log holds several")


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log_dir", metavar="LOG_DIR", type=Path, help="the --decision-log folder")
    parser.add_argument(
        "candidate", metavar="CANDIDATE", type=Path, help="policy folder to evaluate"
    )
    parser.add_argument("--policy", help="the logged policy to use when the log holds several")
    parser.add_argument("--gamma", type=float, default=1.0, help="discount (default 1)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(arguments: argparse.Namespace) -> int:
    """Run a command parsed by a parser that `add_commands` extended; the exit status."""
    try:
        if arguments.command == "export-experience":
            return _export(arguments)
        return _evaluate(arguments)
    except (ValueError, FileNotFoundError, ImportError, PolicyLoadError) as error:
        print(f"policy-server: {error}", file=sys.stderr)
        return 2


def _export(arguments: argparse.Namespace) -> int:
    from policy_server.experience.export import export_experience

    summary = export_experience(
        arguments.log_dir,
        arguments.out,
        arguments.format,
        arguments.default_reward,
        policy=arguments.policy,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _evaluate(arguments: argparse.Namespace) -> int:
    from policy_server.experience.candidate import PolicyCandidate
    from policy_server.experience.evaluation import evaluate
    from policy_server.loading.loader import load_policy
    from policy_server.settings import Settings

    policy = load_policy(Settings(policy_path=arguments.candidate))
    report = evaluate(
        arguments.log_dir,
        PolicyCandidate(policy),
        policy=arguments.policy,
        gamma=arguments.gamma,
        bootstrap=arguments.bootstrap,
        seed=arguments.seed,
    )
    print(json.dumps(report, indent=2) if arguments.json else format_report(report))
    return 0


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"policy {report['policy']}: {report['n']} episodes, {report['decisions']} decisions, "
        f"effective sample size {report['ess']:.1f}",
        f"{'logged':<8}{report['logged_value']:>10.4f}",
    ]
    for name, result in report["estimators"].items():
        if result is None:
            lines.append(f"{name:<8}{'n/a':>10}")
        elif result["ci_low"] is None:
            lines.append(f"{name:<8}{result['estimate']:>10.4f}")
        else:
            lines.append(
                f"{name:<8}{result['estimate']:>10.4f}  "
                f"[{result['ci_low']:.4f}, {result['ci_high']:.4f}]"
            )
    lines += [f"warning: {warning}" for warning in report["warnings"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="policy-server")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
