"""Layering: code outside ``gpuvars/variable.py`` never touches a Variable's private fields.

Upper floors reach variables through small contracts (STYLE 18, DESIGN decision 22): the
checkpoint package through its saveable adapters and the engine access functions at the
end of variable.py (``restore_target``, ``adopt``, ``install``, ``invalidate``), never
``var._storage`` and friends. The scan is by name with ``ast``: an attribute access
``X.<name>`` (or ``getattr(X, "<name>")``) where ``<name>`` is one of Variable's private
names. ``self.<name>`` inside a class that is not a Variable subclass is that class's own
field and is allowed.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import gpuvars
from gpuvars._operators import ReadOperators
from gpuvars._surface import VariableSurface
from gpuvars.variable import Variable

PACKAGE = Path(gpuvars.__file__).resolve().parent

# The folders (relative to gpuvars/) whose modules are scanned: the whole package, and
# each subpackage on its own so a failure names its floor.
SCANNED_FOLDERS = [".", "checkpoint", "distribute"]
EXEMPT_MODULES = {"variable.py"}  # the owner of the fields


def variable_private_names() -> set[str]:
    """Variable's ``__slots__`` and its own attributes that start with a single underscore,
    less the hooks the shared surface declares (``_known_shape``, ``_init_plans``,
    ``_write``, ...): those are the protocol every kind of variable implements and the
    init ops and distributed variables call, not Variable's private state."""
    names = set(getattr(Variable, "__slots__", ())) | set(vars(Variable))
    hooks = set(vars(VariableSurface)) | set(vars(ReadOperators))
    return {n for n in names if n.startswith("_") and not n.startswith("__") and n not in hooks}


def modules_in(folders: list[str]) -> list[Path]:
    """The modules under ``folders`` (``__main__`` left out: importing it runs the CLI)."""
    out: set[Path] = set()
    for folder in folders:
        root = (PACKAGE / folder).resolve()
        out.update(p for p in root.rglob("*.py")
                   if not (p.name in EXEMPT_MODULES and p.parent == PACKAGE) and p.name != "__main__.py")
    return sorted(out)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _variable_classes(path: Path) -> set[str]:
    """Names of the classes defined in ``path`` that subclass Variable (their ``self`` is one)."""
    module = importlib.import_module(_module_name(path))
    return {name for name, obj in vars(module).items()
            if inspect.isclass(obj) and obj.__module__ == module.__name__ and issubclass(obj, Variable)}


def private_accesses(source: str, where: str, private: set[str], variable_classes: set[str]) -> list[str]:
    """``where:line: code`` for every access of one of ``private`` in ``source``;
    ``variable_classes`` are the names of the classes there that subclass Variable."""
    found: list[str] = []

    def visit(node: ast.AST, own_class: bool) -> None:
        if isinstance(node, ast.ClassDef):
            own_class = node.name not in variable_classes
        name = None
        if isinstance(node, ast.Attribute) and node.attr in private:
            is_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if not (is_self and own_class):
                name = node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in private):
            name = str(node.args[1].value)
        if name is not None:
            found.append(f"{where}:{getattr(node, 'lineno', 0)}: {ast.unparse(node)}")
        for child in ast.iter_child_nodes(node):
            visit(child, own_class)

    visit(ast.parse(source, filename=where), False)
    return found


def test_the_private_names_are_found() -> None:
    names = variable_private_names()
    assert {"_storage", "_backend", "_device", "_dtype", "_set_storage", "_install",
            "_mark_uninitialized", "_restore_buffer", "_materialize"} <= names
    assert "_known_shape" not in names  # a surface hook, not a private field
    assert not any(n.startswith("__") for n in names)


def test_the_scan_finds_what_it_should() -> None:
    source = (
        "class Other:\n"
        "    def f(self, var):\n"
        "        self._storage = 1\n"  # its own field: allowed
        "        var._storage\n"  # a variable's: found
        "        getattr(var, '_device')\n"  # found
        "        var.value()\n"
        "class Sub(Variable):\n"
        "    def g(self):\n"
        "        return self._backend\n"  # a Variable subclass's self: found
        "def h(v):\n"
        "    return v._pending_shape, v.shape\n"
    )
    found = private_accesses(source, "sample.py", variable_private_names(), {"Sub"})
    assert [f.split(": ", 1)[1] for f in found] == [
        "var._storage", "getattr(var, '_device')", "self._backend", "v._pending_shape"]


@pytest.mark.parametrize("folder", SCANNED_FOLDERS)
def test_no_module_touches_a_variables_private_fields(folder: str) -> None:
    private = variable_private_names()
    found = [
        hit
        for path in modules_in([folder])
        for hit in private_accesses(path.read_text(), str(path.relative_to(PACKAGE.parent)), private,
                                    _variable_classes(path))
    ]
    assert found == [], "Variable's private fields used outside variable.py (use the saveable adapters "\
        "and gpuvars.variable's restore_target/adopt/install/invalidate):\n  " + "\n  ".join(found)
