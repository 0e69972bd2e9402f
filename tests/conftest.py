"""Test fixtures: every test gets a fresh registry and fresh process-wide settings.

Tests run on every backend usable here and skip the rest with the reason. GPU tests
are marked ``gpu`` / ``multi_gpu`` and skip by device count.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from typing import Iterator

import pytest

import backends
import gpuvars as gv
from gpuvars import config, placement


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
    if request.param == "jax" and len(gv.list_devices()) < 4:
        pytest.skip("JAX was started with fewer than 4 CPU devices in this process")
    return str(request.param)
