"""The `policy-server` command. Its flags are generated from `Settings`, documented there."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from policy_server.errors import PolicyLoadError
from policy_server.settings import Settings

_POSITIONAL = {"policy_path"}


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, info in Settings.model_fields.items():
        if name in _POSITIONAL:
            continue
        flag = "--" + name.replace("_", "-")
        if info.annotation is bool:
            parser.add_argument(flag, action="store_true", default=None, help=info.description)
        else:
            parser.add_argument(flag, default=None, help=info.description, metavar=name.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policy-server", description="Serve reinforcement-learning policies over HTTP."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the policy in PATH")
    serve.add_argument(
        "policy_path", metavar="PATH", help=Settings.model_fields["policy_path"].description
    )
    _add_settings_flags(serve)
    return parser


def settings_from(arguments: argparse.Namespace) -> Settings:
    """Flags given on the command line win over the environment, which wins over defaults."""
    given: dict[str, Any] = {
        name: value
        for name, value in vars(arguments).items()
        if name in Settings.model_fields and value is not None
    }
    return Settings(**given)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        settings = settings_from(arguments)
        if arguments.command == "serve":
            from policy_server.server import serve

            serve(settings)
    except ValidationError as error:
        print(f"policy-server: invalid setting: {error}", file=sys.stderr)
        return 2
    except PolicyLoadError as error:
        print(f"policy-server: cannot serve: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
