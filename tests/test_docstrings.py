"""Every docstring example in the installed package runs and prints what it shows.

Collected here rather than by ``--doctest-modules``: public classes report
``__module__ == "gpuvars"``, which hides their methods from a per-module doctest search.
This walks every module of the installed package and every class and function reachable
from it, and keeps each example defined in a gpuvars file exactly once.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pathlib
import pkgutil
import tempfile
import types
from typing import Any

import pytest

import gpuvars

PACKAGE = pathlib.Path(gpuvars.__file__).resolve().parent


def _code_file(obj: Any) -> str | None:
    obj = getattr(obj, "fget", obj)  # a property: its getter
    obj = getattr(obj, "__func__", obj)  # a class- or staticmethod
    obj = getattr(obj, "__wrapped__", obj)  # a decorated function (contextmanager, ...)
    code = getattr(obj, "__code__", None)
    return code.co_filename if isinstance(code, types.CodeType) else None


class _Finder(doctest.DocTestFinder):
    """Decides "defined in this module" by the file the code lives in, not ``__module__``."""

    def _from_module(self, module: Any, object: Any) -> bool:  # noqa: A002 - doctest's name
        if module is None:
            return True
        here = getattr(module, "__file__", None)
        if isinstance(object, type):
            files = {f for f in map(_code_file, vars(object).values()) if f and not f.startswith("<")}
            if files:
                return here in files
            return bool(getattr(module, object.__name__, None) is object and object.__module__ in (module.__name__, "gpuvars"))
        found = _code_file(object)
        return found == here if found is not None else super()._from_module(module, object)


def _examples() -> list[doctest.DocTest]:
    finder = _Finder(exclude_empty=True)
    found: dict[tuple[str, int], doctest.DocTest] = {}
    names = ["gpuvars"] + [m.name for m in pkgutil.walk_packages([str(PACKAGE)], "gpuvars.")]
    for name in names:
        if name == "gpuvars.__main__":
            continue
        module = importlib.import_module(name)
        for test in finder.find(module, name):
            if test.examples:
                found.setdefault((test.filename or "", test.lineno or 0), test)
    return sorted(found.values(), key=lambda t: (t.filename or "", t.lineno or 0))


EXAMPLES = _examples()


def test_examples_were_found() -> None:
    names = {t.name.rsplit(".", 1)[-1] for t in EXAMPLES}
    assert len(EXAMPLES) >= 25 and {"Variable", "Saver", "load_checkpoint"} <= names


@pytest.mark.parametrize("test", EXAMPLES, ids=[f"{pathlib.Path(t.filename or '').name}:{t.name}" for t in EXAMPLES])
def test_docstring_example(test: doctest.DocTest) -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:  # an example never writes into the checkout
        os.chdir(folder)
        try:
            with gpuvars.Registry():
                result = runner.run(test, out=out.append, clear_globs=True)
        finally:
            os.chdir(cwd)
    assert result.failed == 0, "".join(out)
