"""CuPy on CUDA devices: every call runs inside ``cupy.cuda.Device(i)``; updates in place.

Checkpoint bytes cross between a device and the host through a pinned staging pool kept
here (:func:`configure_staging`, :func:`staging_bytes`, :func:`release_staging`): per
device, pairs of page-locked buffers with a non-blocking stream and one event per buffer,
reused across tensors and saves, never more pinned bytes than the budget. A transfer
that finds every pair of its device busy (another thread's) goes the pageable way
instead of waiting, so no thread ever waits for staging another holds.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any, Callable, Generator, Iterator, Sequence

import numpy as np

from ._util import draw_dtype, staged_in, staged_out, truncated, unique_rounds

try:
    import cupy
    import cupyx
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the CuPy backend needs cupy: pip install 'gpuvars[cuda12]' or 'gpuvars[cuda13]'"
    ) from err


_elementwise: dict[tuple[str, str, str, str], Any] = {}  # ElementwiseKernels of engine kernels

#: the dtypes CuPy computes with (``cupy/_core/_dtype.pyx``): no long double, no byte-swapped
_CUPY_CHARS = frozenset("?bhilqBHILQefdFD")
#: the dtypes cupyx's atomic scatter kernels take (CuPy 13.6-14.0; int64 only from 14.1):
#: others go round by round, each index once per round
_ATOMIC_SCATTER = {
    "add": frozenset(np.dtype(t) for t in ("int32", "uint32", "uint64", "float16", "float32", "float64")),
    "min": frozenset(np.dtype(t) for t in ("int32", "uint32", "uint64", "float32", "float64")),
}
_ATOMIC_SCATTER["sub"] = _ATOMIC_SCATTER["add"]
_ATOMIC_SCATTER["max"] = _ATOMIC_SCATTER["min"]


def _optional_errors() -> tuple[type[BaseException], ...]:
    """CuPy's error classes that live in optional modules: cuRAND (``random``), NVRTC and the
    kernel compiler (an ElementwiseKernel's first call)."""
    found: list[type[BaseException]] = []
    for module, name in (("cupy_backends.cuda.libs.curand", "CURANDError"), ("cupy.cuda.compiler", "CompileException"),
                         ("cupy_backends.cuda.libs.nvrtc", "NVRTCError"), ("cupy.cuda.nvrtc", "NVRTCError")):
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in found:
            found.append(cls)
    return tuple(found)


def _after_source_work(array: Any) -> None:
    """Wait for the work queued on ``array``'s own GPU (its current stream): a copy to another
    GPU runs on the destination's stream, which is not ordered with the source's."""
    with cupy.cuda.Device(array.device.id):
        cupy.cuda.get_current_stream().synchronize()


#: the ufunc each scatter op applies round by round (mul/div always; the others in dtypes the
#: atomic kernels lack)
_ROUND_OPS: dict[str, Any] = {"add": cupy.add, "sub": cupy.subtract, "min": cupy.minimum, "max": cupy.maximum,
                              "mul": cupy.multiply, "div": cupy.true_divide}


class CupyBackend:
    """cupy.ndarray storage on ``/gpu:N``."""

    name = "cupy"
    platform = "gpu"
    inplace = True
    host = False
    xp = cupy
    oom_errors: tuple[type[BaseException], ...] = (cupy.cuda.memory.OutOfMemoryError,)
    errors: tuple[type[BaseException], ...] = (
        cupy.cuda.runtime.CUDARuntimeError,
        cupy.cuda.driver.CUDADriverError,
        *_optional_errors(),
    )

    def __init__(self) -> None:
        self._count = int(cupy.cuda.runtime.getDeviceCount())

    def device_count(self) -> int:
        return self._count

    def scope(self, device: int) -> Any:
        return cupy.cuda.Device(device)

    def check_dtype(self, dtype: np.dtype[Any]) -> None:
        if dtype.char not in _CUPY_CHARS or not dtype.isnative:  # bfloat16 / float8 (ml_dtypes), long double, ...
            raise TypeError(f"CuPy has no {dtype} arrays (it holds native-order bool, int, uint, float16/32/64 and "
                            "complex64/128)")

    def owns(self, array: object) -> bool:
        return isinstance(array, cupy.ndarray)

    def device_of(self, array: Any) -> int | None:
        return int(array.device.id)

    def asarray(self, value: Any, dtype: np.dtype[Any], device: int) -> Any:
        with cupy.cuda.Device(device):
            if isinstance(value, cupy.ndarray):
                if value.device.id == device:
                    return value.astype(dtype, order="C", copy=True)
                # cupy.copy allocates on the current device and copies across devices (peer
                # or staged); kernels and copyto with casting refuse operands on another GPU
                _after_source_work(value)
                return cupy.copy(value, order="C").astype(dtype, copy=False)
            return cupy.array(np.asarray(value, dtype=dtype), copy=True)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype[Any], device: int) -> Any:
        with cupy.cuda.Device(device):
            return cupy.empty(shape, dtype=dtype)

    def full(self, shape: tuple[int, ...], fill: Any, dtype: np.dtype[Any], device: int) -> Any:
        with cupy.cuda.Device(device):
            out = cupy.empty(shape, dtype=dtype)
            out[...] = cupy.asarray(fill, dtype=dtype)
            return out

    def to_numpy(self, array: Any) -> np.ndarray[Any, Any]:
        with cupy.cuda.Device(array.device.id):
            out: np.ndarray[Any, Any] = cupy.asnumpy(array)
            return out

    def apply(self, op: str, dst: Any, src: Any, device: int) -> Any:
        with cupy.cuda.Device(device):
            if op == "assign":
                cupy.copyto(dst, src, casting="unsafe")
            elif op == "add":
                cupy.add(dst, src, out=dst, casting="unsafe")
            else:
                cupy.subtract(dst, src, out=dst, casting="unsafe")
        return dst

    def scatter(self, op: str, dst: Any, indices: Any, updates: Any, device: int) -> Any:
        with cupy.cuda.Device(device):
            idx = cupy.asarray(indices)
            upd = cupy.asarray(updates, dtype=dst.dtype)
            if op == "update":
                dst[idx] = upd
            elif dst.dtype in _ATOMIC_SCATTER.get(op, ()):
                if op == "add":
                    cupyx.scatter_add(dst, idx, upd)
                elif op == "sub":
                    cupyx.scatter_add(dst, idx, -upd)
                elif op == "min":
                    cupyx.scatter_min(dst, idx, upd)
                else:
                    cupyx.scatter_max(dst, idx, upd)
            else:  # mul/div, and dtypes the atomic kernels lack: one round per repeat of an index
                fn = _ROUND_OPS[op]
                for rows in unique_rounds(cupy.asnumpy(idx)):
                    pos = cupy.asarray(rows)
                    sel = idx[pos]
                    # setitem casts like numpy's ufunc.at (integer division truncates)
                    dst[sel] = fn(dst[sel], upd[pos])
        return dst

    def random(
        self,
        kind: str,
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        seed: int,
        device: int,
        params: Sequence[float],
    ) -> Any:
        a, b = params
        ddt = draw_dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64))
        with cupy.cuda.Device(device):
            rs = cupy.random.RandomState(seed % (2**63))
            if kind == "uniform":
                flat = rs.uniform(a, b, size=n, dtype=ddt)
            elif kind == "normal":
                flat = rs.standard_normal(size=n, dtype=ddt) * b + a
            elif kind == "truncated_normal":
                draw = lambda k: rs.standard_normal(size=k, dtype=ddt)  # noqa: E731
                flat = truncated(draw, n, -2.0, 2.0, cupy) * b + a
            else:
                raise ValueError(f"unknown random kind {kind!r}")
            return flat.astype(dtype, copy=False).reshape(shape)

    def elementwise(self, ins: str, outs: str, body: str, name: str) -> Any:
        """A cached ``cupy.ElementwiseKernel(ins, outs, body, name)`` (compiled on first call)."""
        key = (ins, outs, body, name)
        kernel = _elementwise.get(key)
        if kernel is None:
            kernel = _elementwise[key] = cupy.ElementwiseKernel(ins, outs, body, name)
        return kernel

    def synchronize(self, device: int) -> None:
        with cupy.cuda.Device(device):
            cupy.cuda.Device(device).synchronize()

    def from_dlpack(self, obj: Any, device: int) -> Any:
        with cupy.cuda.Device(device):
            arr = cupy.from_dlpack(obj)
            return arr if arr.device.id == device else self.asarray(arr, arr.dtype, device)

    def chunks_to_host(self, array: Any, device: int, chunk_bytes: int) -> Generator[np.ndarray[Any, Any], None, None]:
        with cupy.cuda.Device(device):
            src = array if array.flags.c_contiguous else cupy.ascontiguousarray(array)
            total = int(src.nbytes)
        if total == 0:
            return
        stager = _lease(device, min(total, chunk_bytes))
        if stager is None:  # every pinned pair of this device is in use: pageable copies
            flat = src.reshape(-1).view(cupy.uint8)
            for offset in range(0, total, chunk_bytes):
                with cupy.cuda.Device(device):
                    chunk: np.ndarray[Any, Any] = cupy.asnumpy(flat[offset : offset + chunk_bytes])
                yield chunk
            return
        try:
            base = int(src.data.ptr)
            d2h = cupy.cuda.runtime.memcpyDeviceToHost

            def copy_out(i: int, offset: int, n: int) -> None:
                with cupy.cuda.Device(device):
                    cupy.cuda.runtime.memcpyAsync(stager.pointers[i], base + offset, n, d2h, stager.stream.ptr)
                    stager.events[i].record(stager.stream)

            stager.after_queued_work()  # the copies read what the work queued so far wrote
            size = min(total, chunk_bytes, stager.capacity)
            yield from staged_out(total, [b[:size] for b in stager.readonly], copy_out, stager.wait)
        finally:
            _give_back(stager)  # drains copies still queued when the consumer stopped early

    def chunks_to_device(
        self, dst: Any, device: int, chunk_bytes: int, fill: Callable[[list[memoryview]], Iterator[memoryview]]
    ) -> None:
        total = int(dst.nbytes)
        if total == 0:  # nothing to copy; the reader still checks the (empty) tensor's checksum
            for _ in fill([memoryview(bytearray(0))]):
                pass
            return
        with cupy.cuda.Device(device):
            target = dst if dst.flags.c_contiguous else cupy.empty(dst.shape, dtype=dst.dtype)
        flat = target.reshape(-1).view(cupy.uint8)
        size = min(total, chunk_bytes)
        stager = _lease(device, size)
        if stager is None:  # every pinned pair of this device is in use: pageable copies
            done = 0
            for chunk in fill([memoryview(bytearray(size))]):
                with cupy.cuda.Device(device):
                    flat[done : done + chunk.nbytes].set(np.frombuffer(chunk, np.uint8))
                    # set() is asynchronous on the current stream; the next chunk reuses the buffer
                    cupy.cuda.get_current_stream().synchronize()
                done += chunk.nbytes
        else:
            try:
                base = int(flat.data.ptr)
                h2d = cupy.cuda.runtime.memcpyHostToDevice

                def copy_in(i: int, view: memoryview, offset: int) -> None:
                    if offset + view.nbytes > total:  # never past the end of dst, whatever fill yields
                        raise ValueError(f"expected {total} bytes for the device array, received more")
                    host = np.frombuffer(view, np.uint8).ctypes.data  # the buffer fill chose
                    with cupy.cuda.Device(device):
                        cupy.cuda.runtime.memcpyAsync(base + offset, host, view.nbytes, h2d, stager.stream.ptr)
                        stager.events[i].record(stager.stream)

                stager.after_queued_work()  # no copy lands under a kernel still reading dst
                size = min(size, stager.capacity)
                done = staged_in(fill([b[:size].data for b in stager.arrays]), 2, copy_in, stager.wait)
                stager.drain()  # on the device before anyone reads dst
            finally:
                _give_back(stager)
        if done != total:
            raise ValueError(f"expected {total} bytes for the device array, received {done}")
        if target is not dst:
            with cupy.cuda.Device(device):
                dst[...] = target


# --- the pinned staging pool ------------------------------------------------------------------

_MIN_BUFFER = 1 << 20  # a pair for tiny tensors costs 2 MiB once, not a cudaHostAlloc per tensor
_lock = threading.Lock()
_buffer_bytes = 64 << 20  # one staging buffer; a pair double-buffers one transfer
_budget_bytes = 2 * _buffer_bytes  # pinned bytes per device, all pairs together
_generation = 0  # bumped by configure/release: pairs of an older generation are freed on return
_pools: dict[int, list[_Stager]] = {}  # device -> every live pair (idle or lent)


class _Stager:
    """Two pinned host buffers, a non-blocking stream and an event per buffer, on one device;
    lent to one transfer at a time. CUDA objects are made on first use, outside the pool lock."""

    def __init__(self, device: int, generation: int) -> None:
        self.device = device
        self.generation = generation
        self.lent = True
        self.capacity = 0
        self.arrays: list[np.ndarray[Any, Any]] = []
        self.readonly: list[np.ndarray[Any, Any]] = []
        self.pointers: list[int] = []
        self.stream: Any = None
        self.events: list[Any] = []
        self.ready: list[Any] = []

    def reserve(self, nbytes: int, limit: int) -> None:
        """Buffers of at least ``min(nbytes, limit)`` bytes (grown in powers of two up to ``limit``)."""
        with cupy.cuda.Device(self.device):
            if self.stream is None:
                self.stream = cupy.cuda.Stream(non_blocking=True)
                # blocking sync: a thread waiting for a copy sleeps instead of spinning a core
                self.events = [cupy.cuda.Event(block=True, disable_timing=True) for _ in range(2)]
                # a stream waits for an event as last recorded when it is told to: reusable at once
                self.ready = [cupy.cuda.Event(disable_timing=True) for _ in range(2)]
            if self.capacity >= min(nbytes, limit):
                return
            want = min(limit, max(_MIN_BUFFER, 1 << max(0, nbytes - 1).bit_length()))
            self.arrays, self.readonly, self.pointers, self.capacity = [], [], [], 0  # free first: the budget holds
            memory = [cupy.cuda.PinnedMemory(want, cupy.cuda.runtime.hostAllocPortable) for _ in range(2)]
        self.arrays = [np.frombuffer(cupy.cuda.PinnedMemoryPointer(m, 0), np.uint8, want) for m in memory]
        self.readonly = [a.view() for a in self.arrays]
        for a in self.readonly:
            a.flags.writeable = False  # what a save's consumer gets: it reads, the stream writes
        self.pointers = [int(m.ptr) for m in memory]
        self.capacity = want

    def after_queued_work(self) -> None:
        """Order this stream after the work already queued on the current stream and, through
        the legacy null stream, on every blocking stream of the device."""
        with cupy.cuda.Device(self.device):
            current = cupy.cuda.get_current_stream()
            streams = [current] if int(current.ptr) == 0 else [current, cupy.cuda.Stream.null]
            for stream, ready in zip(streams, self.ready):
                ready.record(stream)
                self.stream.wait_event(ready)

    def wait(self, i: int) -> None:
        self.events[i].synchronize()

    def drain(self) -> None:
        if self.stream is not None:
            with cupy.cuda.Device(self.device):
                self.stream.synchronize()


def _lease(device: int, nbytes: int) -> _Stager | None:
    """An idle pair of ``device`` with buffers for ``nbytes`` (at most the buffer size), a new
    one while the budget allows, or None when every pair is lent."""
    with _lock:
        pairs = _pools.setdefault(device, [])
        stager = next((s for s in pairs if not s.lent), None)
        if stager is not None:
            stager.lent = True
        elif len(pairs) < _budget_bytes // (2 * _buffer_bytes):
            stager = _Stager(device, _generation)  # counted now: two threads cannot both pass the budget
            pairs.append(stager)
        else:
            return None
        limit = _buffer_bytes
    try:
        stager.reserve(nbytes, limit)  # pinned memory exhausted: CUDARuntimeError, mapped by the engine
    except BaseException:
        _give_back(stager)
        raise
    return stager


def _give_back(stager: _Stager) -> None:
    """Return a pair once its stream is idle; a pair that cannot be drained (a CUDA error) or
    belongs to an older configuration is dropped, and its pinned memory freed."""
    try:
        stager.drain()
        reusable = True
    except Exception:
        reusable = False
    with _lock:
        pairs = _pools.get(stager.device, [])
        if reusable and stager.generation == _generation:
            stager.lent = False
        elif stager in pairs:
            pairs.remove(stager)


def configure_staging(*, buffer_bytes: int | None = None, budget_bytes: int | None = None) -> tuple[int, int]:
    """Set the staging buffer size and the pinned budget per device (at least one pair of
    buffers); frees idle pairs; returns the previous ``(buffer_bytes, budget_bytes)``."""
    global _buffer_bytes, _budget_bytes
    buffer = _buffer_bytes if buffer_bytes is None else int(buffer_bytes)
    budget = 2 * buffer if budget_bytes is None else int(budget_bytes)
    if buffer < 1 or budget < 2 * buffer:
        raise ValueError(
            f"staging needs buffer_bytes >= 1 and budget_bytes >= 2 * buffer_bytes, "
            f"received buffer_bytes={buffer}, budget_bytes={budget}"
        )
    with _lock:
        previous = (_buffer_bytes, _budget_bytes)
        _buffer_bytes, _budget_bytes = buffer, budget
    release_staging()
    return previous


def staging_bytes(device: int | None = None) -> int:
    """Pinned bytes the pool holds for ``device`` (every device: None), idle and lent."""
    with _lock:
        pools = _pools.values() if device is None else [_pools.get(device, [])]
        return sum(2 * s.capacity for pairs in pools for s in pairs)


def release_staging() -> int:
    """Free every idle pair (lent ones when they come back); returns the pinned bytes freed now."""
    global _generation
    with _lock:
        _generation += 1
        freed = 0
        for pairs in _pools.values():
            for s in [s for s in pairs if not s.lent]:
                freed += 2 * s.capacity
                pairs.remove(s)
        return freed
