"""The `policy-server` command. Its flags are generated from `Settings`, documented there."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only the standard library at import: main() imports the rest, so that a Ctrl-C at any
# moment of start-up is answered by its one line.
if TYPE_CHECKING:
    from policy_server.settings import Settings

_POSITIONAL = {"policy_path", "extra_policy_paths"}
_PATHS_HELP = (
    "a policy folder (schema.yaml beside saved_model.zip or model.onnx), a folder of "
    "policy folders, or a versioned repository PATH/<name>/<version>/; several may be given"
)


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    from policy_server.settings import Settings

    for name, info in Settings.model_fields.items():
        if name in _POSITIONAL:
            continue
        flag = "--" + name.replace("_", "-")
        default = info.get_default(call_default_factory=True)
        shown = "" if default in (None, "", False) or name.endswith("key") else default
        text = f"{info.description} (default: {shown})" if shown != "" else info.description
        if info.annotation is bool:
            parser.add_argument(flag, action="store_true", default=None, help=text)
        else:
            parser.add_argument(flag, default=None, help=text, metavar=name.upper())


def _command(commands: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help_text)
    parser.add_argument("policy_path", metavar="PATH", nargs="+", help=_PATHS_HELP)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from policy_server import __version__
    from policy_server.experience.cli import add_commands
    from policy_server.protocols.rest.sdks import GENERATORS

    parser = argparse.ArgumentParser(
        prog="policy-server", description="Serve reinforcement-learning policies over HTTP."
    )
    parser.add_argument("--version", action="version", version=f"policy-server {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_settings_flags(_command(commands, "serve", "serve the policies in PATH"))
    clients = _command(commands, "clients", "generate the client SDKs of the policy in PATH")
    clients.add_argument("--out", type=Path, required=True, help="folder for the SDKs")
    clients.add_argument(
        "--lang",
        action="append",
        choices=sorted(GENERATORS),
        help="a language to generate (repeatable); default: all",
    )
    _add_settings_flags(clients)
    ray_config = _command(
        commands, "ray-config", "write a Ray Serve config of the policy in PATH for serve deploy"
    )
    ray_config.add_argument(
        "--out", type=Path, default=Path("serve-config.yaml"), help="the file to write"
    )
    _add_settings_flags(ray_config)
    add_commands(commands)
    ui = commands.add_parser("ui", help="the Streamlit page to try a policy server")
    ui.add_argument("--ui-port", type=int, default=8501, help="port of the page")
    return parser


def settings_from(arguments: argparse.Namespace) -> Settings:
    """Flags given on the command line win over the environment, which wins over defaults."""
    from policy_server.settings import Settings

    given: dict[str, Any] = {
        name: value
        for name, value in vars(arguments).items()
        if name in Settings.model_fields and value is not None
    }
    paths = given.pop("policy_path", None)
    if paths:
        given["policy_path"], given["extra_policy_paths"] = paths[0], paths[1:]
    return Settings(**given)


def generate_clients(settings: Settings, out: Path, languages: list[str]) -> None:
    from policy_server.hosting.app import build_app
    from policy_server.logs import configure_logging
    from policy_server.protocols.rest.sdks import generate

    configure_logging(settings.log_level)
    document = build_app(settings.model_copy(update={"client_languages": ""})).openapi()
    started = time.perf_counter()

    def progress(language: str, index: int, total: int) -> None:
        elapsed = time.perf_counter() - started
        print(f"[{index}/{total}] generating the {language} client ({elapsed:.1f}s)", flush=True)

    for language, folder in generate(document, out, languages, progress, settings.java).items():
        print(f"{language}: {folder}")


def write_ray_config(settings: Settings, out: Path) -> None:
    import yaml

    from policy_server.hosting.ray_app import serve_config

    paths = ", ".join(str(path.resolve()) for path in settings.policy_paths)
    header = (
        f"# Ray Serve config for the policies in {paths}: one deployment per version.\n"
        f"# Deploy on a running Ray cluster (or KubeRay's RayService) with: serve deploy {out}\n"
        "# No key is written here: the API key comes from schema.yaml or from\n"
        "# POLICY_SERVER_API_KEY, the admin key from POLICY_SERVER_ADMIN_KEY (add them\n"
        "# under runtime_env.env_vars).\n"
    )
    out.write_text(header + yaml.safe_dump(serve_config(settings), sort_keys=False))
    print(f"wrote {out}")


# What the page imports beyond the server's own dependencies.
UI_MODULES = ("streamlit", "altair", "httpx")


def run_ui(port: int) -> int:
    """`streamlit run` on the page's module; needs the `ui` extra."""
    import importlib.util

    from policy_server.extras import missing_extra

    for module in UI_MODULES:
        if importlib.util.find_spec(module) is None:
            cause = ModuleNotFoundError(f"No module named {module!r}")
            print(f"policy-server: {missing_extra('ui', 'the page', cause=cause)}", file=sys.stderr)
            return 2
    page = importlib.util.find_spec("policy_server.ui.page")
    assert page is not None and page.origin is not None

    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        page.origin,
        "--server.port",
        str(port),
        # As .streamlit/config.toml says, for a page started from any folder.
        "--server.address",
        "127.0.0.1",
        "--server.fileWatcherType",
        "none",
        "--client.toolbarMode",
        "minimal",
        "--browser.gatherUsageStats",
        "false",
    ]
    return subprocess.call(command)


def main(argv: Sequence[str] | None = None) -> int:
    """The exit status: 0; 2 for a refused start; 130, as a shell reports a Ctrl-C, for an
    interrupted one. A refusal or an interruption is said in one line on stderr."""
    try:
        return _run_command(argv)
    except KeyboardInterrupt:
        given = sys.argv[1:] if argv is None else list(argv)
        command = next((word for word in given if not word.startswith("-")), None)
        # serve lets a Ctrl-C through only before it serves; once serving, it is a stop (0).
        what = " while starting; nothing is being served" if command == "serve" else ""
        print(f"policy-server: interrupted (Ctrl-C){what}", file=sys.stderr)
        return 130


def _run_command(argv: Sequence[str] | None) -> int:
    from pydantic import ValidationError

    from policy_server.errors import ClientsUnavailable, PolicyLoadError
    from policy_server.experience.cli import COMMANDS, run
    from policy_server.hosting.startup import PortUnavailable
    from policy_server.protocols.rest.sdks import GENERATORS

    arguments = build_parser().parse_args(argv)
    if arguments.command == "ui":
        return run_ui(arguments.ui_port)
    if arguments.command in COMMANDS:
        return run(arguments)
    try:
        settings = settings_from(arguments)
        if arguments.command == "serve":
            from policy_server.hosting.serve import serve

            serve(settings)
        elif arguments.command == "clients":
            generate_clients(settings, arguments.out, arguments.lang or sorted(GENERATORS))
        elif arguments.command == "ray-config":
            write_ray_config(settings, arguments.out)
    except ValidationError as error:
        print(f"policy-server: invalid setting: {error}", file=sys.stderr)
        return 2
    except PolicyLoadError as error:
        print(f"policy-server: cannot serve: {error}", file=sys.stderr)
        return 2
    except PortUnavailable as error:
        print(f"policy-server: cannot serve: {error}", file=sys.stderr)
        return 2
    except ClientsUnavailable as error:
        print(f"policy-server: {error.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
