"""Lazy read access to a checkpoint (TF's CheckpointReader): keys, shapes, dtypes and
devices from the index alone; tensor data only when asked for, checksum-verified.

Each file is opened and its header parsed and checked once, on first use, and kept open
for the reader's life (``close()`` or ``with``): reading every tensor of a 20,000-tensor
checkpoint costs one header parse, not 20,000. The index is checked against the files'
recorded sizes before anything is read, so no shape in it can ask for more memory than
its file holds.
"""

from __future__ import annotations

import math
import os
import threading
from types import TracebackType
from typing import Any

import numpy as np

from gpuvars.checkpoint import _format
from gpuvars.checkpoint import _stformat as st
from gpuvars.errors import CheckpointCorruptError, CheckpointMismatchError, InvalidArgumentError

__all__ = ["CheckpointReader"]


class CheckpointReader:
    """Lazy read access to a checkpoint: keys, shapes, dtypes and devices without loading data.

    Opens a committed checkpoint prefix or a plain ``.safetensors`` file (``plain`` is then
    True: no checksums, no devices, every tensor trainable). Files are opened on first use
    and stay open until :meth:`close` (or the end of a ``with`` block); the maps keep
    working after it.

    Raises:
        CheckpointNotFoundError: no committed checkpoint (or file) at ``prefix``.
        CheckpointCorruptError: a damaged index or device map, a file the index lists that is
            missing, of the wrong size or not a regular file (a FIFO, a directory), or a shape
            in the index larger than its file.

    Example:
        >>> import gpuvars as gv, numpy as np, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> with gv.Registry():
        ...     _ = gv.Variable(np.zeros((2, 3), np.float32), name="w")
        ...     p = gv.Saver().save(os.path.join(d, "m"))
        >>> with gv.CheckpointReader(p) as r:
        ...     r.get_variable_to_shape_map(), r.get_tensor("w").tolist()
        ({'w': (2, 3)}, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    """

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self._readers: dict[str, st.SafetensorsReader] = {}
        self._lock = threading.Lock()
        self._closed = False
        _refuse_special_files(os.fspath(prefix))
        self._index = _format.open_checkpoint(prefix)
        for name in self._index.files:  # .safetensors files are checked when opened
            if not name.endswith(_format.PLAIN_SUFFIX):
                os.close(st.open_regular(self._index.path(name), "checkpoint file"))
        _check_shapes_fit(self._index)
        self._devices = _format.read_devices(self._index) if self._index.policy.saves_devices() else {}

    @property
    def plain(self) -> bool:
        """Whether this is a plain .safetensors file (no checksums, no devices) rather than a checkpoint."""
        return self._index.plain

    @property
    def prefix(self) -> str:
        return self._index.prefix

    @property
    def data_files(self) -> list[str]:
        """The names of the files holding the tensors: one, or each shard (sorted)."""
        return sorted({e.file for e in self._index.variables.values()} | {
            n for n, rec in self._index.files.items() if rec.get("role") == "data"})

    @property
    def policy(self) -> str:
        return self._index.policy.name

    @property
    def global_step(self) -> int | None:
        return self._index.global_step

    def keys(self) -> list[str]:
        """The checkpoint keys, sorted."""
        return sorted(self._index.variables)

    def has_tensor(self, key: str) -> bool:
        return key in self._index.variables

    def get_variable_to_shape_map(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in sorted(self._index.variables.items())}

    def get_variable_to_dtype_map(self) -> dict[str, np.dtype[Any]]:
        return {k: st.np_dtype(e.dtype) for k, e in sorted(self._index.variables.items())}

    def get_variable_to_trainable_map(self) -> dict[str, bool]:
        return {k: e.trainable for k, e in sorted(self._index.variables.items())}

    def get_variable_to_device_map(self) -> dict[str, str]:
        """Saved devices (empty when the policy saved none)."""
        return {k: v["device"] for k, v in sorted(self._devices.items())}

    def get_tensor(self, key: str) -> np.ndarray[Any, Any]:
        """Read one tensor into a new host array, checksum-verified.

        Raises:
            CheckpointMismatchError: no such key.
            CheckpointCorruptError: its file's header or its bytes are damaged.
            ResourceExhaustedError: host memory cannot hold it.
            InvalidArgumentError: the reader is closed.
        """
        entry = self._index.variables.get(key)
        if entry is None:
            raise CheckpointMismatchError(
                f"Key {key!r} not found in checkpoint {self.prefix!r}; it has: {', '.join(self.keys()[:10])}"
            )
        reader = self._reader(entry.file)
        want = self._index.files[entry.file]["checksum"]
        if want is not None and reader.header_checksum != want:
            raise CheckpointCorruptError(f"{reader.path!r}: its header fails the checksum in the index (damaged)")
        info = reader.tensors.get(key)
        if info is None or info.shape != entry.shape or st.st_dtype(info.dtype) != entry.dtype:
            raise CheckpointCorruptError(f"{reader.path!r}: tensor {key!r} disagrees with the index (shape/dtype) or is absent")
        return reader.get_tensor(key, expected_checksum=entry.checksum)

    def verify(self) -> list[str]:
        """What fails its checksum, over every file the index lists (empty when all is sound).

        The data file's tensors are reported by key; an EXPAND_DISTRIBUTED_VARIABLES
        replica component as ``KEY (in FILE)``; a safetensors header that fails its checksum
        as ``<header of FILE>``; any other listed file (the device map) as ``<FILE>``.
        Structural damage (sizes, unparsable headers, missing files) raises
        CheckpointCorruptError. A plain .safetensors file has no checksums: only its
        structure is checked.
        """
        expected: dict[str, dict[str, str]] = {}
        for key, entry in self._index.variables.items():
            if entry.checksum is not None:
                expected.setdefault(entry.file, {})[key] = entry.checksum
            for comp in entry.components:
                expected.setdefault(comp.file, {})[key] = comp.checksum
        bad: list[str] = []
        for name, rec in self._index.files.items():
            want = rec["checksum"]
            if not name.endswith(_format.PLAIN_SUFFIX):
                if want is not None and _file_checksum(self._index.path(name)) != want:
                    bad.append(f"<{name}>")
                continue
            reader = self._reader(name)
            if want is not None and reader.header_checksum != want:
                bad.append(f"<header of {name}>")
                continue
            suffix = "" if rec.get("role") == "data" else f" (in {name})"
            checks = expected.get(name, {})
            bad.extend(k + suffix for k in checks if k not in reader.tensors)
            bad.extend(k + suffix for k in reader.verify({k: c for k, c in checks.items() if k in reader.tensors}))
        return bad

    def _reader(self, name: str) -> st.SafetensorsReader:
        """File ``name``'s reader, opened (and its header parsed and validated) on first use."""
        with self._lock:
            if self._closed:
                raise InvalidArgumentError(f"CheckpointReader of {self.prefix!r} is closed")
            reader = self._readers.get(name)
            if reader is None:
                reader = self._readers[name] = st.SafetensorsReader(self._index.path(name))
            return reader

    def close(self) -> None:
        """Close the files this reader opened (idempotent); tensors can no longer be read."""
        with self._lock:
            self._closed = True
            readers, self._readers = list(self._readers.values()), {}
        for reader in readers:
            reader.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        for reader in getattr(self, "_readers", {}).values():  # no file descriptor outlives the reader
            try:
                reader.close()
            except Exception:  # pragma: no cover - interpreter shutdown
                pass


def _refuse_special_files(path: str) -> None:
    """CheckpointCorruptError at once when an index this reader would open, or ``path`` as a
    plain file, is a FIFO (open() would block forever), a directory, a socket or a device."""
    folder, base = os.path.split(path)
    candidates = [(os.path.join(folder, _format.index_file(base)), "checkpoint index")]
    if base.endswith(_format.PLAIN_SUFFIX):
        stem = base[: -len(_format.PLAIN_SUFFIX)]
        candidates += [(path, "safetensors file"), (os.path.join(folder, _format.index_file(stem)), "checkpoint index")]
    for candidate, what in candidates:
        if os.path.exists(candidate):  # a missing one is open_checkpoint's to explain
            os.close(st.open_regular(candidate, what))


def _check_shapes_fit(index: _format.Index) -> None:
    """Every shape in the index, whole and per component, fits numpy and its file's recorded
    size (Python ints: no overflow), so nothing read through it allocates beyond the file."""
    where = index.prefix if index.plain else os.path.join(index.folder, _format.index_file(index.base))
    for key, entry in index.variables.items():
        dtype = st.np_dtype(entry.dtype)
        for file, shape in [(entry.file, entry.shape)] + [(c.file, c.shape) for c in entry.components]:
            problem = st.shape_problem(shape, dtype)
            if problem is not None:
                problem = f"is beyond numpy: {problem}"
            elif (nbytes := math.prod(shape) * dtype.itemsize) > (size := index.files[file]["size"]):
                problem = f"needs {nbytes} bytes, more than its file {file!r} holds ({size} bytes)"
            if problem is not None:
                raise CheckpointCorruptError(
                    f"checkpoint index {where!r}, variable {key!r}: shape {list(shape)!r:.200} of "
                    f"{entry.dtype} {problem}"
                )


def _file_checksum(path: str) -> str:
    """The checksum of a whole file (the device map), streamed in bounded chunks."""
    fd = st.open_regular(path, "checkpoint file")
    try:
        hasher = st.new_hasher()
        while chunk := os.read(fd, st.CHUNK_BYTES):
            hasher.update(chunk)
        return hasher.hexdigest()
    finally:
        os.close(fd)
