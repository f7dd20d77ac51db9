"""The package's shape: a dozen roles at the top, and imports that only go down.

A module may import its own package and any package of a lower layer, never a higher
one (a lower floor reaching up is how the `oci` layer came to read the environment).
Imports under `if TYPE_CHECKING:` name types only and are not counted; `__main__`
modules are entry points and may import the command layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import exec_sandbox_assets

PACKAGE = Path(exec_sandbox_assets.__file__).parent

# Lowest first. `__init__` is the public API on top of the library.
LAYERS: dict[str, int] = {
    "base": 0,
    "oci": 1,
    "release": 2,
    "config": 3,
    "cache": 3,
    "sources": 4,
    "client": 5,
    "mirror": 6,
    "publish": 6,
    "compat": 7,
    "__init__": 7,
    "cli": 8,
}


def _unit(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _runtime_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, top-level unit) of each import of the package outside TYPE_CHECKING."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] != "exec_sandbox_assets":
                continue
            if len(parts) > 1:
                found.append((node.lineno, parts[1]))
            else:  # `from exec_sandbox_assets import x`: x is a unit or a public name
                for alias in node.names:
                    unit = alias.name if alias.name in LAYERS else "__init__"
                    found.append((node.lineno, unit))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "exec_sandbox_assets" and len(parts) > 1:
                    found.append((node.lineno, parts[1]))
    return found


def test_the_top_level_holds_at_most_twelve_roles() -> None:
    entries = sorted(
        p.name
        for p in PACKAGE.iterdir()
        if p.name not in {"py.typed", "__pycache__"} and not p.name.endswith(".egg-info")
    )
    assert len(entries) <= 12, entries
    assert {e.removesuffix(".py") for e in entries} == set(LAYERS), entries


def test_no_module_imports_a_higher_layer() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _unit(path)
        if path.name == "__main__.py":
            continue
        for line, unit in _runtime_imports(ast.parse(path.read_text())):
            if unit != own and LAYERS[unit] > LAYERS[own]:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({own}) imports {unit}")
    assert not wrong, "\n".join(wrong)


def test_the_base_layer_imports_nothing_of_the_project_above_it() -> None:
    for path in (PACKAGE / "base").glob("*.py"):
        units = {unit for _, unit in _runtime_imports(ast.parse(path.read_text()))}
        assert units <= {"base"}, (path.name, units)
