"""The package's import graph follows the layer table of ARCHITECTURE.md: a module imports only
from its own layer or below, and no chain of imports (function-local ones included) comes back
to where it started."""

from __future__ import annotations

import ast
from pathlib import Path

import cnnkit

PACKAGE = Path(cnnkit.__file__).parent
LAYERS = {  # top-level module or subpackage of cnnkit -> layer (ARCHITECTURE.md)
    "errors": 1,
    "fileio": 1,
    "config": 1,
    "recipes": 1,
    "modelfile": 1,
    "data": 2,
    "models": 2,
    "tasks": 2,
    "engine": 3,
    "evaluation": 4,
    "deploy": 4,
    "run": 5,
    "prepare": 5,
    "tune": 5,
    "study": 5,
    "space": 1,
    "cli": 6,
    "__main__": 6,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """cnnkit modules ``path`` imports anywhere in it (function-local imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1]])
                base = f"{base}.{node.module}" if node.module else base
            # `from cnnkit import data` imports the subpackage cnnkit.data; `from cnnkit.x
            # import f` imports the module cnnkit.x
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in modules else base)
    return {m for m in found if m == "cnnkit" or m.startswith("cnnkit.")}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for imported in _imports(path, name, set(files)):
            while imported not in files and "." in imported:
                imported = imported.rpartition(".")[0]  # a name inside a module
            if imported in files and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _layer(module: str) -> int:
    if module == "cnnkit":
        return 1  # __init__: the version and lazy public names
    return LAYERS[module.split(".")[1]]


def test_every_module_has_a_layer():
    assert all(_layer(m) for m in _graph())


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [
        f"{src} (layer {_layer(src)}) imports {dst} (layer {_layer(dst)})"
        for src, targets in _graph().items()
        for dst in targets
        if _layer(dst) > _layer(src) and src != "cnnkit"
    ]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    graph["cnnkit"] = set()  # __init__ names its exports as strings, imported on first use
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_graph_sees_function_local_imports(tmp_path):
    """The walker is not blind to imports inside functions (where cycles used to hide)."""
    assert "cnnkit.run" in _graph()["cnnkit.cli.train"]
