"""Saves that hold the values at the call (G1), asynchronous saves, commit order (G2) and
bounded copy-on-write memory (G3), on numpy and the JAX CPU backend."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpuvars as gv
from gpuvars.checkpoint import _stformat

N = 1 << 20  # elements per variable: big enough that a save takes a while, small enough for CI


def _uniform(reader: gv.CheckpointReader, key: str) -> float:
    """The one value every element of ``key`` holds (a torn tensor holds two)."""
    values = np.unique(reader.get_tensor(key))
    assert len(values) == 1, f"{key} is torn: it holds {values[:5]} ..."
    return float(values[0])


# --- G1: the corruption, reproduced and gone ----------------------------------------------


@pytest.mark.parametrize("blocking", [True, False])
def test_saves_while_another_thread_assigns_commit_checkpoints_that_verify(
    cpu_backend: str, tmp_path: Path, blocking: bool
) -> None:
    """Before the write barrier, 5 of 6 such saves committed a torn tensor that failed its
    own checksum. Each tensor must verify and hold one step's value."""
    vs = [gv.Variable(np.zeros(N, np.float32), name=f"v{i}") for i in range(4)]
    saver = gv.Saver(max_to_keep=None)
    stop = threading.Event()
    steps = [0]

    def train() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            for v in vs:
                v.assign(np.full(N, k, np.float32))
            steps[0] = k

    t = threading.Thread(target=train)
    t.start()
    try:
        results = [saver.save(tmp_path / "m", global_step=s, blocking=blocking) for s in range(6)]
        saver.wait_until_finished()
    finally:
        stop.set()
        t.join()
    assert steps[0] > 0
    for got in results:
        prefix = got if isinstance(got, str) else got.result()
        with gv.CheckpointReader(prefix) as reader:
            reader.verify()
            for i in range(4):
                _uniform(reader, f"v{i}")
        target = [gv.Variable(np.zeros(N, np.float32), name=f"t{i}") for i in range(4)]
        gv.Saver({f"v{i}": t for i, t in enumerate(target)}).restore(prefix)  # restores, checksums pass


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda v: v.assign(np.full(v.shape, -1.0, np.float32)), id="assign"),
        pytest.param(lambda v: v.assign_add(np.ones(v.shape, np.float32)), id="assign_add"),
        pytest.param(lambda v: v.assign_sub(np.ones(v.shape, np.float32)), id="assign_sub"),
        pytest.param(lambda v: v.assign([-1.0] * v.shape[0]), id="assign_list"),
        pytest.param(lambda v: v.scatter_update(np.array([0, 3]), np.array([-1.0, -1.0], np.float32)), id="scatter"),
        pytest.param(lambda v: v.assign(np.zeros(7, np.float32)), id="reshaping_assign"),
        pytest.param(lambda v: v.initializer(), id="initializer"),
    ],
)
def test_a_mutation_right_after_an_async_save_is_not_in_the_file(
    cpu_backend: str, tmp_path: Path, gate: threading.Event, mutate: Any
) -> None:
    v = gv.Variable(np.arange(5, dtype=np.float32) + 10, name="v", shape=[None])
    saver = gv.Saver()
    fut = saver.save(tmp_path / "m", blocking=False)
    assert not fut.done()
    mutate(v)  # the writer is held at the gate: nothing of v is written yet
    gate.set()
    with gv.CheckpointReader(fut.result()) as reader:
        assert reader.get_tensor("v").tolist() == [10.0, 11.0, 12.0, 13.0, 14.0]


def test_a_restore_right_after_an_async_save_is_not_in_the_file(
    cpu_backend: str, tmp_path: Path, gate: threading.Event
) -> None:
    v = gv.Variable(np.full(8, 1.0, np.float32), name="v")
    saver = gv.Saver(max_to_keep=None)
    gate.set()
    old = saver.save(tmp_path / "old")
    v.assign(np.full(8, 2.0, np.float32))
    gate.clear()
    fut = saver.save(tmp_path / "new", blocking=False)
    restorer = threading.Thread(target=saver.restore, args=(old,))
    restorer.start()
    time.sleep(0.05)
    gate.set()
    restorer.join()
    assert v.numpy().tolist() == [1.0] * 8
    with gv.CheckpointReader(fut.result()) as reader:
        assert reader.get_tensor("v").tolist() == [2.0] * 8


def test_distributed_and_sharded_variables_hold_the_values_of_the_call(
    four_cpus: str, tmp_path: Path, gate: threading.Event
) -> None:
    strategy = gv.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        m = gv.Variable(np.full(4, 1.0, np.float32), name="m")
        s = gv.Variable(np.full(4, 1.0, np.float32), name="s", synchronization=gv.VariableSynchronization.ON_READ,
                        aggregation=gv.VariableAggregation.SUM)
    sh = gv.ShardedVariable(np.arange(6, dtype=np.float32), 2, name="sh", devices=["/cpu:0", "/cpu:1"])
    saveables: dict[str, Any] = {"m": m, "s": s, "sh": sh}
    opts = gv.SaveOptions(experimental_variable_policy="expand_distributed_variables")
    fut = gv.Saver(saveables).save(tmp_path / "d", options=opts, blocking=False)
    m.assign(np.full(4, 5.0, np.float32))
    for c in s.values:
        c.assign(np.full(4, 7.0, np.float32))
    sh.assign(np.zeros(6, np.float32))
    gate.set()
    prefix = fut.result()
    with gv.CheckpointReader(prefix) as reader:
        reader.verify()
        assert reader.get_tensor("m").tolist() == [1.0] * 4
        assert reader.get_tensor("s").tolist() == [2.0] * 4  # the sum over replicas at the call
        assert reader.get_tensor("sh").tolist() == list(range(6))
    files = sorted(os.listdir(tmp_path))
    assert [f for f in files if "replica" in f] == ["d.replica-0-of-2.safetensors", "d.replica-1-of-2.safetensors"]
    replica = _stformat.SafetensorsReader(str(tmp_path / "d.replica-1-of-2.safetensors"))
    try:
        out = np.empty(4, np.float32)
        replica.read_into("m", out)
        assert out.tolist() == [1.0] * 4
    finally:
        replica.close()


# --- G3: copy-on-write memory is budgeted; a spent budget makes the mutation wait ------------------


@pytest.mark.parametrize("budget", [0, 4 * N, None])
def test_the_copy_on_write_budget_bounds_copies_and_mutations_wait_when_it_is_spent(
    tmp_path: Path, gate: threading.Event, budget: int | None
) -> None:
    vs = [gv.Variable(np.full(N, 1.0, np.float32), name=f"v{i}") for i in range(3)]  # 4 MiB each
    saver = gv.Saver(options=gv.SaveOptions(copy_on_write_bytes=budget))
    fut = saver.save(tmp_path / "m", blocking=False)
    snapshot = fut._plan.snapshot
    done = threading.Event()

    def mutate_all() -> None:
        for v in vs:
            v.assign(np.full(N, 2.0, np.float32))
        done.set()

    t = threading.Thread(target=mutate_all)
    t.start()
    if budget is None:  # no limit: every variable is copied, no mutation waits
        assert done.wait(10)
    else:  # room for no copy, or for one: the next mutation waits for the writer
        assert not done.wait(0.3)
        assert snapshot.copies == budget // (4 * N)
        assert snapshot.waits > 0
    gate.set()
    t.join(30)
    assert done.is_set()
    assert fut.wait_snapshot(10)
    with gv.CheckpointReader(fut.result()) as reader:
        for i in range(3):
            assert _uniform(reader, f"v{i}") == 1.0
    assert [float(v.numpy()[0]) for v in vs] == [2.0] * 3
    expected_copies = {0: 0, 4 * N: 1, None: 3}[budget]
    assert snapshot.copies == expected_copies
    assert snapshot.peak <= (budget if budget is not None else 3 * 4 * N)
    assert snapshot.held == 0  # every copy freed


def test_jax_saves_copy_nothing(tmp_path: Path, gate: threading.Event) -> None:
    pytest.importorskip("jax")
    gv.config.set_cpu_backend("jax")
    v = gv.Variable(np.full(N, 1.0, np.float32), name="v")
    fut = gv.Saver(options=gv.SaveOptions(copy_on_write_bytes=0)).save(tmp_path / "m", blocking=False)
    assert fut.wait_snapshot(0)  # the immutable array is the snapshot
    v.assign_add(np.ones(N, np.float32))  # never waits, even with no budget
    gate.set()
    with gv.CheckpointReader(fut.result()) as reader:
        assert _uniform(reader, "v") == 1.0
    assert fut._plan.snapshot.copies == 0


# --- the future and the saver's channels for background errors --------------------------------


def test_the_future_reports_progress_done_and_callbacks(tmp_path: Path, gate: threading.Event) -> None:
    _keep = gv.Variable(np.zeros(N, np.float32), name="v")
    seen: list[str] = []
    saver = gv.Saver()
    fut = saver.save(tmp_path / "m", global_step=3, blocking=False)
    fut.add_done_callback(lambda f: seen.append(f.result()))
    assert not fut.done() and fut.progress == 0 and fut.total_bytes == 4 * N
    with pytest.raises(TimeoutError, match="still being written"):
        fut.result(timeout=0.01)
    assert not fut.wait_snapshot(0.01)
    gate.set()
    assert fut.result(timeout=30) == str(tmp_path / "m-3")
    assert fut.done() and fut.progress == fut.total_bytes and fut.exception() is None
    assert seen == [str(tmp_path / "m-3")]
    late: list[bool] = []
    fut.add_done_callback(lambda f: late.append(f.done()))  # already done: called at once
    assert late == [True]
    assert "done" in repr(fut)
    with pytest.raises(gv.errors.InvalidArgumentError):
        fut.result(timeout=-1)
    with pytest.raises(gv.errors.InvalidArgumentError):
        fut.add_done_callback("not callable")  # type: ignore[arg-type]


def _failing_save(tmp_path: Path) -> tuple[gv.Saver, gv.SaveFuture, Path]:
    _keep = gv.Variable(np.zeros(16, np.float32), name="v")
    blocker = tmp_path / "folder"
    blocker.write_text("a file where the checkpoint folder should be")
    saver = gv.Saver()
    return saver, saver.save(blocker / "m", blocking=False), blocker


def test_a_background_failure_is_raised_by_result_and_not_again(tmp_path: Path) -> None:
    saver, fut, _ = _failing_save(tmp_path)
    with pytest.raises(gv.errors.CheckpointWriteError, match="m"):
        fut.result()
    assert isinstance(fut.exception(), gv.errors.CheckpointWriteError)
    saver.wait_until_finished()  # already reported through result()
    assert saver.save(tmp_path / "ok").endswith("ok")


@pytest.mark.parametrize("channel", ["save", "wait_until_finished", "close"])
def test_an_unretrieved_background_failure_is_raised_by_the_next_saver_call(tmp_path: Path, channel: str) -> None:
    saver, fut, blocker = _failing_save(tmp_path)
    fut.exception()  # wait for it to fail, without retrieving it
    with pytest.raises(gv.errors.CheckpointWriteError, match=str(blocker)):
        if channel == "save":
            saver.save(tmp_path / "next")
        else:
            getattr(saver, channel)()
    assert not (tmp_path / "next.index.json").exists()  # the failed save's successor did not start
    getattr(saver, channel)() if channel != "save" else saver.wait_until_finished()  # raised once only


def test_a_closed_saver_refuses_saves_and_a_with_block_waits(tmp_path: Path) -> None:
    _keep = gv.Variable(np.zeros(N, np.float32), name="v")
    with gv.Saver() as saver:
        fut = saver.save(tmp_path / "m", blocking=False)
    assert fut.done() and (tmp_path / "m.index.json").exists()
    with pytest.raises(gv.errors.InvalidArgumentError, match="closed"):
        saver.save(tmp_path / "again")
    saver.close()  # idempotent
    assert saver.restore(str(tmp_path / "m")) is not None


def test_one_save_in_flight_per_saver(tmp_path: Path, gate: threading.Event) -> None:
    _keep = gv.Variable(np.zeros(16, np.float32), name="v")
    saver = gv.Saver(max_to_keep=None)
    first = saver.save(tmp_path / "m", global_step=1, blocking=False)
    second: list[Any] = []
    t = threading.Thread(target=lambda: second.append(saver.save(tmp_path / "m", global_step=2, blocking=False)))
    t.start()
    t.join(0.3)
    assert t.is_alive() and not second  # waits for the first
    gate.set()
    t.join(30)
    assert first.result() and second[0].result().endswith("m-2")


def test_bad_arguments_of_the_async_api(tmp_path: Path) -> None:
    _keep = gv.Variable(np.zeros(2), name="v")
    saver = gv.Saver()
    with pytest.raises(gv.errors.InvalidArgumentError, match="blocking"):
        saver.save(tmp_path / "m", blocking="no")  # type: ignore[call-overload]
    with pytest.raises(gv.errors.InvalidArgumentError, match="timeout"):
        saver.wait_until_finished(timeout="soon")  # type: ignore[arg-type]
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(gv.errors.InvalidArgumentError, match="copy_on_write_bytes"):
            gv.SaveOptions(copy_on_write_bytes=bad)  # type: ignore[arg-type]
    uninit = gv.Variable(gv.zeros([2]), name="u")
    with pytest.raises(gv.errors.UninitializedVariableError, match="'u'"):
        gv.Saver([uninit]).save(tmp_path / "u", blocking=False)  # validated at the call
    assert not list(tmp_path.iterdir())


# --- G2: the state file, latest_checkpoint and retention move only after the commit ------------


def test_state_and_retention_change_only_after_the_commit(tmp_path: Path, gate: threading.Event) -> None:
    _keep = gv.Variable(np.zeros(16, np.float32), name="v")
    saver = gv.Saver(max_to_keep=1)
    gate.set()
    first = saver.save(tmp_path / "m", global_step=1)
    gate.clear()
    fut = saver.save(tmp_path / "m", global_step=2, blocking=False)
    time.sleep(0.05)
    assert gv.latest_checkpoint(tmp_path) == first
    assert (tmp_path / "m-1.index.json").exists()  # the old one is not deleted before the commit
    assert not (tmp_path / "m-2.index.json").exists()
    gate.set()
    assert fut.result() == gv.latest_checkpoint(tmp_path)
    assert not (tmp_path / "m-1.index.json").exists()


# --- the wait at interpreter exit -----------------------------------------------------------------


def test_a_script_that_ends_right_after_an_async_save_still_commits_it(tmp_path: Path) -> None:
    script = (
        "import numpy as np, gpuvars as gv\n"
        "v = gv.Variable(np.arange(1 << 22, dtype=np.float32), name='v')\n"
        f"gv.Saver().save({str(tmp_path / 'm')!r}, blocking=False)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    with gv.CheckpointReader(str(tmp_path / "m")) as reader:
        reader.verify()
        assert float(reader.get_tensor("v")[-1]) == (1 << 22) - 1


def test_the_device_chunk_path_streams_a_jax_array_in_prefetched_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path JAX-on-GPU saves take (device slices whose host copy starts one chunk ahead),
    run here on JAX CPU arrays: the chunks add up to the array, in order, for sizes around
    the chunk size."""
    pytest.importorskip("jax")
    from gpuvars.checkpoint import _transfer

    gv.config.set_cpu_backend("jax")
    device = gv.Variable(np.zeros(1, np.float32), name="probe").physical_device
    monkeypatch.setattr(_transfer, "CHUNK_BYTES", 64)
    for n in (0, 1, 15, 16, 17, 50):
        arr = device.backend.asarray(np.arange(n, dtype=np.float32), np.dtype(np.float32), device.backend_index)
        chunks = list(_transfer._device_chunks(device, arr, "test"))
        assert [len(c) for c in chunks] == [min(16, n - i) for i in range(0, n, 16)]
        joined = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        assert joined.tolist() == list(range(n))
