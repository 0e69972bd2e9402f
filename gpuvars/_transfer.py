"""The one transfer boundary: where a value lives, and whether writing it is a transfer.

Every write into a variable (plain, mirrored, sync-on-read or sharded; assign, scatter,
init ops) asks :func:`admit` once, against every device the variable's storage lives
on; it judges the implicit copy under ``gv.config.transfer_guard`` (DESIGN decision 6):

- a host value (numpy, list, scalar) written to a host variable is never a transfer;
- a host value written to a GPU variable is host-to-device;
- a Variable or backend array living on a device the variable does not live on is
  device-to-device.

Explicit copies (:func:`copy_to`, a restore, a mirrored broadcast after the value was
admitted) never consult the guard.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

import gpuvars_backends as backends
from gpuvars_backends import Backend
from gpuvars import config
from gpuvars._backend_errors import backend_errors
from gpuvars.devices import DeviceSpec
from gpuvars.errors import InvalidArgumentError, TransferGuardError
from gpuvars.placement import PhysicalDevice, devices_of_platform, resolve

__all__ = [
    "Located",
    "admit",
    "copy_to",
    "device_of_array",
    "host_array",
    "implicit_kind",
    "locate",
    "move",
    "on_device",
    "to_host",
]

_log = logging.getLogger("gpuvars")

#: (array, its backend or None for host data, its device or None for host memory)
Located = tuple[Any, Backend | None, PhysicalDevice | None]

_PY_DEFAULTS = {"f": np.dtype(np.float32), "c": np.dtype(np.complex64)}


def host_array(value: Any) -> np.ndarray[Any, Any]:
    """A host array from a Python scalar, list or host array-like, with TF/JAX default dtypes.

    Python floats become float32, Python ints int32 (int64 when they do not fit), complex
    complex64; numpy arrays and scalars keep their dtype.

    Raises:
        InvalidArgumentError: the value has no numeric array form (strings, ragged lists, ...).
    """
    if isinstance(value, (np.ndarray, np.generic)):
        return np.asarray(value)
    try:
        host = np.asarray(value)
    except Exception as exc:  # ragged lists, objects numpy cannot convert, ...
        raise InvalidArgumentError(f"cannot convert {type(value).__name__} to an array: {exc}") from None
    dtype = host.dtype
    # kind "V" is also ml_dtypes' bfloat16/float8; only a plain void (bytes, records) is not numeric
    if dtype.kind not in "biufcV" or dtype.type is np.void:
        raise InvalidArgumentError(f"cannot convert {type(value).__name__} {value!r:.60} to a numeric array")
    if dtype.kind in _PY_DEFAULTS and dtype.itemsize == 2 * _PY_DEFAULTS[dtype.kind].itemsize:
        return host.astype(_PY_DEFAULTS[dtype.kind])
    if dtype == np.int64 and (host.size == 0 or (host.min() >= -(2**31) and host.max() < 2**31)):
        return host.astype(np.int32)
    return host


def device_of_array(array: Any) -> tuple[Backend | None, PhysicalDevice | None]:
    """The backend of ``array`` and the device holding it (None for host memory or non-arrays)."""
    backend = backends.owner_of(array)
    if backend is None:
        return None, None
    index = backend.device_of(array)
    if index is None:
        return backend, None
    for dev in devices_of_platform(backend.platform):
        if dev.backend is backend and dev.backend_index == index:
            return backend, dev
    return backend, None


def locate(value: Any) -> Located:
    """Where ``value`` lives: a Variable's live value and device, a backend array and its
    device, or host data (Python scalars and lists become arrays here)."""
    if type(value) is np.ndarray:  # the common case first: no need to ask which library owns it
        return value, None, None
    where = getattr(value, "_gpuvars_locate", None)
    if where is not None:  # a gpuvars Variable (plain or distributed)
        array, device = where()
        return array, device.backend, device
    backend, device = device_of_array(value)
    if backend is None:
        return host_array(value), None, None
    return value, backend, device


def is_host(backend: Backend | None) -> bool:
    """Whether arrays of ``backend`` are host numpy memory (None: plain host data)."""
    return backend is None or backend.host


def implicit_kind(
    backend: Backend | None, device: PhysicalDevice | None, targets: Sequence[PhysicalDevice]
) -> str | None:
    """The implicit transfer that writing a value located at (``backend``, ``device``) into
    storage on ``targets`` makes: "host-to-device", "device-to-device" or None."""
    if is_host(backend):
        if any(t.kind == "gpu" for t in targets):
            return "host-to-device"
        if device is not None and all(device is not t for t in targets):
            return "device-to-device"  # a variable on another logical CPU device
        return None
    if all(device is not t for t in targets):
        return "device-to-device"
    return None


def admit(value: Any, targets: Sequence[PhysicalDevice], what: str) -> Located:
    """Locate ``value`` and judge writing it into storage on ``targets`` under the transfer
    guard; returns the location. ``what`` names the operation and variable for messages."""
    located = locate(value)
    kind = implicit_kind(located[1], located[2], targets)
    if kind is not None:
        mode = config.get_transfer_guard()
        if mode != "allow":
            _judge(mode, kind, value, located[2], targets, what)
    return located


def _judge(
    mode: str, kind: str, value: Any, src: PhysicalDevice | None, targets: Sequence[PhysicalDevice], what: str
) -> None:
    name = getattr(value, "name", None) if hasattr(value, "_gpuvars_locate") else None
    if name is not None and src is not None:
        origin = f"variable '{name}' on {src.name}"
    elif src is not None:
        origin = f"{type(value).__name__} on {src.name}"
    else:
        origin = f"{type(value).__name__} from {'host memory' if kind == 'host-to-device' else 'another device'}"
    where = ", ".join(t.name for t in targets)
    text = f"{what} on {where}: implicit {kind} copy of {origin}"
    if mode == "disallow":
        raise TransferGuardError(
            f"{text} is disallowed by transfer_guard('disallow'); copy it explicitly first "
            f"with gv.copy_to(x, '{targets[0].name}')"
        )
    _log.warning("%s", text)


def to_host(array: Any, backend: Backend | None) -> np.ndarray[Any, Any]:
    """A host numpy array of a located value (no copy for host memory)."""
    if is_host(backend):
        return np.asarray(array)
    assert backend is not None
    with backend_errors(None, f"copying a {backend.name} array to the host"):
        return backend.to_numpy(array)


def move(
    located: Located, dest: PhysicalDevice, dtype: np.dtype[Any], *, private: bool, what: str
) -> Any:
    """The located array on ``dest`` with ``dtype``; ``private`` forces a fresh copy (one
    that may become a variable's storage), else an array already there is returned as is."""
    array, backend, device = located
    if not private and np.dtype(array.dtype) == dtype and (
        device is dest or (device is None and is_host(backend) and dest.backend.host)
    ):
        return array  # already there: nothing to copy, nothing that can fail
    with backend_errors(dest, what):
        if is_host(backend) or backend is dest.backend:
            return dest.backend.asarray(array, dtype, dest.backend_index)
        return dest.backend.asarray(to_host(array, backend), dtype, dest.backend_index)  # between libraries


def on_device(value: Any, dest: PhysicalDevice) -> Any:
    """``value`` usable on ``dest`` with no implicit transfer: itself when it already lives
    there (or is host data for a host device), else an explicit copy."""
    located = locate(value)
    array, backend, device = located
    if device is dest or (device is None and is_host(backend) and dest.backend.host):
        return array
    return move(located, dest, np.dtype(array.dtype), private=True, what=f"copying to {dest.name}")


def copy_to(value: Any, device: str | DeviceSpec | PhysicalDevice) -> Any:
    """Explicitly copy ``value`` (array-like or Variable) to ``device``; never blocked by the transfer guard.

    Returns the backend's array on that device (numpy for ``/cpu:N``).

    Example:
        >>> import gpuvars as gv, numpy as np
        >>> gv.copy_to(np.arange(3), "/cpu:0")
        array([0, 1, 2])
    """
    target = device if isinstance(device, PhysicalDevice) else resolve(device, "gv.copy_to", stacklevel=2)
    try:
        located = locate(value)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"gv.copy_to to {target.name}: {exc}") from None
    dtype = np.dtype(located[0].dtype)
    try:
        target.backend.check_dtype(dtype)
    except TypeError as exc:
        raise InvalidArgumentError(f"gv.copy_to to {target.name}: {exc}") from None
    return move(located, target, dtype, private=True, what=f"gv.copy_to to {target.name}")
