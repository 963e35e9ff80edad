"""The package's layout, as docs/design.md describes it: small modules, no import circle, and the
simulated card's private parts (device/sim/) used by the simulated card alone."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "batchfit"
MAX_LINES = 350


def _modules() -> dict[str, Path]:
    """'batchfit.device.sim.tracker' -> its path, for every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path) -> set[str]:
    """The batchfit modules `path` imports, at any depth of its code (a lazy import counts)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("batchfit"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("batchfit"))
    return names


def test_no_module_over_350_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_only_the_simulated_card_uses_its_private_parts():
    users = {
        name
        for name, path in _modules().items()
        if any(i.startswith("batchfit.device.sim.") for i in _imports(path))
        and not (name + ".").startswith("batchfit.device.sim.")
    }
    assert users == {"batchfit.device.simulated"}


def test_no_import_circle_between_modules():
    modules = _modules()
    graph = {name: {i for i in _imports(path) if i in modules and i != name} for name, path in modules.items()}
    # A package's __init__ re-exports its parts: an edge into a package is an edge to the parts it names.
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for nxt in graph[name]:
            if state.get(nxt) == "open" and not name.startswith(nxt + "."):
                raise AssertionError(" -> ".join([*trail, name, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
