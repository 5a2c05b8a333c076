"""The package's folders are its layers: each imports only from its own layer or below, and no
module imports another in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "policy_server"

# Top to bottom. Modules at the package's top level (settings, errors, logs, metrics) are the
# foundation every layer may use.
LAYERS = {
    "hosting": 6,
    "ui": 6,
    "protocols": 5,
    "serving": 4,
    "experience": 3,
    "loading": 2,
    "policy": 1,
    "runtime": 1,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def imports(path: Path, *, module_level_only: bool) -> set[str]:
    """The policy_server modules `path` imports: those run at import time, or also those
    inside functions. Imports under `if TYPE_CHECKING:` never run and are left out."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
                visit(node.orelse)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("policy_server"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if base.startswith("policy_server"):
                    found.update({base} | {f"{base}.{a.name}" for a in node.names})
            elif not module_level_only or isinstance(node, ast.If | ast.Try | ast.With):
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.stmt):
                        visit([child])
                    else:
                        visit([n for n in ast.walk(child) if isinstance(n, ast.stmt)])

    visit(ast.parse(path.read_text()).body)
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_every_import_goes_to_the_same_layer_or_below() -> None:
    known = modules()
    upward = [
        f"{name} imports {target}"
        for name, path in known.items()
        for target in imports(path, module_level_only=False) & known.keys()
        if layer(target) > layer(name)
    ]
    assert upward == []


def test_nothing_below_hosting_imports_it() -> None:
    known = modules()
    offenders = [
        f"{name} imports {target}"
        for name, path in known.items()
        if not name.startswith(("policy_server.hosting", "policy_server.ui"))
        for target in imports(path, module_level_only=False)
        if target.startswith("policy_server.hosting")
    ]
    assert offenders == []


@pytest.mark.parametrize("module_level_only", [True, False], ids=["at-import", "anywhere"])
def test_no_import_cycle(module_level_only: bool) -> None:
    known = modules()
    graph = {
        name: (imports(path, module_level_only=module_level_only) & known.keys()) - {name}
        for name, path in known.items()
    }
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
