"""Import hygiene: ``import gpuvars`` stays light and the layers import one way only.

The checks that look at ``sys.modules`` run in a fresh interpreter: this test process
has already imported jax (conftest starts it). The source scans read the files of the
packages this process imported (the installed copy under .ci/run).
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

import gpuvars
import gpuvars_backends

GPUVARS_DIR = pathlib.Path(gpuvars.__file__).resolve().parent
BACKENDS_DIR = pathlib.Path(gpuvars_backends.__file__).resolve().parent
GPU_LIBRARIES = ("cupy", "cupyx", "jax", "jaxlib")


def _fresh_python(code: str) -> dict[str, bool]:
    """Run ``code`` in a new interpreter; it prints a JSON dict of library -> imported.

    The child has this process's interpreter, environment and working directory, so it
    imports the same gpuvars.
    """
    script = code + (
        "\nimport json, sys\n"
        f"print(json.dumps({{lib: lib in sys.modules for lib in {GPU_LIBRARIES!r}}}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, bool] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_import_gpuvars_imports_no_gpu_library() -> None:
    imported = _fresh_python("import gpuvars")
    assert imported == {lib: False for lib in GPU_LIBRARIES}


def test_import_backends_imports_no_gpu_library() -> None:
    imported = _fresh_python("import gpuvars_backends, gpuvars_backends.numpy, gpuvars_backends._util")
    assert imported == {lib: False for lib in GPU_LIBRARIES}


def test_host_variables_on_cpu0_never_import_a_gpu_library() -> None:
    # An explicit /cpu:0 placement needs no GPU probe, and host updates ask no other library.
    code = (
        "import numpy as np, gpuvars as gv\n"
        "v = gv.Variable(np.zeros((4, 2), np.float32), name='v', device='/cpu:0')\n"
        "v.assign(np.ones((4, 2))); v.assign_add([[1.0, 2.0]] * 4); v.assign_sub(1.0 * np.ones((4, 2)))\n"
        "v.scatter_add([0, 0], np.ones((2, 2), np.float32)); v.numpy(); np.asarray(v)\n"
        "assert float(v.numpy()[0, 0]) == 3.0\n"
    )
    assert _fresh_python(code) == {lib: False for lib in GPU_LIBRARIES}


def test_owner_of_imports_nothing() -> None:
    code = (
        "import numpy as np, gpuvars_backends as backends\n"
        "assert backends.owner_of([1, 2]) is None and backends.owner_of(3.0) is None\n"
        "assert backends.owner_of(np.zeros(2)).name == 'numpy'\n"
    )
    assert _fresh_python(code) == {lib: False for lib in GPU_LIBRARIES}


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            names.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return names


BACKEND_FILES = sorted(BACKENDS_DIR.glob("*.py"))
ENGINE_FILES = sorted(GPUVARS_DIR.rglob("*.py"))


@pytest.mark.parametrize("path", BACKEND_FILES, ids=lambda p: p.name)
def test_backends_never_import_gpuvars(path: pathlib.Path) -> None:
    offending = {m for m in _imported_modules(path) if m == "gpuvars" or m.startswith("gpuvars.")}
    assert not offending, f"{path} imports {sorted(offending)}: gpuvars_backends knows nothing of gpuvars"


def test_importing_every_backend_module_imports_no_gpuvars() -> None:
    # What the scan above cannot see (an import built at run time): the modules as Python runs them.
    modules = ["gpuvars_backends"] + [
        f"gpuvars_backends.{p.stem}"
        for p in BACKEND_FILES
        # jax_distributed needs jax as jax does
        if p.stem != "__init__"
        and ((lib := p.stem.split("_")[0]) not in ("cupy", "jax") or gpuvars_backends.installed(lib))
    ]
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'gpuvars' or m.startswith('gpuvars.'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("path", ENGINE_FILES, ids=lambda p: str(p.relative_to(GPUVARS_DIR.parent)))
def test_engine_reaches_gpu_libraries_only_through_backends(path: pathlib.Path) -> None:
    roots = {m.partition(".")[0] for m in _imported_modules(path)}
    assert not roots & set(GPU_LIBRARIES), f"{path} imports {sorted(roots & set(GPU_LIBRARIES))}"


def test_the_scan_sees_the_packages() -> None:
    assert len(BACKEND_FILES) >= 5 and any(p.name == "variable.py" for p in ENGINE_FILES)
