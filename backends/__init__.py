"""The array layer: one Backend per library, found lazily; never imports gpuvars.

This folder, ``backends/``, installs as the package ``gpuvars_backends``.
``import gpuvars_backends`` imports neither cupy nor jax. Whether a library is installed
is ``importlib.util.find_spec``; whether it is *usable* (driver present, devices > 0) is
probed on first request and cached, with :func:`reset` for tests. "No GPU" is an answer
(:class:`Probe` with ``count == 0`` and a reason), never an exception at import.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
import threading
from typing import Any

from ._protocol import RANDOM_KINDS, SCATTER_OPS, UPDATE_OPS, Backend, HostStaging

__all__ = [
    "RANDOM_KINDS",
    "SCATTER_OPS",
    "UPDATE_OPS",
    "Backend",
    "HostStaging",
    "Probe",
    "get",
    "installed",
    "owner_of",
    "probe",
    "request_cpu_devices",
    "reset",
]

#: (library, platform) -> (module, class); jax serves both platforms.
#: Module names derive from ``__name__``: the folder ``backends/`` installs as ``gpuvars_backends``.
_TABLE: dict[tuple[str, str], tuple[str, str]] = {
    ("numpy", "cpu"): (f"{__name__}.numpy", "NumpyBackend"),
    ("jax", "cpu"): (f"{__name__}.jax", "JaxBackend"),
    ("cupy", "gpu"): (f"{__name__}.cupy", "CupyBackend"),
    ("jax", "gpu"): (f"{__name__}.jax", "JaxBackend"),
}


@dataclasses.dataclass(frozen=True)
class Probe:
    """The answer to "can I use this library on this platform?"."""

    library: str
    platform: str
    count: int  #: usable devices (0 when unusable)
    reason: str  #: why it is unusable ("" when usable)
    backend: Backend | None = None

    @property
    def usable(self) -> bool:
        return self.count > 0


_lock = threading.Lock()
_cache: dict[tuple[str, str], Probe] = {}


def installed(library: str) -> bool:
    """Whether ``library`` can be imported, without importing it.

    A ``None`` entry in ``sys.modules`` (Python's way to block an import) counts as absent.
    """
    if library in sys.modules:
        return sys.modules[library] is not None
    return importlib.util.find_spec(library) is not None


def probe(library: str, platform: str) -> Probe:
    """Import ``library`` (first time only), count its ``platform`` devices and cache it."""
    key = (library, platform)
    cached = _cache.get(key)  # the hot path (every owner_of): a dict read is atomic, no lock
    if cached is not None:
        return cached
    if key not in _TABLE:
        raise ValueError(
            f"no backend for library {library!r} on platform {platform!r}; "
            f"known: {sorted(f'{lib}/{plat}' for lib, plat in _TABLE)}"
        )
    with _lock:
        if key not in _cache:
            _cache[key] = _probe(library, platform)
        return _cache[key]


def _probe(library: str, platform: str) -> Probe:
    if not installed(library):
        return Probe(library, platform, 0, f"{library} is not installed")
    module, cls_name = _TABLE[(library, platform)]
    try:
        cls = getattr(importlib.import_module(module), cls_name)
        backend: Any = cls(platform) if library == "jax" else cls()
        count = int(backend.device_count())
    except Exception as exc:  # a broken driver or toolkit is "not usable", with the reason
        return Probe(library, platform, 0, f"{library} failed to start: {type(exc).__name__}: {exc}")
    if count == 0:
        why = "no GPU plugin or device" if platform == "gpu" else "no devices"
        return Probe(library, platform, 0, f"{library} sees {why}")
    return Probe(library, platform, count, "", backend)


def request_cpu_devices(library: str, count: int) -> None:
    """Ask ``library`` for ``count`` CPU devices before it starts (only JAX has a say).

    Once JAX has started its count is fixed and this changes nothing; the probe then
    reports the count JAX really has.
    """
    if library == "jax" and installed("jax"):
        importlib.import_module(f"{__name__}.jax").request_cpu_devices(count)


def get(library: str, platform: str) -> Backend:
    """The usable backend for ``library`` on ``platform``; RuntimeError with the reason if none."""
    p = probe(library, platform)
    if p.backend is None:
        raise RuntimeError(f"{library} on {platform} is not usable: {p.reason}")
    return p.backend


#: top-level module of an array type -> the library that serves it
_LIBRARY_OF_MODULE = {"numpy": "numpy", "cupy": "cupy", "jax": "jax", "jaxlib": "jax"}


def owner_of(array: object) -> Backend | None:
    """The backend whose library made ``array``, or None for anything else.

    The type's module names the library, so a Python scalar or list costs one dict
    look-up and only that library's backends are asked. A library that was never
    imported cannot have made the array, so this never imports (or starts) anything.
    """
    library = _LIBRARY_OF_MODULE.get(type(array).__module__.partition(".")[0])
    if library is None or sys.modules.get(library) is None:
        return None
    for lib, platform in _TABLE:
        if lib == library:
            backend = probe(lib, platform).backend
            if backend is not None and backend.owns(array):
                return backend
    return None


def reset() -> None:
    """Forget every probe (tests that change the environment call this)."""
    with _lock:
        _cache.clear()
