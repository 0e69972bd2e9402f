"""Device specs become physical devices here, once, with TF's soft placement rules.

This process is ``/job:localhost/replica:0/task:0``. ``/cpu:N`` is served by the CPU
backend (numpy, or JAX's CPU devices), ``/gpu:N`` by the GPU backend (CuPy if usable,
else JAX). GPU libraries are imported only when a GPU device (or the default device,
or the device list) is first asked for.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings

import gpuvars_backends as backends
from gpuvars_backends import Backend
from gpuvars import config
from gpuvars.devices import DeviceSpec
from gpuvars.errors import DevicePlacementError, PlacementWarning

__all__ = ["PhysicalDevice", "default_device", "devices_of_platform", "host_device", "list_devices", "resolve"]


@dataclasses.dataclass(frozen=True, eq=False)
class PhysicalDevice:
    """One device of this process: ``kind`` ("cpu"/"gpu"), ``index`` and the backend serving it.

    There is exactly one instance per device, so identity is equality.
    """

    kind: str
    index: int
    backend: Backend
    #: the index the backend knows it by (numpy's logical devices all map to host 0)
    backend_index: int

    @property
    def name(self) -> str:
        """The short canonical name, e.g. ``/gpu:1``."""
        return f"/{self.kind}:{self.index}"

    @property
    def spec(self) -> DeviceSpec:
        """The full TF spec of this device."""
        return DeviceSpec(job="localhost", replica=0, task=0, device_type=self.kind.upper(), device_index=self.index)

    def __repr__(self) -> str:
        return f"PhysicalDevice({self.name}, backend={self.backend.name})"


class _Table:
    """The device table of this process, built lazily per platform and then fixed."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.cpus: list[PhysicalDevice] | None = None
        self.gpus: list[PhysicalDevice] | None = None
        self.gpu_reason = ""

    def cpu_devices(self) -> list[PhysicalDevice]:
        with self.lock:
            if self.cpus is None:
                config._freeze()
                self.cpus = _build_cpus()
            return self.cpus

    def gpu_devices(self) -> list[PhysicalDevice]:
        with self.lock:
            if self.gpus is None:
                # CPUs first: probing JAX's GPUs starts JAX, which fixes its CPU device count
                self.cpu_devices()
                self.gpus, self.gpu_reason = _build_gpus()
            return self.gpus


def _build_cpus() -> list[PhysicalDevice]:
    library = config.get_cpu_backend()
    logical = config.get_logical_devices()
    if library == "numpy":
        numpy_backend = backends.get("numpy", "cpu")
        return [PhysicalDevice("cpu", i, numpy_backend, 0) for i in range(logical or 1)]
    if logical is not None:
        backends.request_cpu_devices("jax", logical)
    probe = backends.probe("jax", "cpu")
    if probe.backend is None:
        raise DevicePlacementError(f"the CPU backend is set to 'jax' but JAX is not usable: {probe.reason}")
    if logical is None:
        return [PhysicalDevice("cpu", i, probe.backend, i) for i in range(probe.count)]
    if probe.count < logical:
        raise DevicePlacementError(
            f"set_logical_devices('cpu', {logical}) asks for {logical} JAX CPU devices, but JAX started "
            f"with {probe.count}; JAX fixes the count when it starts, so set it first "
            f"(XLA_FLAGS=--xla_force_host_platform_device_count={logical} before importing jax)"
        )
    return [PhysicalDevice("cpu", i, probe.backend, i) for i in range(logical)]


def _build_gpus() -> tuple[list[PhysicalDevice], str]:
    choice = config.get_gpu_backend()
    reasons = []
    for library in (choice,) if choice else ("cupy", "jax"):
        probe = backends.probe(library, "gpu")
        if probe.backend is not None:
            return [PhysicalDevice("gpu", i, probe.backend, i) for i in range(probe.count)], ""
        reasons.append(probe.reason)
    return [], "no GPU (" + "; ".join(reasons) + ")"


_table = _Table()


def list_devices() -> list[str]:
    """The devices of this process in canonical short form, CPUs first.

    Example:
        >>> import gpuvars as gv
        >>> gv.list_devices()[0]
        '/cpu:0'
    """
    return [d.name for d in _table.cpu_devices() + _table.gpu_devices()]


def default_device() -> PhysicalDevice:
    """Where a variable goes with no device asked for: ``/gpu:0`` if a GPU is usable, else ``/cpu:0``."""
    gpus = _table.gpu_devices()
    return gpus[0] if gpus else _table.cpu_devices()[0]


def _available(spec: DeviceSpec) -> tuple[PhysicalDevice | None, str]:
    """The device ``spec`` names, or None and why not."""
    if spec.job not in (None, "localhost") or spec.replica not in (None, 0) or spec.task not in (None, 0):
        return None, "it names another job, replica or task than this process (/job:localhost/replica:0/task:0)"
    dtype = spec.device_type
    if dtype is None:
        return default_device(), ""
    if dtype not in ("CPU", "GPU"):
        return None, f"device type {dtype!r} is not served by gpuvars (CPU and GPU are)"
    pool = _table.cpu_devices() if dtype == "CPU" else _table.gpu_devices()
    index = spec.device_index or 0
    if index < len(pool):
        return pool[index], ""
    if not pool:
        return None, _table.gpu_reason
    return None, f"this process has {len(pool)} {dtype} device(s)"


def resolve(spec: DeviceSpec | str | None, what: str = "a variable", stacklevel: int = 1) -> PhysicalDevice:
    """The physical device for ``spec`` (None: the default device), applying soft placement.

    Args:
        spec: a DeviceSpec, a device string, or None.
        what: the thing being placed, for messages (e.g. "variable 'w'").
        stacklevel: the frame a fallback warning points at: 1 is the caller of ``resolve``,
            2 its caller, and so on (so it can point at user code).

    Raises:
        DevicePlacementError: the device does not exist and soft placement is off.
    """
    if spec is None:
        return default_device()
    if isinstance(spec, str):
        spec = DeviceSpec.from_string(spec)
    with _table.lock:
        device, reason = _available(spec)
        if device is not None:
            return device
        existing = list_devices()
        if not config.get_soft_device_placement():
            raise DevicePlacementError(
                f"Could not satisfy device specification '{spec.short_string()}' for {what}: {reason}. "
                f"Soft placement is off (gv.config.set_soft_device_placement(True) would fall back). "
                f"Available devices: {existing}"
            )
        fallback = _fallback(spec)
    warnings.warn(
        # the message names the spec, not the variable: Python shows it once per spec and line
        f"Soft device placement: '{spec.short_string()}' is not available ({reason}); "
        f"using '{fallback.name}' instead. Available devices: {existing}",
        PlacementWarning,
        stacklevel=stacklevel + 1,
    )
    return fallback


def _fallback(spec: DeviceSpec) -> PhysicalDevice:
    """Keep the device type if any device of it exists (index 0); else the default device
    when no type was asked for (another job or task); else ``/cpu:0``."""
    if spec.device_type is None:
        return default_device()
    pool = _table.gpu_devices() if spec.device_type == "GPU" else _table.cpu_devices()
    return pool[0] if pool else _table.cpu_devices()[0]


def host_device() -> PhysicalDevice:
    """numpy on the host, outside the device table (fixes no setting, imports no GPU library)."""
    return PhysicalDevice("cpu", 0, backends.get("numpy", "cpu"), 0)


def devices_of_platform(platform: str) -> list[PhysicalDevice]:
    """This process's devices of ``platform`` ("cpu" or "gpu"), building the table if needed."""
    return _table.gpu_devices() if platform == "gpu" else _table.cpu_devices()


def _reset_for_tests() -> None:
    """Forget the device table (tests only; variables placed before keep their devices)."""
    global _table
    _table = _Table()
