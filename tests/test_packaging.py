"""Packaging: the wheel holds every module, and the installed packages cannot be shadowed.

These tests run against whatever gpuvars this process imported (the installed wheel
under .ci/run); the checkout is found through this file's own path (tests/ is in it).
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
import textwrap
import types
import zipfile

import pytest

import gpuvars
import gpuvars_backends

CHECKOUT = pathlib.Path(__file__).resolve().parent.parent
WHEEL_TOOL = CHECKOUT / ".ci" / "wheel.py"


def _wheel_tool() -> types.ModuleType:
    if not (WHEEL_TOOL.is_file() and (CHECKOUT / "pyproject.toml").is_file()
            and (CHECKOUT / "gpuvars").is_dir() and (CHECKOUT / "backends").is_dir()):
        pytest.skip(f"no gpuvars source tree beside these tests (looked in {CHECKOUT})")
    spec = importlib.util.spec_from_file_location("gpuvars_ci_wheel", WHEEL_TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_wheel_holds_every_module_of_the_source_tree(tmp_path: pathlib.Path) -> None:
    tool = _wheel_tool()
    done = subprocess.run([sys.executable, str(WHEEL_TOOL), "build", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = tmp_path.glob("gpuvars-*.whl")
    expected = tool.expected_files()
    # The packages as they are today, so a broken listing cannot pass by finding nothing.
    for name in ("gpuvars/distribute/strategy.py", "gpuvars/checkpoint/saver.py", "gpuvars/py.typed",
                 "gpuvars_backends/__init__.py", "gpuvars_backends/numpy.py", "gpuvars_backends/py.typed"):
        assert name in expected
    assert tool.differences(wheel) == []


def test_the_wheel_check_sees_a_missing_module(tmp_path: pathlib.Path) -> None:
    tool = _wheel_tool()
    fake = tmp_path / "gpuvars-0-py3-none-any.whl"
    expected = tool.expected_files()
    with zipfile.ZipFile(fake, "w") as zf:
        for name, path in expected.items():
            if name != "gpuvars/distribute/values.py":
                zf.writestr(name, path.read_bytes())
        zf.writestr("backends/__init__.py", "")
    assert tool.differences(fake) == [
        "missing from the wheel: gpuvars/distribute/values.py",
        "in the wheel but not in the checkout: backends/__init__.py",
    ]


USER_SCRIPT = textwrap.dedent(
    """
    import os, sys
    here = os.path.dirname(os.path.abspath(__file__))
    assert os.path.abspath(sys.path[0]) == here, sys.path[0]
    import backends                       # the user's own: their package beats their module
    assert backends.WHOSE == "the user's package", backends.WHOSE

    import numpy as np
    import gpuvars as gv
    import gpuvars_backends

    v = gv.Variable(np.arange(3, dtype=np.float32), name="v")
    saver = gv.Saver([v])
    prefix = saver.save(os.path.join(here, "ckpt", "m"), global_step=1)
    v.assign(np.zeros(3, np.float32))
    saver.restore(prefix)
    assert v.numpy().tolist() == [0.0, 1.0, 2.0]
    assert sys.modules["backends"] is backends
    for module in (gv, gpuvars_backends):
        assert not os.path.abspath(module.__file__).startswith(here + os.sep), module.__file__
    print("ok", gv.__file__, gpuvars_backends.__file__)
    """
)


def test_a_users_own_backends_module_and_package_do_not_break_gpuvars(tmp_path: pathlib.Path) -> None:
    (tmp_path / "backends.py").write_text("WHOSE = \"the user's module\"\n")
    (tmp_path / "backends").mkdir()
    (tmp_path / "backends" / "__init__.py").write_text("WHOSE = \"the user's package\"\n")
    script = tmp_path / "train.py"
    script.write_text(USER_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok "), done.stdout


def test_the_array_layer_is_installed_as_gpuvars_backends_not_backends() -> None:
    assert gpuvars_backends.__name__ == "gpuvars_backends"
    table_modules = {module for module, _ in gpuvars_backends._TABLE.values()}
    assert table_modules == {"gpuvars_backends.numpy", "gpuvars_backends.jax", "gpuvars_backends.cupy"}
    assert type(gpuvars_backends.get("numpy", "cpu")).__module__ == "gpuvars_backends.numpy"


def test_both_packages_ship_py_typed() -> None:
    for package in (gpuvars, gpuvars_backends):
        assert (pathlib.Path(package.__file__).parent / "py.typed").is_file(), package.__name__
