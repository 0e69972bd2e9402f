"""Rebuild variables from a checkpoint alone (no model code), and read one lazily.

Placement from the checkpoint applies here (and only here: ``Saver.restore`` never moves
a variable). The saved device map advises and never binds: ``device_map`` remaps it like
torch's ``map_location``, soft placement falls back, and the result reports what moved.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import warnings
from typing import Any, Callable, Mapping

import numpy as np

from gpuvars import devices as _devices
from gpuvars._creator import current_creator
from gpuvars._backend_errors import backend_errors
from gpuvars.checkpoint import _format, _parallel, _saveable
from gpuvars.checkpoint import _stformat as st
from gpuvars.checkpoint.reader import CheckpointReader  # re-exported: the class lives in reader.py
from gpuvars.checkpoint._restore import restore_variables
from gpuvars.errors import CheckpointMismatchError, InvalidArgumentError, PlacementWarning
from gpuvars.initializers import Initializer
from gpuvars.placement import PhysicalDevice, list_devices, resolve
from gpuvars.registry import current_registry
from gpuvars.variable import Variable, make_deferred

__all__ = ["CheckpointReader", "LoadedCheckpoint", "load_checkpoint"]

DeviceMap = Mapping[str, str] | Callable[[str], str | None]


class LoadedCheckpoint(dict[str, Variable]):
    """``{checkpoint key: variable}``, plus ``moved``: ``{key: (saved device, actual device)}``
    for every variable that did not land on the device the checkpoint recorded."""

    moved: dict[str, tuple[str, str]]
    prefix: str


def _remap(saved: str, device_map: DeviceMap | None) -> str:
    """Apply ``device_map``: exact keys first, then glob patterns (``/gpu:*``) in order."""
    if device_map is None:
        return saved
    if callable(device_map):
        out = device_map(saved)
        return saved if out is None else out
    if saved in device_map:
        return device_map[saved]
    for pattern, target in device_map.items():
        if fnmatch.fnmatchcase(saved, pattern):
            return target
    return saved


def load_checkpoint(
    prefix: str | os.PathLike[str],
    *,
    device: str | _devices.DeviceSpec | None = None,
    device_map: DeviceMap | None = None,
    verify_first: bool = False,
    progress: bool | None = None,
) -> LoadedCheckpoint:
    """Create and fill one variable per checkpoint key, from the checkpoint alone.

    Placement: ``device=`` puts every variable there; otherwise, when the checkpoint
    recorded devices (SAVE_VARIABLE_DEVICES or EXPAND_DISTRIBUTED_VARIABLES), each goes to
    its saved device after ``device_map`` remapping (soft placement falls back with one
    :class:`~gpuvars.PlacementWarning` for the load; with it off a missing device is a
    DevicePlacementError naming it); otherwise the enclosing ``gv.device`` scope decides.
    Variables join the current registry (their ``.name`` may be uniquified, or have
    characters a variable name cannot hold replaced by ``_``; the key is stable). A
    loaded variable's initializer re-reads its value from the checkpoint, so a later
    ``gv.global_variables_initializer()`` does not wipe it.

    ``prefix`` may also be a plain ``.safetensors`` file (e.g. written by
    ``safetensors.numpy.save_file``): one trainable variable per tensor, placed by
    ``device=`` or the scope (such a file has no checksums and no devices).

    Args:
        prefix: the checkpoint prefix (``ckpt/model.ckpt-1000``) or a ``.safetensors`` file.
        device: one device for all variables (overrides the saved map).
        device_map: ``{"/gpu:3": "/gpu:0", "/gpu:*": "/cpu:0"}`` or a callable ``saved -> device``
            (None keeps the saved device).
        verify_first: verify every checksum before writing any value.

    Returns:
        A :class:`LoadedCheckpoint` (a dict) whose ``moved`` says what did not land where saved
        (remapped by ``device_map``/``device=``, or moved by soft placement).

    Raises:
        CheckpointNotFoundError, CheckpointCorruptError: as for a restore.
        DevicePlacementError: a saved (or remapped) device is missing and soft placement is off.
        No variable is left registered when the load fails.

    Example:
        >>> import gpuvars as gv, numpy as np, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> with gv.Registry():
        ...     _ = gv.Variable(np.ones(2, np.float32), name="w")
        ...     p = gv.Saver().save(os.path.join(d, "m"))
        >>> with gv.Registry():
        ...     loaded = gv.load_checkpoint(p)
        ...     loaded["w"].numpy()
        array([1., 1.], dtype=float32)
    """
    if device_map is not None and not (callable(device_map) or isinstance(device_map, Mapping)):
        raise InvalidArgumentError(f"device_map must be a dict or a callable, got {type(device_map).__name__}")
    with _parallel.gc_paused():  # 200,000 variables and their index entries: no collection meanwhile
        return _load(prefix, device, device_map, verify_first, progress)


def _load(
    prefix: str | os.PathLike[str],
    device: str | _devices.DeviceSpec | None,
    device_map: DeviceMap | None,
    verify_first: bool,
    progress: bool | None,
) -> LoadedCheckpoint:
    index = _format.open_checkpoint(prefix)
    saved = _format.read_devices(index) if index.policy.saves_devices() else {}
    registry = current_registry()
    places: dict[str, tuple[PhysicalDevice, str | None]] = {}  # saved device -> (where it goes, a fallback)
    np_dtypes: dict[str, np.dtype[Any]] = {}
    created: dict[str, Variable] = {}
    moved: dict[str, tuple[str, str]] = {}
    fallbacks: list[str] = []
    # Outside a strategy scope a plain variable is built by variable.make_deferred on a device
    # resolved once per distinct spec (a checkpoint shares a few devices among all its
    # variables); inside one, gv.Variable(...) goes through the strategy's creator.
    direct = current_creator() is None
    specs: dict[Any, PhysicalDevice] = {}  # the scope's spec for a variable -> its device
    where = index.prefix
    try:
        with _devices.device(device) if device is not None and direct else contextlib.nullcontext():
            for key, entry in index.variables.items():
                dtype = np_dtypes.get(entry.dtype)
                if dtype is None:
                    dtype = np_dtypes[entry.dtype] = st.np_dtype(entry.dtype)
                init = _FromCheckpoint(where, key, entry.shape, dtype)
                name = _variable_name(key)
                rec = saved.get(key, {})
                if device is None and entry.kind != "plain" and rec.get("components"):
                    placed = [_place(c["device"], key, device_map, fallbacks, places) for c in rec["components"]]
                    var = _saveable.adapter_for_kind(entry.kind).build(name, entry, rec, placed)
                elif device is None and key in saved:
                    physical = _place(saved[key]["device"], key, device_map, fallbacks, places)
                    if direct:
                        var = make_deferred(name, init, physical, entry.shape, dtype, entry.trainable)
                    else:
                        with _devices.device(None):  # a resolved device: enclosing scopes do not apply
                            var = Variable(init, name=name, trainable=entry.trainable, device=physical.name)
                elif direct:  # device= (entered above) or the enclosing scopes, device functions included
                    spec = _devices.current_device_spec("Variable", name)
                    where_to = specs.get(spec)
                    if where_to is None:
                        where_to = specs[spec] = resolve(spec, f"variable '{name}'", stacklevel=3)
                    var = make_deferred(name, init, where_to, entry.shape, dtype, entry.trainable)
                else:
                    var = Variable(init, name=name, trainable=entry.trainable, device=device)
                created[key] = var
                if key in saved and var.device != saved[key]["device"]:
                    moved[key] = (saved[key]["device"], var.device)
        targets = {key: _saveable.saveable_for(var) for key, var in created.items()}
        # the variables were made from this very index: its shapes and dtypes need no second check
        restore_variables(index.prefix, targets, verify_first=verify_first, progress=progress, index=index,
                          devices=saved, compatible=True)
        if fallbacks:
            warnings.warn(
                f"load_checkpoint({index.prefix!r}): soft placement put {len(fallbacks)} variable(s) on "
                f"another device than the checkpoint asks for: {', '.join(fallbacks[:10])}"
                + (f" (and {len(fallbacks) - 10} more)" if len(fallbacks) > 10 else "")
                + f"; available devices: {list_devices()}",
                PlacementWarning,
                stacklevel=3,  # the caller of load_checkpoint
            )
    except BaseException:
        for var in created.values():  # leave nothing half-loaded in the registry
            _saveable.unregister(var, registry)
        raise
    out = LoadedCheckpoint(created)
    out.moved = moved
    out.prefix = index.prefix
    return out


def _place(
    saved: str,
    key: str,
    device_map: DeviceMap | None,
    fallbacks: list[str],
    places: dict[str, tuple[PhysicalDevice, str | None]],
) -> PhysicalDevice:
    """The device for a saved device string (validated by the device-map reader), after
    ``device_map``; a soft-placement fallback is recorded in ``fallbacks`` (one warning
    for the whole load), not warned about here. ``places`` caches each saved string's
    answer: a checkpoint shares a few devices among all its variables, and mapping and
    resolving one (a device-spec parse, a warnings catch) costs more than the rest of a
    small variable's load."""
    got = places.get(saved)
    if got is None:
        wanted = _remap(saved, device_map)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PlacementWarning)
            physical = resolve(wanted, f"checkpoint key {key!r}")
        got = places[saved] = (physical, f"{wanted} -> {physical.name}" if caught else None)
    physical, fallback = got
    if fallback is not None:
        fallbacks.append(f"{key!r} {fallback}")
    return physical


_NAME_OK = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-/]*$")  # the registry's rule for names


def _variable_name(key: str) -> str:
    """A valid variable name for checkpoint key ``key`` (the key itself when it is one)."""
    if _NAME_OK.match(key):
        return key
    name = re.sub(r"[^A-Za-z0-9_.\-/]", "_", key)
    return name if _NAME_OK.match(name) else f"v{name}"


class _FromCheckpoint(Initializer):
    """A loaded variable's initial value: its tensor, re-read from the checkpoint on the
    variable's device (checksum-verified). Restores never run it."""

    def __init__(self, prefix: str, key: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        # shape and dtype come from a validated index (a tuple of non-negative ints, a numpy
        # dtype): Initializer's argument checks would only repeat that, once per key
        self.shape, self.dtype = shape, dtype
        self.prefix = prefix
        self.key = key

    def _draw(self, device: Any, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        index = _format.open_checkpoint(self.prefix)
        entry = index.variables.get(self.key)
        if entry is None or entry.shape != tuple(shape) or st.np_dtype(entry.dtype) != dtype:
            raise CheckpointMismatchError(
                f"initializing from checkpoint {self.prefix!r}: key {self.key!r} is no longer there "
                f"with shape {tuple(shape)} and dtype {dtype}"
            )
        with _format.open_data(index, entry.file, [self.key]) as reader:
            host = reader.get_tensor(self.key, expected_checksum=entry.checksum)
        with backend_errors(device, f"initializing from {self.key!r} of checkpoint {self.prefix!r}"):
            return device.backend.asarray(host, dtype, device.backend_index)
