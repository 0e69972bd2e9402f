"""The one protocol every array library sits behind; this package never imports gpuvars.

A backend serves the devices of one platform ("cpu" or "gpu") of one library. Device
indices are plain ints (parsing happened above). Methods raise builtins or the
library's own errors; the engine maps them to its own hierarchy at one boundary.

:class:`HostStaging` is optional: a backend with device memory of its own may move it to
and from the host through staging it manages (CuPy: pinned double buffers on a side
stream); the engine asks ``isinstance(backend, HostStaging)`` and otherwise copies chunk
by chunk through ``to_numpy`` / ``apply``. numpy and JAX do not implement it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, Generator, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

#: Update kinds every backend implements (``apply``) and their scatter counterparts.
UPDATE_OPS = ("assign", "add", "sub")
SCATTER_OPS = ("update", "add", "sub", "mul", "div", "min", "max")
RANDOM_KINDS = ("normal", "truncated_normal", "uniform")


@runtime_checkable
class Backend(Protocol):
    """Allocate, copy, update and draw arrays on one library's devices."""

    name: str  #: "numpy" | "cupy" | "jax"
    platform: str  #: "cpu" | "gpu"
    inplace: bool  #: True when updates write into the existing buffer (numpy, CuPy)
    host: bool  #: True when arrays are numpy arrays in host memory (read on the host without a copy)
    xp: Any  #: the library's array namespace (numpy, cupy, jax.numpy) for math on its arrays
    oom_errors: tuple[type[BaseException], ...]  #: the library's out-of-memory errors
    errors: tuple[type[BaseException], ...]  #: the library's other runtime errors

    def device_count(self) -> int:
        """How many devices of this platform the library can use (0 when none)."""

    def scope(self, device: int) -> AbstractContextManager[Any]:
        """Make ``device`` current for the library's own calls inside the block (array math
        the engine does not route through this protocol, e.g. initial-value expressions)."""

    def check_dtype(self, dtype: np.dtype[Any]) -> None:
        """Raise TypeError (saying why) if this library cannot hold arrays of ``dtype``."""

    def owns(self, array: object) -> bool:
        """Whether ``array`` is an array of this backend's library."""

    def device_of(self, array: Any) -> int | None:
        """The index of the device that holds ``array`` (None for host numpy memory)."""

    def asarray(self, value: Any, dtype: np.dtype[Any], device: int) -> Any:
        """A new array on ``device`` holding ``value`` cast to ``dtype`` (always a copy)."""

    def empty(self, shape: tuple[int, ...], dtype: np.dtype[Any], device: int) -> Any:
        """A new uninitialized array on ``device``."""

    def full(self, shape: tuple[int, ...], fill: Any, dtype: np.dtype[Any], device: int) -> Any:
        """A new array on ``device`` filled with ``fill`` (a scalar or a host array broadcast to ``shape``)."""

    def to_numpy(self, array: Any) -> np.ndarray[Any, Any]:
        """A host copy of ``array``."""

    def apply(self, op: str, dst: Any, src: Any, device: int) -> Any:
        """``dst (op)= src`` on ``device``; returns the storage (``dst`` itself when inplace)."""

    def scatter(self, op: str, dst: Any, indices: Any, updates: Any, device: int) -> Any:
        """Apply ``op`` at ``dst[indices]`` (repeated indices accumulate); returns the storage."""

    def random(
        self,
        kind: str,
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        seed: int,
        device: int,
        params: Sequence[float],
    ) -> Any:
        """Draw ``kind`` (normal: mean, stddev; truncated_normal: mean, stddev; uniform: lo, hi)."""

    def synchronize(self, device: int) -> None:
        """Wait until all work queued on ``device`` has finished."""

    def from_dlpack(self, obj: Any, device: int) -> Any:
        """Import a DLPack-capable object onto ``device`` (copying only if it lives elsewhere)."""


@runtime_checkable
class HostStaging(Protocol):
    """Optional: device memory to and from the host through the backend's own staging buffers."""

    def chunks_to_host(
        self, array: Any, device: int, chunk_bytes: int
    ) -> Generator[np.ndarray[Any, Any], None, None]:
        """The bytes of ``array`` in C order, as uint8 host chunks of at most ``chunk_bytes``;
        each chunk is valid until the next one is asked for (close the generator to stop early)."""

    def chunks_to_device(
        self,
        dst: Any,
        device: int,
        chunk_bytes: int,
        fill: Callable[[list[memoryview]], Iterator[memoryview]],
    ) -> None:
        """Copy into ``dst`` the bytes ``fill(buffers)`` yields, read into the given host buffers in
        turn (chunk k into ``buffers[k % len(buffers)]``); returns once they are on the device."""
