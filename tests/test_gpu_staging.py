"""Checkpoint bytes between CuPy device memory and files through the pinned staging pool.

Two halves. The double-buffering schedule (``gpuvars_backends._util.staged_out`` /
``staged_in``) runs everywhere against a numpy stand-in of a CUDA stream: copies queue in
order and land only when the device "gets to them", so a schedule that hands out a buffer
before its copy landed, or refills one still in use, reads the wrong bytes. The CuPy half
(marked ``gpu``, skipped without a usable GPU) saves and restores CuPy variables through
the real pool: sizes 0, 1, not a multiple of the chunk, many chunks; bfloat16 bytes; many
tensors reusing one pair of pinned buffers; the pinned budget under concurrent threads;
early stops; pinned allocation failures mapped to gpuvars errors naming key and file.
"""

from __future__ import annotations

import contextvars
import glob
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

import gpuvars_backends as backends
import gpuvars as gv
from gpuvars import config
from gpuvars.checkpoint import _transfer
from gpuvars.checkpoint._stformat import SafetensorsReader, SafetensorsWriter
from gpuvars_backends._util import staged_in, staged_out

# --- the schedule, on a numpy stand-in of a stream ------------------------------------------


class Stream:
    """A CUDA stream's contract in numpy: copies run in queue order, each only when the
    device reaches it (``wait`` for a buffer, or ``progress`` at any moment); what a copy
    reads is read when it runs, as on a device."""

    def __init__(self) -> None:
        self.queue: deque[tuple[int, Callable[[], None]]] = deque()

    def put(self, buffer: int, op: Callable[[], None]) -> None:
        self.queue.append((buffer, op))

    def progress(self, count: int | None = None) -> None:
        for _ in range(len(self.queue) if count is None else min(count, len(self.queue))):
            self.queue.popleft()[1]()

    def wait(self, buffer: int) -> None:
        """Run the queue up to and including the last copy queued for ``buffer``."""
        last = max((k for k, (b, _) in enumerate(self.queue) if b == buffer), default=-1)
        self.progress(last + 1)

    def busy(self, buffer: int) -> bool:
        return any(b == buffer for b, _ in self.queue)


def rng_bytes(n: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)


@pytest.mark.parametrize("total", [0, 1, 7, 8, 9, 64, 100])
@pytest.mark.parametrize("size,depth", [(1, 2), (8, 2), (7, 3), (200, 2)])
def test_staged_out_hands_out_each_chunk_after_its_copy(total: int, size: int, depth: int) -> None:
    device = rng_bytes(total)
    buffers = [np.full(size, 0xAA, np.uint8) for _ in range(depth)]
    stream = Stream()
    issued = 0

    def start(i: int, offset: int, n: int) -> None:
        nonlocal issued
        issued += 1

        def copy() -> None:
            buffers[i][:n] = device[offset : offset + n]

        stream.put(i, copy)

    chunks = -(-total // size)
    got = []
    for k, chunk in enumerate(staged_out(total, buffers, start, stream.wait)):
        held = next(i for i, b in enumerate(buffers) if np.shares_memory(chunk, b))
        assert held == k % depth
        assert not stream.busy(held), "a copy into the buffer in the caller's hands is queued"
        # while chunk k is written, chunks k+1 .. k+depth-1 are already on their way
        assert issued == min(chunks, k + depth)
        stream.progress()  # the device finishes everything queued while the caller writes
        got.append(chunk.tobytes())
    assert b"".join(got) == device.tobytes()
    assert all(len(g) == size for g in got[:-1])
    assert len(got) == chunks


def test_staged_out_refuses_empty_buffers_for_bytes() -> None:
    with pytest.raises(ValueError, match="non-empty to move 3 bytes"):
        list(staged_out(3, [np.zeros(0, np.uint8)] * 2, lambda i, o, n: None, lambda i: None))
    assert list(staged_out(0, [np.zeros(0, np.uint8)] * 2, lambda i, o, n: None, lambda i: None)) == []


def test_staged_out_stopped_early_leaves_the_queue_to_the_caller() -> None:
    buffers = [np.zeros(8, np.uint8) for _ in range(2)]
    stream = Stream()
    chunks = staged_out(64, buffers, lambda i, o, n: stream.put(i, lambda: None), stream.wait)
    next(chunks)
    chunks.close()
    assert len(stream.queue) == 1  # chunk 1 was queued: the caller drains before reusing buffers


def alternating_source(data: np.ndarray[Any, Any], stream: Stream) -> Callable[[list[memoryview]], Iterator[memoryview]]:
    """A stand-in for ``read_chunks(..., spare=)``: chunk k is written into buffer k % len, and
    writing into a buffer whose copy to the device is still queued is a failure."""

    def fill(buffers: list[memoryview]) -> Iterator[memoryview]:
        size = buffers[0].nbytes
        for k, off in enumerate(range(0, data.nbytes, max(1, size))):
            i = k % len(buffers)
            assert not stream.busy(i), f"chunk {k} overwrites buffer {i} while its copy is queued"
            n = min(size, data.nbytes - off)
            np.frombuffer(buffers[i], np.uint8)[:n] = data[off : off + n]
            yield buffers[i][:n]

    return fill


@pytest.mark.parametrize("total", [0, 1, 7, 8, 9, 100])
@pytest.mark.parametrize("size,depth", [(1, 2), (8, 2), (7, 3), (200, 2)])
def test_staged_in_refills_a_buffer_only_after_its_copy(total: int, size: int, depth: int) -> None:
    data = rng_bytes(total, seed=1)
    device = np.full(total, 0x55, np.uint8)
    raw = [bytearray(size) for _ in range(depth)]
    buffers = [memoryview(b) for b in raw]
    stream = Stream()
    queued_while_reading = 0

    def start(i: int, view: memoryview, offset: int) -> None:
        nonlocal queued_while_reading
        queued_while_reading += bool(stream.queue)  # an earlier chunk is still crossing

        def copy() -> None:
            device[offset : offset + view.nbytes] = np.frombuffer(view, np.uint8)

        stream.put(i, copy)

    done = staged_in(alternating_source(data, stream)(buffers), depth, start, stream.wait)
    assert done == total
    stream.progress()  # the caller's drain
    assert device.tobytes() == data.tobytes()
    chunks = -(-total // size)
    assert queued_while_reading == max(0, chunks - 1)


def test_staged_in_with_the_reader_and_a_spare(tmp_path: Path) -> None:
    """The real reader's alternation (``spare=``) is the one ``staged_in`` assumes."""
    data = rng_bytes(1000, seed=2)
    path = tmp_path / "t.safetensors"
    with SafetensorsWriter(path, [("x", np.uint8, (1000,))]) as writer:
        writer.write("x", data)
        record = writer.commit()
    device = np.zeros(1000, np.uint8)
    stream = Stream()
    a, b = np.zeros(64, np.uint8), np.zeros(64, np.uint8)

    def start(i: int, view: memoryview, offset: int) -> None:
        assert np.shares_memory(np.frombuffer(view, np.uint8), (a, b)[i])
        stream.put(i, lambda: device.__setitem__(slice(offset, offset + view.nbytes), np.frombuffer(view, np.uint8)))

    with SafetensorsReader(path) as reader:
        chunks = reader.read_chunks("x", a, spare=b, expected_checksum=record.tensors["x"])
        assert staged_in(chunks, 2, start, stream.wait) == 1000
    stream.progress()
    assert device.tobytes() == data.tobytes()


# --- the engine's wiring (checkpoint._transfer), with a backend over host arrays --------------


def random_value(dtype: Any, shape: tuple[int, ...], seed: int = 0) -> np.ndarray[Any, Any]:
    """Arbitrary bit patterns (NaN payloads included), so "equal" means bit-identical."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    if dt == np.bool_:
        return np.random.default_rng(seed).integers(0, 2, size=shape).astype(np.bool_)
    return rng_bytes(n * dt.itemsize, seed).view(dt).reshape(shape)


def same_bytes(a: Any, b: Any) -> bool:
    return bool(np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())


class HostArrays:
    """A backend with ``HostStaging`` whose "device" arrays are numpy arrays: what the
    engine's ``_device_chunks`` / ``_stream_to_device`` do with any such backend (error
    mapping, early close, the reader's spare buffer), without a GPU."""

    name, platform, inplace, host = "host-arrays", "gpu", True, False
    oom_errors: tuple[type[BaseException], ...] = (MemoryError,)
    errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.closed = 0
        self.depths: list[int] = []

    def chunks_to_host(self, array: Any, device: int, chunk_bytes: int) -> Iterator[np.ndarray[Any, Any]]:
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        buffers = [np.empty(min(chunk_bytes, max(1, flat.nbytes)), np.uint8) for _ in range(2)]

        def start(i: int, offset: int, n: int) -> None:
            if offset == self.fail_at:
                raise MemoryError(f"no memory at byte {offset}")
            buffers[i][:n] = flat[offset : offset + n]

        try:
            yield from staged_out(flat.nbytes, buffers, start, lambda i: None)
        finally:
            self.closed += 1

    def chunks_to_device(
        self, dst: Any, device: int, chunk_bytes: int, fill: Callable[[list[memoryview]], Iterator[memoryview]]
    ) -> None:
        flat = dst.reshape(-1).view(np.uint8)
        size = max(1, min(chunk_bytes, flat.nbytes))
        buffers = [memoryview(bytearray(size)) for _ in range(2)]
        self.depths.append(len(buffers))

        def start(i: int, view: memoryview, offset: int) -> None:
            flat[offset : offset + view.nbytes] = np.frombuffer(view, np.uint8)

        assert staged_in(fill(buffers), 2, start, lambda i: None) == flat.nbytes


class Device:
    def __init__(self, backend: HostArrays) -> None:
        self.backend, self.backend_index, self.name = backend, 0, "/gpu:0"


def test_device_chunks_go_through_a_backends_host_staging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_transfer, "CHUNK_BYTES", 16)
    value = random_value(np.float32, (21,))
    backend = HostArrays()
    assert isinstance(backend, backends.HostStaging)
    got = b"".join(c.tobytes() for c in _transfer._device_chunks(Device(backend), value, "saving 'v'"))  # type: ignore[arg-type]
    assert got == value.tobytes() and backend.closed == 1
    chunks = _transfer._device_chunks(Device(backend), value, "saving 'v'")  # type: ignore[arg-type]
    next(chunks)
    chunks.close()  # the writer stopped early: the backend's staging is handed back at once
    assert backend.closed == 2
    failing = HostArrays(fail_at=32)
    with pytest.raises(gv.ResourceExhaustedError, match=r"saving 'v' ran out of memory on /gpu:0: MemoryError"):
        list(_transfer._device_chunks(Device(failing), value, "saving 'v'"))  # type: ignore[arg-type]
    assert failing.closed == 1


def test_stream_to_device_reads_into_the_backends_buffers_in_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_transfer, "CHUNK_BYTES", 16)
    value = random_value(np.float64, (13,))
    path = tmp_path / "t.safetensors"
    with SafetensorsWriter(path, [("x", np.float64, (13,)), ("e", np.float64, (0,))]) as writer:
        writer.write("x", value)
        writer.write("e", np.zeros(0))
        record = writer.commit()
    backend = HostArrays()
    with SafetensorsReader(path) as reader:
        dst = np.zeros(13)
        _transfer._stream_to_device(reader, "x", dst, Device(backend), record.tensors["x"])  # type: ignore[arg-type]
        assert same_bytes(dst, value) and backend.depths == [2]
        _transfer._stream_to_device(reader, "e", np.zeros(0), Device(backend), record.tensors["e"])  # type: ignore[arg-type]
        with pytest.raises(gv.CheckpointCorruptError, match="checksum mismatch"):
            _transfer._stream_to_device(reader, "x", dst, Device(backend), "0" * 16)  # type: ignore[arg-type]


# --- CuPy: the real pool ----------------------------------------------------------------------

CHUNK = 4096  # staging buffers and chunks this small make "several chunks" cheap


@pytest.fixture
def cupy_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """CuPy serving /gpu:N, 4 KiB chunks through 4 KiB pinned buffers (one pair per device);
    the pool is released afterwards. Yields the backend module."""
    probe = backends.probe("cupy", "gpu")
    if not probe.usable:
        pytest.skip(f"CuPy cannot use a GPU here: {probe.reason}")
    import gpuvars_backends.cupy as cupy_backend

    config.set_gpu_backend("cupy")
    monkeypatch.setattr(_transfer, "CHUNK_BYTES", CHUNK)
    previous = cupy_backend.configure_staging(buffer_bytes=CHUNK, budget_bytes=2 * CHUNK)
    try:
        yield cupy_backend
    finally:
        cupy_backend.configure_staging(buffer_bytes=previous[0], budget_bytes=previous[1])
        cupy_backend.release_staging()


SHAPES = [(0,), (1,), (3, 0, 2), (), (CHUNK // 4 - 1,), (CHUNK // 4 + 3,), (5, CHUNK // 4), (257, 33)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int8, np.uint64, np.bool_, np.complex64])
def test_cupy_save_and_restore_are_bit_identical(cupy_gpu: Any, tmp_path: Path, dtype: Any) -> None:
    import cupy

    values = [random_value(dtype, shape, seed) for seed, shape in enumerate(SHAPES)]
    variables = [gv.Variable(v, name=f"v{k}", device="/gpu:0") for k, v in enumerate(values)]
    assert all(isinstance(v.value(), cupy.ndarray) for v in variables)
    saver = gv.Saver(variables)
    prefix = saver.save(str(tmp_path / "m"))
    reader_values = {}
    for path in glob.glob(prefix + "*.safetensors"):
        with SafetensorsReader(path) as reader:
            reader_values.update({k: reader.get_tensor(k) for k in reader.keys()})
    for k, value in enumerate(values):
        assert same_bytes(reader_values[f"v{k}"], value), f"file bytes of v{k} {value.shape}"
    for v in variables:
        v.assign(np.zeros(v.shape, dtype))
    saver.restore(prefix)
    for v, value in zip(variables, values):
        assert v.value().shape == value.shape
        assert same_bytes(cupy.asnumpy(v.value()), value), f"restored {v.name} {value.shape}"
    assert cupy_gpu.staging_bytes(0) <= 2 * CHUNK


@pytest.mark.gpu
def test_cupy_staging_moves_bfloat16_bytes(cupy_gpu: Any, tmp_path: Path) -> None:
    """CuPy holds no bfloat16 arrays (a gpuvars CuPy variable refuses the dtype), but the
    staging moves bytes: a device array of bfloat16 bits goes to a BF16 tensor and back."""
    import cupy
    import ml_dtypes

    host = random_value(ml_dtypes.bfloat16, (3 * CHUNK // 2 + 5,), seed=7)
    bits = cupy.asarray(host.view(np.uint16))
    backend: Any = backends.get("cupy", "gpu")
    path = tmp_path / "bf16.safetensors"
    with SafetensorsWriter(path, [("b", ml_dtypes.bfloat16, host.shape)]) as writer:
        writer.write("b", backend.chunks_to_host(bits, 0, CHUNK))
        record = writer.commit()
    with SafetensorsReader(path) as reader:
        assert same_bytes(reader.get_tensor("b"), host)
        back = cupy.zeros(host.shape, cupy.uint16)
        backend.chunks_to_device(
            back, 0, CHUNK,
            lambda bufs: reader.read_chunks("b", bufs[0], spare=bufs[1] if len(bufs) > 1 else None,
                                            expected_checksum=record.tensors["b"]),
        )
    assert same_bytes(cupy.asnumpy(back), host.view(np.uint16))


@pytest.mark.gpu
def test_cupy_many_tensors_reuse_one_pinned_pair(cupy_gpu: Any, tmp_path: Path) -> None:
    import cupy

    values = [random_value(np.float32, (k % 7 * 500 + 1,), k) for k in range(120)]
    variables = [gv.Variable(v, name=f"t{k}", device="/gpu:0") for k, v in enumerate(values)]
    saver = gv.Saver(variables)
    held = []
    for step in range(3):
        prefix = saver.save(str(tmp_path / f"m{step}"))
        saver.restore(prefix)
        held.append(cupy_gpu.staging_bytes(0))
    assert held[0] == held[1] == held[2] == 2 * CHUNK  # one pair, allocated once, reused
    for v, value in zip(variables, values):
        assert same_bytes(cupy.asnumpy(v.value()), value)
    assert cupy_gpu.release_staging() == 2 * CHUNK
    assert cupy_gpu.staging_bytes() == 0
    saver.restore(saver.save(str(tmp_path / "again")))  # a released pool starts over
    assert cupy_gpu.staging_bytes(0) == 2 * CHUNK


@pytest.mark.gpu
def test_cupy_pinned_budget_holds_under_threads(cupy_gpu: Any, tmp_path: Path) -> None:
    """Threads saving and restoring at once: one pair per device is lent, the others copy
    through pageable memory; pinned bytes never exceed the budget; every result is exact."""
    import cupy

    values = [random_value(np.float64, (3000 + t,), t) for t in range(6)]
    variables = [gv.Variable(v, name=f"w{t}", device="/gpu:0") for t, v in enumerate(values)]
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], cupy_gpu.staging_bytes(0))

    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            saver = gv.Saver([variables[t]])
            for step in range(5):
                prefix = saver.save(str(tmp_path / f"w{t}-{step}"))
                variables[t].assign(np.zeros(values[t].shape, np.float64))
                saver.restore(prefix)
                assert same_bytes(cupy.asnumpy(variables[t].value()), values[t])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    # each thread runs in a copy of this context: the test's registry and settings
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(work, t)) for t in range(len(values))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stop.set()
    watcher.join()
    assert not errors, errors
    assert 0 < peak[0] <= 2 * CHUNK


@pytest.mark.gpu
def test_cupy_staging_orders_after_queued_work(cupy_gpu: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save right after in-place updates still queued on the device sees them: the side
    stream waits for the current stream (here a user's non-blocking one) and the null stream."""
    import cupy

    cupy_gpu.configure_staging(buffer_bytes=1 << 20, budget_bytes=2 << 20)
    monkeypatch.setattr(_transfer, "CHUNK_BYTES", 1 << 20)
    n = 8 << 20
    v = gv.Variable(np.zeros(n, np.float32), name="big", device="/gpu:0")
    with cupy.cuda.Stream(non_blocking=True):
        for _ in range(20):  # queued, not finished, when the save starts
            v.assign_add(np.ones(n, np.float32))
        prefix = gv.Saver([v]).save(str(tmp_path / "m"))
    (path,) = glob.glob(prefix + "*.safetensors")
    with SafetensorsReader(path) as reader:
        assert np.all(reader.get_tensor("big") == 20)


@pytest.mark.gpu
def test_cupy_non_contiguous_and_early_stop(cupy_gpu: Any) -> None:
    import cupy

    backend: Any = backends.get("cupy", "gpu")
    base = cupy.asarray(random_value(np.float32, (64, 96), 3))
    view = base[:, ::2]
    got = b"".join(c.tobytes() for c in backend.chunks_to_host(view, 0, CHUNK))
    assert got == np.ascontiguousarray(cupy.asnumpy(view)).tobytes()

    data = random_value(np.float32, view.shape, 4)
    dst = cupy.zeros((64, 96), cupy.float32)[:, 1::2]

    def fill(bufs: list[memoryview]) -> Iterator[memoryview]:
        raw = data.view(np.uint8).reshape(-1)
        size = bufs[0].nbytes
        for k, off in enumerate(range(0, raw.nbytes, size)):
            part = bufs[k % len(bufs)][: min(size, raw.nbytes - off)]
            np.frombuffer(part, np.uint8)[:] = raw[off : off + part.nbytes]
            yield part

    backend.chunks_to_device(dst, 0, CHUNK, fill)
    assert same_bytes(cupy.asnumpy(dst), data)

    before = cupy_gpu.staging_bytes(0)
    chunks = backend.chunks_to_host(base, 0, CHUNK)
    next(chunks)  # chunk 1 is now in flight into the other buffer
    chunks.close()  # drained and handed back
    again = b"".join(c.tobytes() for c in backend.chunks_to_host(base, 0, CHUNK))
    assert again == cupy.asnumpy(base).tobytes()
    assert cupy_gpu.staging_bytes(0) == before


@pytest.mark.gpu
@pytest.mark.parametrize("status,error", [(2, gv.ResourceExhaustedError), (1, gv.BackendError)])
def test_cupy_pinned_allocation_failure_is_mapped(
    cupy_gpu: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int, error: type[Exception]
) -> None:
    """cudaHostAlloc failing (2: cudaErrorMemoryAllocation; 1: another CUDA error) is a
    gpuvars error naming the key, on save and on restore (with the file)."""
    import cupy

    v = gv.Variable(np.arange(3000, dtype=np.float32), name="w", device="/gpu:0")
    saver = gv.Saver({"key_w": v})
    prefix = saver.save(str(tmp_path / "ok"))
    cupy_gpu.release_staging()

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise cupy.cuda.runtime.CUDARuntimeError(status)

    with monkeypatch.context() as patch:
        patch.setattr(cupy.cuda, "PinnedMemory", refuse)
        with pytest.raises(error, match="key_w"):
            saver.save(str(tmp_path / "bad"))
        with pytest.raises(error, match=r"key_w.*safetensors"):
            saver.restore(prefix)
    saver.restore(prefix)  # the pool recovers once allocation works again
    assert same_bytes(cupy.asnumpy(v.value()), np.arange(3000, dtype=np.float32))
