"""The package's shape: no import cycle, no module shadowed by a function, the core/app
boundary (rich only in the CLI), and no reference to files outside the repository."""

from __future__ import annotations

import ast
from pathlib import Path

import mipp

SRC = Path(mipp.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every mipp module ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component larger than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 50 and "mipp.pipeline" in graph["mipp"]
    assert _cycles(graph) == []


def test_no_module_is_shadowed_by_a_function():
    """``mipp.prune`` and ``mipp.train`` are functions only (no mipp/prune.py, mipp/train.py)."""
    modules = _modules()
    for name in mipp.__all__:
        assert f"mipp.{name}" not in modules, f"mipp.{name} is both a module and an export"
    assert callable(mipp.prune) and callable(mipp.train)


def test_rich_is_used_only_by_the_command_line():
    users = {
        name
        for name, path in _modules().items()
        if "import rich" in path.read_text() or "from rich" in path.read_text()
    }
    assert users and all(name.startswith("mipp.cli") for name in users), sorted(users)


def test_nothing_points_outside_the_repository():
    root = SRC.parents[1]
    files = [*SRC.rglob("*.py"), root / "README.md", *root.glob("docs/*.md")]
    outside = "shared" + "/"  # the team's notes next to the checkout, not part of it
    for path in files:
        assert outside not in path.read_text(), f"{path} points outside the repository"
