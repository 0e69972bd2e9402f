"""Bytes between one plain variable's storage and a file, without whole-model host copies.

Host storage (a CPU backend that updates in place: numpy) is written from and read into
directly. Device storage that updates in place (CuPy) moves in bounded chunks
(``CHUNK_BYTES``) through host staging; storage of a backend that rebinds (JAX) is
rebuilt from one host buffer per tensor, a JAX CPU array is saved from a host view.

Variables are reached only through their public API and the engine access functions of
``gpuvars.variable`` (``restore_target``, ``adopt``). Every backend call and allocation
is mapped by ``gpuvars._backend_errors`` (an out-of-memory error becomes a
ResourceExhaustedError naming the key and the file). The per-tensor paths call
``map_backend_error`` from a plain ``try``: the ``backend_errors`` context manager costs
2.3 us per use here (a generator and its wrapper per call), 46 ms per 20,000-tensor restore,
and builds its message up front; this builds it only on failure.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, NoReturn, Sequence

import numpy as np

from gpuvars._backend_errors import backend_errors, map_backend_error
from gpuvars.checkpoint import _stformat as st
from gpuvars.placement import PhysicalDevice
from gpuvars.variable import Variable, adopt, exclusive, restore_target

CHUNK_BYTES = 64 << 20


def _raise_mapped(exc: Exception, device: PhysicalDevice | None, what: str) -> NoReturn:
    mapped = map_backend_error(exc, device, what)
    if mapped is None:
        raise exc
    raise mapped from exc


def source(array: Any, device: PhysicalDevice, what: str) -> Any:
    """What the writer streams for ``array`` (a pinned storage or its copy, on ``device``): a
    host array (the storage itself, no copy), or an iterator of host chunks of device storage."""
    if device.backend.platform == "cpu":
        try:
            return np.asarray(array)  # numpy: the storage itself; JAX on CPU: a host view
        except Exception as exc:
            _raise_mapped(exc, device, what)
    return _device_chunks(device, array, what)


def is_host(device: PhysicalDevice) -> bool:
    """Whether ``device``'s storage is host memory that :func:`host_sources` views without a copy."""
    return bool(device.backend.platform == "cpu")


def host_sources(arrays: Sequence[Any], devices: Sequence[PhysicalDevice], what: Callable[[int], str]) -> list[Any]:
    """:func:`source` for a run of host arrays (``is_host`` devices): numpy storage as it is,
    a JAX CPU array as a host view; ``what(i)`` names the i-th for an error."""
    out = list(arrays)
    for i, a in enumerate(out):
        if type(a) is not np.ndarray:
            try:
                out[i] = np.asarray(a)
            except Exception as exc:
                _raise_mapped(exc, devices[i], what(i))
    return out


def _device_chunks(device: PhysicalDevice, value: Any, what: str) -> Iterator[np.ndarray[Any, Any]]:
    from gpuvars_backends import HostStaging

    backend = device.backend
    if isinstance(backend, HostStaging):  # CuPy: pinned double buffers on a side stream
        chunks = backend.chunks_to_host(value, device.backend_index, CHUNK_BYTES)
        try:
            while True:
                with backend_errors(device, what):
                    chunk = next(chunks, None)
                if chunk is None:
                    return
                yield chunk
        finally:
            chunks.close()  # hands the pinned buffers back now, also when the writer stops early
    # JAX on a GPU: blocks of whole rows (slices along axis 0: no copy of the whole tensor on
    # the device, which an eager reshape(-1) would make) whose host copies start one chunk ahead
    # (copy_to_host_async), so the next block crosses while this one is written; each slice and
    # its host copy die after its write (the variable's own array never caches a host copy).
    with backend_errors(device, what):
        if value.ndim == 0:
            value = value.reshape(1)  # one element: the copy is the element
        rows = int(value.shape[0])
        row_bytes = value.dtype.itemsize * math.prod(int(d) for d in value.shape[1:])
        per = max(1, CHUNK_BYTES // max(1, row_bytes))  # a row bigger than a chunk is a chunk
        starts = range(0, rows, per)
        ahead = value[0:per] if rows else None
        if ahead is not None and hasattr(ahead, "copy_to_host_async"):
            ahead.copy_to_host_async()
    for start in starts:
        with backend_errors(device, what):
            part, ahead = ahead, (value[start + per : start + 2 * per] if start + per < rows else None)
            if ahead is not None and hasattr(ahead, "copy_to_host_async"):
                ahead.copy_to_host_async()
            chunk = (np.asarray(part) if hasattr(part, "copy_to_host_async") else backend.to_numpy(part)).reshape(-1)
        yield chunk
        del part, chunk


def host_tensor(reader: st.SafetensorsReader, key: str, checksum: str | None, device: PhysicalDevice | None) -> Any:
    """Tensor ``key`` in a new host array (checksum verified as it is read); running out of
    host memory is a ResourceExhaustedError naming the key and file."""
    info = reader.tensors[key]
    try:
        host = np.empty(info.shape, dtype=info.dtype)
    except Exception as exc:
        _raise_mapped(exc, device, f"reading tensor {key!r} of {reader.path!r} into host memory")
    reader.read_into(key, host, expected_checksum=checksum)
    return host


def restore_into(reader: st.SafetensorsReader, key: str, var: Variable, checksum: str | None) -> None:
    """Read tensor ``key`` into ``var``'s storage (allocated only when the shape changes)
    and make it the value. ``checksum`` is verified as the bytes pass (None: a plain file)."""
    info = reader.tensors[key]
    device = var.physical_device
    backend = device.backend
    try:
        with exclusive(var):  # no mutation, and no save's pin, sees the buffer half-restored
            if backend.inplace and backend.platform == "cpu":  # host memory: read straight into it
                buf = restore_target(var, info.shape, info.dtype)
                reader.read_into(key, buf, expected_checksum=checksum)
            elif backend.inplace:  # device memory: chunks through a host staging buffer
                buf = restore_target(var, info.shape, info.dtype)
                _stream_to_device(reader, key, buf, device, checksum)
            else:  # a rebinding backend (JAX): a private host buffer the backend may adopt
                host = _aligned_empty(info.shape, info.dtype)
                reader.read_into(key, host, expected_checksum=checksum)
                # DLPack: JAX on the CPU takes an aligned host buffer without a copy (on a GPU,
                # one copy to the device); nobody else holds ``host``
                buf = backend.from_dlpack(host, device.backend_index)
            adopt(var, buf)
    except Exception as exc:
        _raise_mapped(exc, device, f"restoring {key!r} from {reader.path!r} into variable {var.name!r}")


_ALIGN = 64  #: XLA's CPU client adopts a host buffer without copying it when it is this aligned


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """An uninitialized C-contiguous host array whose data starts on an ``_ALIGN``-byte boundary
    (numpy's own large arrays start 16 bytes past a page, which JAX would copy)."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def run_target(device: PhysicalDevice) -> bool:
    """Whether :func:`restore_run` takes variables on ``device``: host storage updated in place."""
    backend = device.backend
    return bool(backend.inplace and backend.platform == "cpu")


def restore_run(reader: st.SafetensorsReader, keys: list[str], variables: list[Variable],
                checksums: list[str | None]) -> None:
    """:func:`restore_into` for a run of tensors back to back in the file, each into a
    :func:`run_target` variable: every variable held (:func:`exclusive`) for the run, one
    ``preadv`` into their storages, each checksum verified, then each buffer adopted.

    The variables' locks are only tried: when another thread holds one, the run lets go of
    what it holds and restores key by key (no lock-order deadlock with anyone)."""
    tensors = reader.tensors
    held: list[Any] = []
    n = 0
    try:
        for var in variables:
            lock: Any = exclusive(var)
            if not lock.acquire(blocking=False):
                break
            held.append(lock)
        if len(held) == len(variables):
            bufs = []
            for n, (key, var) in enumerate(zip(keys, variables)):
                info = tensors[key]
                bufs.append(restore_target(var, info.shape, info.dtype))
            n = -1  # a failure from here on is the run's read
            reader.read_run(keys, bufs, checksums)
            for var, buf in zip(variables, bufs):
                adopt(var, buf)
            return
    except Exception as exc:
        k = max(n, 0)
        _raise_mapped(exc, variables[k].physical_device,
                      f"restoring {keys[k]!r} from {reader.path!r} into variable {variables[k].name!r}")
    finally:
        for lock in reversed(held):
            lock.release()
    for key, var, checksum in zip(keys, variables, checksums):  # a lock was busy: one by one
        restore_into(reader, key, var, checksum)


def _stream_to_device(
    reader: st.SafetensorsReader, key: str, buf: Any, device: PhysicalDevice, checksum: str | None
) -> None:
    from gpuvars_backends import HostStaging

    info = reader.tensors[key]
    backend, index = device.backend, device.backend_index
    if isinstance(backend, HostStaging):  # CuPy: file -> pinned buffer A while B crosses to the device
        backend.chunks_to_device(
            buf,
            index,
            CHUNK_BYTES,
            lambda buffers: reader.read_chunks(
                key, buffers[0], spare=buffers[1] if len(buffers) > 1 else None, expected_checksum=checksum
            ),
        )
        return
    dst = buf.reshape(-1).view(np.uint8)
    staging = np.empty(min(max(info.nbytes, 1), CHUNK_BYTES), dtype=np.uint8)
    offset = 0
    u8 = np.dtype(np.uint8)
    for chunk in reader.read_chunks(key, staging, expected_checksum=checksum):
        n = len(chunk)
        part = backend.asarray(np.frombuffer(chunk, dtype=np.uint8), u8, index)
        backend.apply("assign", dst[offset : offset + n], part, index)
        offset += n
