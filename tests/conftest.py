"""Test fixtures: every test gets a fresh registry and fresh process-wide settings.

Tests run on every backend usable here and skip the rest with the reason. GPU tests
are marked ``gpu`` / ``multi_gpu`` and skip by device count.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# JAX fixes its CPU device count when its backend starts, once per process: every JAX
# CPU test in the session sees 4 devices (tests that want one use only /cpu:0). Set
# before anything can import jax.
JAX_CPU_DEVICES = 4
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={JAX_CPU_DEVICES}"
    ).strip()

import pathlib
import threading
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

import pytest

import gpuvars_backends as backends
import gpuvars as gv
from gpuvars import config, placement

if TYPE_CHECKING:
    from fault_child import ForkServer

#: The checkout these tests belong to (tests/ lives in it).
CHECKOUT = pathlib.Path(__file__).resolve().parent.parent
#: Where this session imported the two packages from: an installed copy, or the checkout's
#: sources through an editable install.
GPUVARS_DIR = pathlib.Path(gv.__file__).resolve().parent
BACKENDS_DIR = pathlib.Path(backends.__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    # .ci/run tests the installed wheel: importing the checkout's sources instead is an error.
    if os.environ.get("GPUVARS_TEST_INSTALLED") == "1":
        for package in (GPUVARS_DIR, BACKENDS_DIR):
            if package.is_relative_to(CHECKOUT):
                raise pytest.UsageError(
                    f"GPUVARS_TEST_INSTALLED=1 but {package} is inside the checkout {CHECKOUT}: "
                    "run pytest from outside the checkout against an installed (non-editable) gpuvars"
                )


def pytest_sessionstart(session: pytest.Session) -> None:
    # Printed even under -q (a report header is not): which copy of the code is under test.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"gpuvars from {GPUVARS_DIR}; gpuvars_backends from {BACKENDS_DIR}")


def _gpu_count() -> tuple[int, str]:
    reasons = []
    for library in ("cupy", "jax"):
        probe = backends.probe(library, "gpu")
        if probe.usable:
            return probe.count, ""
        reasons.append(probe.reason)
    return 0, "; ".join(reasons)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wants_gpu = any(item.get_closest_marker("gpu") or item.get_closest_marker("multi_gpu") for item in items)
    if not wants_gpu:
        return
    count, reason = _gpu_count()
    for item in items:
        if item.get_closest_marker("gpu") and count < 1:
            item.add_marker(pytest.mark.skip(reason=f"needs a GPU: {reason}"))
        if item.get_closest_marker("multi_gpu") and count < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs 2+ GPUs, this machine has {count}: {reason}"))


@pytest.fixture(scope="session", autouse=True)
def _start_jax_with_four_cpus() -> None:
    """Start JAX (when installed) before any test could start it with another CPU count,
    e.g. through ``set_logical_devices("cpu", 2)`` on the JAX CPU backend."""
    if backends.installed("jax"):
        import jax

        jax.devices("cpu")


@pytest.fixture(autouse=True)
def fresh_state() -> Iterator[gv.Registry]:
    """An isolated registry and default settings for each test."""
    config._reset_for_tests()
    placement._reset_for_tests()
    with gv.Registry() as reg:
        yield reg
    config._reset_for_tests()
    placement._reset_for_tests()


def jax_usable() -> bool:
    return backends.installed("jax") and backends.probe("jax", "cpu").usable


needs_jax = pytest.mark.skipif(not backends.installed("jax"), reason="jax is not installed (pip install 'gpuvars[jax]')")


@pytest.fixture(params=["numpy", pytest.param("jax", marks=needs_jax)])
def cpu_backend(request: pytest.FixtureRequest) -> str:
    """Run the test once per CPU backend: numpy, and JAX's CPU devices when installed."""
    config.set_cpu_backend(request.param)
    return str(request.param)


@pytest.fixture(params=["numpy", pytest.param("jax", marks=needs_jax)])
def four_cpus(request: pytest.FixtureRequest) -> str:
    """Four logical CPU devices, served by numpy or by JAX's CPU devices."""
    config.set_cpu_backend(request.param)
    config.set_logical_devices("cpu", 4)
    try:
        gv.list_devices()
    except gv.DevicePlacementError as exc:  # JAX started elsewhere with fewer CPU devices
        pytest.skip(str(exc))
    return str(request.param)


def jax_device_of(array: object) -> object:
    """The one JAX device holding ``array``."""
    devices = array.devices()  # type: ignore[attr-defined]
    assert len(devices) == 1
    return next(iter(devices))


# --- a tensor larger than host memory (test_stformat.py, test_reader.py) ----------------------

HUGE = 2**40  # 1 TiB: more than any test machine's RAM + swap, well under ext4's 16 TiB file limit


def huge_file(path: pathlib.Path) -> pathlib.Path:
    """A structurally valid safetensors file holding one U8 tensor of HUGE bytes, as a sparse
    file (a few KiB on disk); skips where allocating HUGE bytes could succeed or the file
    system cannot hold it."""
    try:
        overcommit = pathlib.Path("/proc/sys/vm/overcommit_memory").read_text().strip()
        meminfo = dict(line.split(":", 1) for line in pathlib.Path("/proc/meminfo").read_text().splitlines())
    except OSError:
        pytest.skip("needs Linux /proc to know that a 1 TiB allocation fails here")
    total = sum(int(meminfo.get(k, "0 kB").split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))
    if overcommit == "1" or total >= HUGE:
        pytest.skip(f"a {HUGE}-byte allocation may succeed here (overcommit_memory={overcommit}, {total} bytes)")
    from gpuvars.checkpoint._stformat import layout

    prefix, _ = layout([("big", np.uint8, (HUGE,))])
    path.write_bytes(prefix)
    try:
        os.truncate(path, len(prefix) + HUGE)
    except OSError as exc:
        pytest.skip(f"no {HUGE}-byte sparse file here: {exc}")
    return path


# --- fault tests: case counts and the asynchronous save --------------------------------------------


def fault_cases(n: int) -> int:
    """``n`` cases for a fault test, times the factor of ``GPUVARS_LONG_FAULTS`` (the longer local
    mode): unset or 0 runs ``n``, 1 runs ``10 * n``, a larger integer k runs ``k * n``."""
    raw = os.environ.get("GPUVARS_LONG_FAULTS", "0").strip() or "0"
    try:
        factor = int(raw)
    except ValueError:
        raise pytest.UsageError(f"GPUVARS_LONG_FAULTS must be an integer, got {raw!r}") from None
    return n * (1 if factor <= 0 else 10 if factor == 1 else factor)


def has_async_save() -> bool:
    """Whether this gpuvars has ``Saver.save(..., blocking=False)``."""
    import inspect

    return "blocking" in inspect.signature(gv.Saver.save).parameters


needs_async_save = pytest.mark.skipif(not has_async_save(), reason="this gpuvars has no Saver.save(blocking=False) yet")


@pytest.fixture(scope="session")
def fork_server() -> Iterator["ForkServer"]:
    """tests/fault_child.py as a fork server: children for the fault tests in milliseconds."""
    from fault_child import ForkServer

    server = ForkServer()
    yield server
    server.close()


# --- GPU libraries and held saves (test_gpu*.py, test_async_save.py) ---------------------------


@pytest.fixture(params=["cupy", "jax"])
def gpu_lib(request: pytest.FixtureRequest) -> str:
    """Serve ``/gpu:N`` with CuPy, then with JAX; skip a library that sees no GPU."""
    library = str(request.param)
    probe = backends.probe(library, "gpu")
    if not probe.usable:
        pytest.skip(f"{library} cannot use a GPU here: {probe.reason}")
    config.set_gpu_backend(library)
    return library


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Hold every tensor write of a save until the event is set (the save is then 'in flight';
    the writer's batched runs of small tensors are held too)."""
    from gpuvars.checkpoint import _stformat

    release = threading.Event()
    for method in ("write", "write_run"):
        real = getattr(_stformat.SafetensorsWriter, method, None)
        if real is None:
            continue

        def held(self: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            assert release.wait(60), "the test never released the gate"
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(_stformat.SafetensorsWriter, method, held)
    yield release
    release.set()
