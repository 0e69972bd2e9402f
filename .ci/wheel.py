"""Build gpuvars' wheel from a clean copy of the checkout, and check a wheel against it.

    python .ci/wheel.py build OUTDIR    # prints the wheel's path
    python .ci/wheel.py check WHEEL     # exit 1, with the differences, unless WHEEL holds
                                        # exactly the checkout's modules, byte for byte

The build copies the checkout first (no .git, virtual environments, build outputs or
caches): setuptools builds in the source folder and packs whatever an old ``build/``
still holds, so an in-place build can ship a module deleted since. It uses this
interpreter's setuptools when that is new enough (>= 77, offline and fast), else pip's
isolated build environment (which needs the package index).

The check is what "the wheel cannot forget a module" means: every ``*.py`` under
``gpuvars/`` and ``backends/`` (installed as ``gpuvars_backends/``) plus both ``py.typed``
files, identical to the checkout's, and nothing else besides the ``.dist-info``.
Used by .ci/run (through tests/test_packaging.py) and bench/gpu.sh. Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: source folder -> the package it installs as
PACKAGES = {"gpuvars": "gpuvars", "backends": "gpuvars_backends"}
SKIP = (".git", ".venv*", "venv", "build", "dist", ".whl", "*.egg-info", "__pycache__", "*.pyc",
        ".mypy_cache", ".pytest_cache", ".hypothesis", "ckpt", "results")


def expected_files(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """Path inside the wheel -> the checkout's file it must equal."""
    files: dict[str, pathlib.Path] = {}
    for folder, package in PACKAGES.items():
        base = root / folder
        if not (base / "__init__.py").is_file():
            raise FileNotFoundError(f"{base} is not a package folder of a gpuvars checkout")
        for path in sorted([*base.rglob("*.py"), base / "py.typed"]):
            if "__pycache__" not in path.parts:
                files[f"{package}/{path.relative_to(base).as_posix()}"] = path
    return files


def _setuptools_is_recent() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


def build(outdir: pathlib.Path) -> pathlib.Path:
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpuvars-wheel-") as tmp:
        src = pathlib.Path(tmp) / "src"
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*SKIP))
        dist = pathlib.Path(tmp) / "dist"
        cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), str(src)]
        if _setuptools_is_recent():
            cmd.insert(-1, "--no-build-isolation")
        done = subprocess.run(cmd, check=False)
        if done.returncode != 0:
            raise SystemExit(f"wheel.py: building the wheel failed: {' '.join(cmd)} exited with {done.returncode}")
        (wheel,) = dist.glob("gpuvars-*.whl")
        target = outdir / wheel.name
        shutil.copyfile(wheel, target)
    return target


def differences(wheel: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    """What is wrong with ``wheel`` against the checkout at ``root`` (empty: nothing)."""
    expected = expected_files(root)
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if not n.split("/", 1)[0].endswith(".dist-info")]
        problems = [f"missing from the wheel: {n}" for n in sorted(set(expected) - set(names))]
        problems += [f"in the wheel but not in the checkout: {n}" for n in sorted(set(names) - set(expected))]
        for name in sorted(set(names) & set(expected)):
            if hashlib.sha256(zf.read(name)).digest() != hashlib.sha256(expected[name].read_bytes()).digest():
                problems.append(f"differs from the checkout's {expected[name].relative_to(root)}: {name}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build the wheel into OUTDIR").add_argument("outdir", type=pathlib.Path)
    sub.add_parser("check", help="compare WHEEL with the checkout").add_argument("wheel", type=pathlib.Path)
    args = ap.parse_args(argv)
    if args.command == "build":
        wheel = build(args.outdir)
        problems = differences(wheel)
        print(wheel)
    else:
        problems = differences(args.wheel)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
