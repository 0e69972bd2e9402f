"""Bytes between a variable's storage and a file, without whole-model host copies.

Host (numpy) storage is written from and read into directly. Device storage moves in
bounded chunks (``CHUNK_BYTES``) through host staging; JAX storage, being immutable,
is rebuilt from one host buffer per tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from gpuvars.checkpoint import _stformat as st
from gpuvars.variable import restore_target

if TYPE_CHECKING:
    from gpuvars.variable import Variable

CHUNK_BYTES = 64 << 20


def source(var: Variable) -> Any:
    """What the writer streams for ``var``: its host array, or an iterator of host chunks."""
    storage = var.value()
    backend = var.physical_device.backend
    if backend.host:
        return storage
    if backend.platform == "cpu":  # JAX CPU arrays: a host view, no copy
        return np.asarray(storage)
    return _device_chunks(var, storage)


def _device_chunks(var: Variable, storage: Any) -> Iterator[np.ndarray[Any, Any]]:
    flat = storage.reshape(-1)
    per = max(1, CHUNK_BYTES // max(1, storage.dtype.itemsize))
    for start in range(0, int(flat.shape[0]), per):
        yield var.physical_device.backend.to_numpy(flat[start : start + per])


def restore(reader: st.SafetensorsReader, key: str, var: Variable, checksum: str | None) -> Any:
    """Read tensor ``key`` into ``var``'s storage (allocated if needed); returns the storage.

    ``checksum`` is verified as the bytes pass (None: a plain file without checksums).
    The caller adopts the returned storage with ``var._set_storage``.
    """
    info = reader.tensors[key]
    dtype = np.dtype(info.dtype)
    backend = var.physical_device.backend
    index = var.physical_device.backend_index
    if backend.host:
        buf = restore_target(var, info.shape, dtype)
        reader.read_into(key, buf, expected_checksum=checksum)
        return buf
    if backend.inplace:  # CuPy: chunks through a host staging buffer into the device buffer
        buf = restore_target(var, info.shape, dtype)
        dst = buf.reshape(-1).view(np.uint8)
        staging = np.empty(min(max(info.nbytes, 1), CHUNK_BYTES), dtype=np.uint8)
        offset = 0
        for chunk in reader.read_chunks(key, staging, expected_checksum=checksum):
            n = len(chunk)
            part = backend.asarray(np.frombuffer(chunk, dtype=np.uint8), np.dtype(np.uint8), index)
            backend.apply("assign", dst[offset : offset + n], part, index)
            offset += n
        return buf
    host = np.empty(info.shape, dtype=dtype)  # JAX: one host buffer per tensor, then device_put
    reader.read_into(key, host, expected_checksum=checksum)
    return backend.asarray(host, dtype, index)
