"""The batched paths of checkpoints: runs of small host tensors written by one pwritev and
read by one preadv (``_write._write_run``, ``_transfer.restore_run``), on the edge cases the
per-tensor path handles one by one: 0-d, empty, bfloat16, non-contiguous sources, a
mutation while its run is written, runs crossing the chunk size, short I/O, damage."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import gpuvars as gv
from gpuvars._snapshot import Snapshot
from gpuvars.checkpoint import _restore, _write
from gpuvars.checkpoint import _stformat as st

RUN = 2 * max(_write.RUN_MIN, _restore.RUN_MIN)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """How many runs the writer and the readers made."""
    seen = {"write_run": 0, "read_run": 0}
    real_write, real_read = st.SafetensorsWriter.write_run, st.SafetensorsReader.read_run

    def write_run(self: Any, *args: Any) -> None:
        seen["write_run"] += 1
        real_write(self, *args)

    def read_run(self: Any, *args: Any) -> None:
        seen["read_run"] += 1
        real_read(self, *args)

    monkeypatch.setattr(st.SafetensorsWriter, "write_run", write_run)
    monkeypatch.setattr(st.SafetensorsReader, "read_run", read_run)
    yield seen


def _values(n: int, seed: int = 0) -> list[np.ndarray]:
    """Small tensors of every awkward kind: 0-d, empty, bfloat16, bool, int8, float32."""
    rng = np.random.default_rng(seed)
    kinds: list[Any] = [
        lambda: np.array(rng.random(), np.float32),  # 0-d
        lambda: np.zeros((0,), np.float32),  # empty
        lambda: np.zeros((3, 0), np.float32),  # empty, 2-d
        lambda: rng.random(5).astype(ml_dtypes.bfloat16),
        lambda: rng.random((2, 3)) > 0.5,
        lambda: rng.integers(-100, 100, 7).astype(np.int8),
        lambda: rng.random((4, 4), dtype=np.float32),
    ]
    return [kinds[i % len(kinds)]() for i in range(n)]


def test_runs_round_trip_0d_empty_bfloat16_bool_and_match_safetensors(tmp_path: Path, calls: dict[str, int]) -> None:
    values = _values(7 * RUN)
    vs = [gv.Variable(v, name=f"v{i:03d}") for i, v in enumerate(values)]
    saver = gv.Saver(vs)
    prefix = saver.save(tmp_path / "m")
    assert calls["write_run"] > 0
    with gv.CheckpointReader(prefix) as reader:
        reader.verify()  # every per-tensor checksum in the index holds
    theirs = safetensors.numpy.load_file(prefix + ".safetensors")
    for i, v in enumerate(values):
        assert theirs[f"v{i:03d}"].tobytes() == v.tobytes() and theirs[f"v{i:03d}"].shape == v.shape
    for var in vs:
        var.assign(np.zeros(var.shape, var.dtype))
    saver.restore(prefix)
    assert calls["read_run"] > 0
    for var, v in zip(vs, values):
        got = var.numpy()
        assert got.dtype == v.dtype and got.shape == v.shape and got.tobytes() == v.tobytes()
    with gv.Registry():
        loaded = gv.load_checkpoint(prefix)
        for i, v in enumerate(values):
            assert loaded[f"v{i:03d}"].numpy().tobytes() == v.tobytes()


def test_runs_take_variables_made_from_non_contiguous_arrays(tmp_path: Path, calls: dict[str, int]) -> None:
    base = np.arange(RUN * 16, dtype=np.float32).reshape(RUN, 16)
    sources = [base[i, ::2] for i in range(RUN)] + [base[:, i] for i in range(RUN)]
    assert not any(s.flags.c_contiguous for s in sources[RUN:])
    vs = [gv.Variable(s, name=f"nc{i:03d}") for i, s in enumerate(sources)]
    prefix = gv.Saver(vs).save(tmp_path / "m")
    assert calls["write_run"] > 0
    with gv.CheckpointReader(prefix) as reader:
        for i, s in enumerate(sources):
            assert reader.get_tensor(f"nc{i:03d}").tolist() == s.tolist()


def test_write_run_and_read_run_refuse_what_write_and_read_into_refuse(tmp_path: Path) -> None:
    path = str(tmp_path / "x.safetensors")
    f32 = np.dtype(np.float32)
    with st.SafetensorsWriter(path, [("a", f32, (2, 2)), ("b", f32, (2,)), ("c", f32, (2,))]) as w:
        strided = np.zeros((2, 4), np.float32)[:, ::2]
        with pytest.raises(gv.InvalidArgumentError, match="C-contiguous"):
            w.write_run(["a", "b"], [strided, np.zeros(2, np.float32)])
        with pytest.raises(gv.InvalidArgumentError, match="expected float32 with 8 bytes"):
            w.write_run(["a", "b"], [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)])
        with pytest.raises(gv.InvalidArgumentError, match="does not follow"):
            w.write_run(["a", "c"], [np.zeros((2, 2), np.float32), np.zeros(2, np.float32)])
        with pytest.raises(gv.InvalidArgumentError, match="was not declared"):
            w.write_run(["a", "zz"], [np.zeros((2, 2), np.float32), np.zeros(2, np.float32)])
        w.write_run(["a", "b", "c"], [np.ones((2, 2), np.float32), np.full(2, 2, np.float32), np.full(2, 3, np.float32)])
        with pytest.raises(gv.InvalidArgumentError, match="already written"):
            w.write_run(["c"], [np.zeros(2, np.float32)])
        w.commit()
    with st.SafetensorsReader(path) as r:
        with pytest.raises(gv.InvalidArgumentError, match="C-contiguous"):
            r.read_run(["a", "b"], [np.zeros((2, 4), np.float32)[:, ::2], np.zeros(2, np.float32)])
        with pytest.raises(gv.InvalidArgumentError, match="writable numpy array of 8 bytes"):
            r.read_run(["a", "b"], [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)])
        with pytest.raises(gv.CheckpointMismatchError, match="no tensor 'zz'"):
            r.read_run(["a", "zz"], [np.zeros((2, 2), np.float32), np.zeros(2, np.float32)])
        outs = [np.zeros((2, 2), np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32)]
        r.read_run(["a", "b", "c"], outs)
        assert [o.tolist() for o in outs] == [[[1, 1], [1, 1]], [2, 2], [3, 3]]


def test_a_mutation_while_its_run_is_written_waits_and_the_checkpoint_keeps_the_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vs = [gv.Variable(np.full(8, 1.0, np.float32), name=f"w{i:03d}") for i in range(RUN)]
    entered, release = threading.Event(), threading.Event()
    real = st.SafetensorsWriter.write_run

    def gated(self: Any, names: Any, arrays: Any) -> None:
        entered.set()
        assert release.wait(30)
        real(self, names, arrays)

    monkeypatch.setattr(st.SafetensorsWriter, "write_run", gated)
    fut = gv.Saver(vs).save(tmp_path / "m", blocking=False)
    assert entered.wait(30)  # the run's reads have begun: its live buffers are being read
    done = threading.Event()
    t = threading.Thread(target=lambda: (vs[3].assign(np.full(8, 2.0, np.float32)), done.set()))
    t.start()
    assert not done.wait(0.3)  # the mutation waits for the end of the run's reads
    release.set()
    t.join(30)
    assert done.is_set()
    prefix = fut.result()
    with gv.CheckpointReader(prefix) as reader:
        reader.verify()
        assert all(reader.get_tensor(f"w{i:03d}").tolist() == [1.0] * 8 for i in range(RUN))
    assert vs[3].numpy().tolist() == [2.0] * 8


def test_mutations_before_the_run_starts_copy_and_the_checkpoint_keeps_the_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vs = [gv.Variable(np.full(8, 1.0, np.float32), name=f"w{i:03d}") for i in range(RUN)]
    release = threading.Event()
    real = Snapshot.begin_reads

    def gated(self: Snapshot, pins: Any) -> Any:
        assert release.wait(30)
        return real(self, pins)

    monkeypatch.setattr(Snapshot, "begin_reads", gated)
    fut = gv.Saver(vs).save(tmp_path / "m", blocking=False)
    for v in vs:  # unlimited copy-on-write budget: each mutation copies its pin and goes on
        v.assign(np.full(8, 5.0, np.float32))
    release.set()
    prefix = fut.result()
    assert fut._plan.snapshot.copies == RUN
    with gv.CheckpointReader(prefix) as reader:
        reader.verify()
        assert all(reader.get_tensor(f"w{i:03d}").tolist() == [1.0] * 8 for i in range(RUN))


@pytest.mark.parametrize("iov_max", [3, 1024])
def test_runs_crossing_the_chunk_size_and_iov_max_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: dict[str, int], iov_max: int
) -> None:
    monkeypatch.setattr(st, "_IOV_MAX", iov_max)
    n = (3 * st.CHUNK_BYTES) // (64 << 10) + 5  # 64 KiB tensors: several runs, edges across chunk boundaries
    rng = np.random.default_rng(1)
    values = [rng.random(16 << 10, dtype=np.float32) for _ in range(n)]
    vs = [gv.Variable(v, name=f"c{i:03d}") for i, v in enumerate(values)]
    saver = gv.Saver(vs)
    prefix = saver.save(tmp_path / "m")
    assert calls["write_run"] >= 3
    for v in vs:
        v.assign(np.zeros(16 << 10, np.float32))
    saver.restore(prefix)
    assert calls["read_run"] >= 3
    assert all(np.array_equal(v.numpy(), x) for v, x in zip(vs, values))
    with gv.CheckpointReader(prefix) as reader:
        reader.verify()


def test_short_pwritev_and_preadv_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_w, real_r = os.pwritev, os.preadv

    def first_bytes(buffers: Any) -> np.ndarray:
        return np.asarray(buffers[0]).reshape(-1).view(np.uint8)

    def short_write(fd: int, buffers: Any, offset: int) -> int:  # at most 100 bytes of one buffer a call
        first = first_bytes(buffers)
        return real_w(fd, [first[:100]], offset) if first.nbytes else real_w(fd, buffers, offset)

    def short_read(fd: int, buffers: Any, offset: int) -> int:
        first = first_bytes(buffers)
        return real_r(fd, [first[:100]], offset) if first.nbytes else real_r(fd, buffers, offset)

    values = _values(3 * RUN, seed=2)
    vs = [gv.Variable(v, name=f"s{i:03d}") for i, v in enumerate(values)]
    saver = gv.Saver(vs)
    monkeypatch.setattr(os, "pwritev", short_write)
    prefix = saver.save(tmp_path / "m")
    monkeypatch.setattr(os, "pwritev", real_w)
    with gv.CheckpointReader(prefix) as reader:
        reader.verify()
    for v in vs:
        v.assign(np.zeros(v.shape, v.dtype))
    monkeypatch.setattr(os, "preadv", short_read)
    saver.restore(prefix)
    assert all(v.numpy().tobytes() == x.tobytes() for v, x in zip(vs, values))


def test_damage_inside_a_run_names_file_and_key_and_invalidates_the_run(tmp_path: Path, calls: dict[str, int]) -> None:
    vs = [gv.Variable(np.full(16, float(i), np.float32), name=f"d{i:03d}") for i in range(RUN)]
    saver = gv.Saver(vs)
    prefix = saver.save(tmp_path / "m")
    with st.SafetensorsReader(prefix + ".safetensors") as r:
        offset = r.tensors["d005"].begin + 3
    with open(prefix + ".safetensors", "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))
    with pytest.raises(gv.CheckpointCorruptError, match=r"m\.safetensors: tensor 'd005': xxh3_64 checksum mismatch") as info:
        saver.restore(prefix)
    assert calls["read_run"] > 0
    assert "now marked uninitialized" in str(info.value)
    assert not any(v.initialized for v in vs)  # never a silent mix of old and new
    with pytest.raises(gv.CheckpointCorruptError, match="checksum failed for 'd005'; nothing was restored"):
        saver.restore(prefix, verify_first=True)


def test_a_busy_variable_lock_makes_the_run_go_key_by_key(tmp_path: Path, calls: dict[str, int]) -> None:
    vs = [gv.Variable(np.full(4, float(i), np.float32), name=f"b{i:03d}") for i in range(RUN)]
    saver = gv.Saver(vs)
    prefix = saver.save(tmp_path / "m")
    for v in vs:
        v.assign(np.zeros(4, np.float32))
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with vs[4]._lock:  # another thread holds one variable of the run
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(10)
    timer = threading.Timer(0.2, release.set)
    timer.start()
    saver.restore(prefix)  # no deadlock: the run lets go and waits key by key
    t.join(10)
    assert [v.numpy().tolist() for v in vs] == [[float(i)] * 4 for i in range(RUN)]


def test_runs_on_every_cpu_backend(cpu_backend: str, tmp_path: Path, calls: dict[str, int]) -> None:
    """numpy storage is read in place; JAX CPU arrays are saved from host views."""
    values = _values(3 * RUN, seed=3)
    vs = [gv.Variable(v, name=f"j{i:03d}") for i, v in enumerate(values)]
    saver = gv.Saver(vs)
    prefix = saver.save(tmp_path / "m")
    assert calls["write_run"] > 0
    for v in vs:
        v.assign(np.zeros(v.shape, v.dtype))
    saver.restore(prefix)
    assert all(v.numpy().tobytes() == x.tobytes() for v, x in zip(vs, values))
    with gv.CheckpointReader(prefix) as reader:
        reader.verify()
