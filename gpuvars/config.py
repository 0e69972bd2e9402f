"""Process-wide settings: soft placement, GPU/CPU backend choice, logical devices, transfer guard.

Device-shaping settings (backends, logical devices) freeze at the first placement or
``list_devices()`` so no variable ever sees the device table change under it; scoped
settings (the transfer guard) live in a ContextVar and restore what they replaced.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from typing import Iterator

from gpuvars.errors import InvalidArgumentError

__all__ = [
    "get_cpu_backend",
    "get_gpu_backend",
    "get_logical_devices",
    "get_soft_device_placement",
    "get_transfer_guard",
    "set_cpu_backend",
    "set_gpu_backend",
    "set_logical_devices",
    "set_soft_device_placement",
    "transfer_guard",
]

_GPU_BACKENDS = ("cupy", "jax")
_CPU_BACKENDS = ("numpy", "jax")
_GUARDS = ("allow", "log", "disallow")

_lock = threading.Lock()
_soft_placement = True
_UNSET = "unset"
_gpu_backend: str | None = _UNSET  # never set: env GPUVARS_GPU_BACKEND; None = auto (CuPy, else JAX)
_cpu_backend: str | None = None  # None = env GPUVARS_CPU_BACKEND, else numpy
_logical_cpus: int | None = None
_frozen = False
_guard: contextvars.ContextVar[str] = contextvars.ContextVar("gpuvars_transfer_guard", default="allow")


def set_soft_device_placement(enabled: bool) -> None:
    """Turn soft placement on (the default) or off.

    On: a request for a device this process lacks falls back (``/gpu:N`` -> ``/cpu:0``)
    with a :class:`gpuvars.PlacementWarning`. Off: it raises :class:`gpuvars.DevicePlacementError`
    listing the devices that exist.

    Example:
        >>> import gpuvars as gv
        >>> gv.config.set_soft_device_placement(True)
    """
    global _soft_placement
    if not isinstance(enabled, bool):
        raise InvalidArgumentError(f"set_soft_device_placement expects a bool, got {enabled!r}")
    _soft_placement = enabled


def get_soft_device_placement() -> bool:
    """Whether soft device placement is on (default True)."""
    return _soft_placement


def _check_unfrozen(what: str) -> None:
    if _frozen:
        raise InvalidArgumentError(
            f"{what} must be set before the first variable is placed or list_devices() is "
            "called; the device table of this process is already fixed"
        )


def set_gpu_backend(name: str | None) -> None:
    """Choose the library behind ``/gpu:N``: "cupy", "jax" or None (auto: CuPy if usable, else JAX).

    The environment variable ``GPUVARS_GPU_BACKEND`` ("cupy", "jax" or "auto") is used
    until this is called; an explicit ``None`` means auto whatever it says. Must be
    called before the first placement.

    Raises:
        InvalidArgumentError: an unknown name, or the device table is already fixed.
    """
    global _gpu_backend
    if name is not None and name not in _GPU_BACKENDS:
        raise InvalidArgumentError(f"GPU backend must be one of {_GPU_BACKENDS} or None, got {name!r}")
    with _lock:
        _check_unfrozen("set_gpu_backend()")
        _gpu_backend = name


def get_gpu_backend() -> str | None:
    """The configured GPU backend ("cupy", "jax") or None for auto.

    Raises:
        InvalidArgumentError: ``GPUVARS_GPU_BACKEND`` (consulted when nothing was set) is
            not "cupy", "jax" or "auto".
    """
    if _gpu_backend != _UNSET:
        return _gpu_backend
    env = os.environ.get("GPUVARS_GPU_BACKEND", "").strip().lower() or None
    if env is not None and env not in _GPU_BACKENDS and env != "auto":
        raise InvalidArgumentError(
            f"environment variable GPUVARS_GPU_BACKEND={env!r}; expected one of {_GPU_BACKENDS} or 'auto'"
        )
    return None if env == "auto" else env


def set_cpu_backend(name: str | None) -> None:
    """Choose the library behind ``/cpu:N``: "numpy" (default) or "jax" (JAX's CPU devices).

    With "jax", ``set_logical_devices("cpu", n)`` sets JAX's CPU device count (or use
    ``XLA_FLAGS=--xla_force_host_platform_device_count=n``). Env: ``GPUVARS_CPU_BACKEND``.
    """
    global _cpu_backend
    if name is not None and name not in _CPU_BACKENDS:
        raise InvalidArgumentError(f"CPU backend must be one of {_CPU_BACKENDS} or None, got {name!r}")
    with _lock:
        _check_unfrozen("set_cpu_backend()")
        _cpu_backend = name


def get_cpu_backend() -> str:
    """The library behind ``/cpu:N``: "numpy" unless set (or env ``GPUVARS_CPU_BACKEND``)."""
    if _cpu_backend is not None:
        return _cpu_backend
    env = os.environ.get("GPUVARS_CPU_BACKEND", "").strip().lower() or "numpy"
    if env not in _CPU_BACKENDS:
        raise InvalidArgumentError(
            f"environment variable GPUVARS_CPU_BACKEND={env!r}; expected one of {_CPU_BACKENDS}"
        )
    return env


def set_logical_devices(device_type: str, count: int) -> None:
    """Split the host into ``count`` logical CPU devices ``/cpu:0`` .. ``/cpu:{count-1}``.

    Each has its own buffers, so multi-device logic (co-location, transfers, mirrored
    variables) runs on a CPU-only machine. Must be called before the first placement.

    Args:
        device_type: "cpu" (logical GPUs are not supported).
        count: at least 1.

    Example:
        >>> import gpuvars as gv
        >>> gv.config.set_logical_devices("cpu", 4)   # doctest: +SKIP
        >>> gv.list_devices()[:4]                       # doctest: +SKIP
        ['/cpu:0', '/cpu:1', '/cpu:2', '/cpu:3']
    """
    global _logical_cpus
    if not isinstance(device_type, str) or device_type.lower() != "cpu":
        raise InvalidArgumentError(f"logical devices can only split the CPU, got device_type={device_type!r}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise InvalidArgumentError(f"logical device count must be an int >= 1, got {count!r}")
    with _lock:
        _check_unfrozen("set_logical_devices()")
        _logical_cpus = count


def get_logical_devices() -> int | None:
    """The logical CPU device count set by :func:`set_logical_devices`, or None."""
    return _logical_cpus


@contextlib.contextmanager
def transfer_guard(kind: str) -> Iterator[None]:
    """Guard implicit copies inside the block: "allow", "log" or "disallow" (JAX's kinds).

    A host value written to a GPU variable is host-to-device; a Variable or array living
    on another device is device-to-device. "disallow" raises
    :class:`gpuvars.TransferGuardError` for both; explicit copies (``gv.copy_to``,
    restore, mirrored broadcast) are always allowed. "log" logs each one on the
    ``gpuvars`` logger.

    Example:
        >>> import gpuvars as gv
        >>> with gv.config.transfer_guard("disallow"):
        ...     pass
    """
    if kind not in _GUARDS:
        raise InvalidArgumentError(f"transfer_guard kind must be one of {_GUARDS}, got {kind!r}")
    token = _guard.set(kind)
    try:
        yield
    finally:
        _guard.reset(token)


def get_transfer_guard() -> str:
    """The transfer guard in force here: "allow", "log" or "disallow"."""
    return _guard.get()


def _freeze() -> None:
    """Fix the device table (called by placement on first use)."""
    global _frozen
    _frozen = True


def _reset_for_tests() -> None:
    """Forget every setting and unfreeze (tests only)."""
    global _soft_placement, _gpu_backend, _cpu_backend, _logical_cpus, _frozen
    with _lock:
        _soft_placement, _gpu_backend, _cpu_backend, _logical_cpus, _frozen = True, _UNSET, None, None, False
