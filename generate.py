"""The original's file commands: `python generate.py copy_server_files DIR | unzip | clean`.

`from generate import CLI` gives the same commands, called on `CLI` itself as the original's
test suite does: `CLI.copy_server_files("examples/mouse_and_cheese")`.
"""

import sys

import fire

from policy_server.errors import PolicyLoadError
from policy_server.loading.commands import PolicyFiles

CLI = PolicyFiles()

if __name__ == "__main__":
    try:
        fire.Fire(CLI)
    except PolicyLoadError as error:
        print(f"generate.py: {error}", file=sys.stderr)
        raise SystemExit(2) from None
