"""The layers, checked on the code that is installed: imports flow one way, with no cycle.

The graph counts every import a module can run, lazy ones inside functions included;
only ``if TYPE_CHECKING:`` blocks (which never run) are left out. The package root
``gpuvars/__init__.py`` re-exports everything and imports nothing back, so it is not a
node: ``from gpuvars import config`` is an edge to ``gpuvars.config``.
"""

from __future__ import annotations

import ast
import pathlib

import gpuvars

PACKAGE = pathlib.Path(gpuvars.__file__).resolve().parent


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: pathlib.Path, module: str, known: set[str]) -> set[str]:
    """The gpuvars modules ``module`` can import at run time (lazy imports included)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & known  # `from pkg import submodule`
            found.update(subs or {base})
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    # a module's own packages are already being imported when it runs: not an edge
    ancestors = {module.rsplit(".", k)[0] for k in range(1, module.count(".") + 1)}
    return {m for m in found if m in known and m != "gpuvars" and m != module and m not in ancestors}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(p, m, known) for m, p in modules.items() if m != "gpuvars"}


def test_the_graph_sees_the_package() -> None:
    graph = _graph()
    assert {"gpuvars.variable", "gpuvars.distribute.values", "gpuvars.init_ops"} <= set(graph)
    assert "gpuvars.registry" in graph["gpuvars.init_ops"]  # a sanity check of the parser
    assert any(m.startswith("gpuvars.distribute") for m in graph["gpuvars.checkpoint._saveable"])


def test_no_import_cycle_among_gpuvars_modules() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_variable_imports_nothing_from_distribute_or_checkpoint() -> None:
    graph = _graph()
    low = ["gpuvars.variable", "gpuvars._surface", "gpuvars.init_ops", "gpuvars._transfer", "gpuvars._creator"]
    for module in low:
        bad = sorted(m for m in graph[module] if m.startswith(("gpuvars.distribute", "gpuvars.checkpoint")))
        assert not bad, f"{module} imports {bad}"
