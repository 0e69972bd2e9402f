"""Saves of GPU variables hold the values of the call (G1): a CuPy variable mutated before
the writer reached it is cloned on its device first; a JAX array is kept as it was. Run on a
GPU machine by ``bash bench/gpu.sh``; skipped elsewhere."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import gpuvars as gv
import gpuvars_backends as backends
from gpuvars import config

pytestmark = pytest.mark.gpu

N = 1 << 22  # 16 MiB of float32: several 64 MiB-chunk-free tensors, quick on any GPU


def test_a_gpu_variable_mutated_right_after_an_async_save_is_saved_as_it_was(
    gpu_lib: str, tmp_path: Path, gate: threading.Event
) -> None:
    v = gv.Variable(np.arange(N, dtype=np.float32), name="v", device="/gpu:0")
    s = gv.Variable(np.arange(8, dtype=np.float32), name="s", device="/gpu:0")
    saver = gv.Saver()
    fut = saver.save(tmp_path / "m", blocking=False)
    v.assign_add(np.ones(N, np.float32))
    s.scatter_update(np.array([0]), np.array([-1.0], np.float32))
    gate.set()
    with gv.CheckpointReader(fut.result()) as reader:
        reader.verify()
        assert np.array_equal(reader.get_tensor("v"), np.arange(N, dtype=np.float32))
        assert reader.get_tensor("s").tolist() == list(range(8))
    assert float(v.numpy()[0]) == 1.0 and float(s.numpy()[0]) == -1.0
    snapshot = fut._plan.snapshot
    assert snapshot.copies == (2 if gpu_lib == "cupy" else 0)  # CuPy: device clones; JAX: none
    assert snapshot.held == 0


def test_gpu_saves_while_another_thread_trains_verify(gpu_lib: str, tmp_path: Path) -> None:
    vs = [gv.Variable(np.zeros(N, np.float32), name=f"v{i}", device="/gpu:0") for i in range(3)]
    saver = gv.Saver(max_to_keep=None)
    stop = threading.Event()

    def train() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            for v in vs:
                v.assign(np.full(N, k, np.float32))

    t = threading.Thread(target=train)
    t.start()
    try:
        results = [saver.save(tmp_path / "m", global_step=i, blocking=bool(i % 2)) for i in range(4)]
        saver.wait_until_finished()
    finally:
        stop.set()
        t.join()
    for got in results:
        prefix = got if isinstance(got, str) else got.result()
        with gv.CheckpointReader(prefix) as reader:
            reader.verify()
            for i in range(3):
                assert len(np.unique(reader.get_tensor(f"v{i}"))) == 1


def test_a_copy_on_write_budget_of_zero_makes_a_cupy_mutation_wait_for_the_writer(tmp_path: Path, gate: threading.Event) -> None:
    probe = backends.probe("cupy", "gpu")
    if not probe.usable:
        pytest.skip(f"cupy cannot use a GPU here: {probe.reason}")
    config.set_gpu_backend("cupy")
    v = gv.Variable(np.ones(N, np.float32), name="v", device="/gpu:0")
    fut = gv.Saver(options=gv.SaveOptions(copy_on_write_bytes=0)).save(tmp_path / "m", blocking=False)
    done = threading.Event()
    t = threading.Thread(target=lambda: (v.assign(np.zeros(N, np.float32)), done.set()))
    t.start()
    assert not done.wait(0.3)
    gate.set()
    t.join(60)
    assert done.is_set()
    with gv.CheckpointReader(fut.result()) as reader:
        assert float(reader.get_tensor("v").min()) == 1.0
