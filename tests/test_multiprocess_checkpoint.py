"""Checkpoints saved by several processes and committed once (DESIGN "Beyond one machine").

Each test runs a worker script in 2 or 4 local processes under ``python -m gpuvars launch``
(JAX's distributed runtime on CPU), in a subprocess with a hard timeout; every process
writes what it saw to a JSON file. Faults are real: a file-size limit on one process makes
its writes fail, a sleep makes it late, SIGKILL ends process 0 in the middle of a save.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time
from typing import Any

import numpy as np
import pytest

import gpuvars as gv
import gpuvars_backends as backends

pytestmark = pytest.mark.skipif(not backends.installed("jax"), reason="multi-process runs need jax")

WORKER = textwrap.dedent(
    '''
    import json, os, resource, signal, sys, time
    import numpy as np
    import gpuvars as gv

    scenario, folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
    local = int(os.environ.get("LOCAL_REPLICAS", "1"))
    if local > 1:
        gv.config.set_logical_devices("cpu", local)
    gv.distributed.initialize(timeout=30)
    me, n = gv.distributed.process_id(), gv.distributed.num_processes()
    result = {"me": me, "n": n}
    agg, sync = gv.VariableAggregation, gv.VariableSynchronization
    expand = gv.SaveOptions(experimental_variable_policy="expand_distributed_variables", commit_timeout=20)

    def model(strategy):
        with strategy.scope():
            w = gv.Variable(np.zeros((3, 4), np.float32), name="w", aggregation=agg.MEAN)
            b = gv.Variable(np.zeros(4, np.float32), name="b", aggregation=agg.MEAN)
            seen = gv.Variable(0.0, name="seen", synchronization=sync.ON_READ, aggregation=agg.SUM)
        step = gv.Variable(0, name="step", dtype=np.int64)
        return w, b, seen, step

    def train(strategy, w, b, seen, step, steps):
        def replica_step(x):
            w.assign_add(x[:, None] * np.ones((3, 4), np.float32))
            b.assign_sub(x.sum() * np.ones(4, np.float32))
            seen.assign_add(1.0)
        for _ in range(steps):
            strategy.run(replica_step, (strategy.experimental_distribute_values_from_function(
                lambda ctx: np.arange(3, dtype=np.float32) * (ctx.replica_id_in_sync_group + 1 + int(step.numpy()))),))
            step.assign_add(1)

    def values(w, b, seen, step):
        return {"w": w.numpy().tolist(), "b": b.numpy().tolist(), "seen": float(seen.numpy()),
                "step": int(step.numpy()), "w_components": [c.numpy().tolist() for c in w.values],
                "seen_components": [float(c.numpy()) for c in seen.values]}

    def outcome(fn):
        try:
            return {"ok": fn()}
        except gv.GpuvarsError as exc:
            return {"type": type(exc).__name__, "error": str(exc), "processes": list(getattr(exc, "processes", ()))}

    strategy = gv.MultiWorkerMirroredStrategy([f"/cpu:{i}" for i in range(local)])
    result["replicas"] = strategy.num_replicas_in_sync
    w, b, seen, step = model(strategy)
    saver = gv.Saver(max_to_keep=3)
    prefix = os.path.join(folder, "model")

    if scenario == "train":  # train, save at 2 and 4 (the second asynchronous), check a restore
        train(strategy, w, b, seen, step, 2)
        result["first"] = saver.save(prefix, global_step=2, options=expand)
        train(strategy, w, b, seen, step, 2)
        result["saved"] = values(w, b, seen, step)
        result["second"] = saver.save(prefix, global_step=4, options=expand, blocking=False).result(60)
        train(strategy, w, b, seen, step, 1)
        saver.restore(result["second"])
        result["restored"] = values(w, b, seen, step)
        result["latest"] = gv.latest_checkpoint(folder)
        result["first_save_keys"] = outcome(lambda: gv.distributed.kv_get("checkpoint/0/start/decision", 0.5))
    elif scenario == "resume":  # restore what other processes saved, train, save again
        latest = gv.latest_checkpoint(folder)
        saver.restore(latest)
        result["restored"] = values(w, b, seen, step)
        train(strategy, w, b, seen, step, 1)
        result["saved"] = values(w, b, seen, step)
        result["prefix"] = saver.save(prefix, global_step=int(step.numpy()), options=expand)
    elif scenario == "fail":  # process 1 cannot write its replica file
        result["first"] = saver.save(prefix, global_step=1, options=expand)
        if me == 1:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.RLIM_INFINITY))
        result["second"] = outcome(lambda: saver.save(prefix, global_step=2, options=expand))
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        result["latest"] = gv.latest_checkpoint(folder)
    elif scenario == "late":  # process 1 comes to the save after the others gave up
        quick = gv.SaveOptions(commit_timeout=1.5)
        if me == 1:
            time.sleep(4)
        result["second"] = outcome(lambda: saver.save(prefix, global_step=2, options=quick))
    elif scenario == "differ":  # process 1 has a variable more
        if me == 1:
            extra = gv.Variable(1.0, name="extra")
            saver = gv.Saver(max_to_keep=3)
        result["second"] = outcome(lambda: saver.save(prefix, global_step=2))
    elif scenario == "uninitialized":  # process 1's variable has no value
        lazy = gv.Variable(gv.zeros([2]), name="lazy")  # deferred: runs in an init op
        if me == 0:
            gv.global_variables_initializer().run()
        result["second"] = outcome(lambda: gv.Saver([w, lazy]).save(prefix, global_step=2))
    elif scenario == "kill0":  # process 0 dies in the middle of the second save
        result["first"] = saver.save(prefix, global_step=1, options=expand)
        with open(os.path.join(out, f"result_{me}.json"), "w") as fh:
            json.dump(result, fh)
        if me == 0:
            from gpuvars.checkpoint import _write
            write_local = _write.write_local
            def dying(plan, *args, **kwargs):
                os.kill(os.getpid(), signal.SIGKILL)
            _write.write_local = dying
        saver.save(prefix, global_step=2, options=expand)
        result["unreachable"] = True
    with open(os.path.join(out, f"result_{me}.json"), "w") as fh:
        json.dump(result, fh)
    '''
)


def _launch(tmp_path: pathlib.Path, scenario: str, n: int, local: int = 1, timeout: float = 60
            ) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]], float]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"out-{scenario}-{n}"
    out.mkdir()
    folder = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "gpuvars", "launch", "-n", str(n), "--timeout", str(timeout),
           str(script), scenario, str(folder), str(out)]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30, check=False,
                          env={**os.environ, "LOCAL_REPLICAS": str(local)})
    elapsed = time.monotonic() - started
    results = []
    for k in range(n):
        path = out / f"result_{k}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {})
    return done, results, elapsed


def _index(prefix: str) -> dict[str, Any]:
    return json.loads(pathlib.Path(prefix + ".index.json").read_text())


def _expected_step_values(replicas: int, start_step: int, steps: int, w0: Any = None, b0: Any = None,
                          seen0: float = 0.0) -> dict[str, Any]:
    """What the worker's training computes, on one host: MEAN of the replicas' updates."""
    w = np.zeros((3, 4), np.float32) if w0 is None else np.asarray(w0, np.float32)
    b = np.zeros(4, np.float32) if b0 is None else np.asarray(b0, np.float32)
    seen = seen0
    for s in range(start_step, start_step + steps):
        xs = [np.arange(3, dtype=np.float32) * (r + 1 + s) for r in range(replicas)]
        w = w + sum(x[:, None] * np.ones((3, 4), np.float32) for x in xs) / np.float32(replicas)
        b = b - sum(x.sum() * np.ones(4, np.float32) for x in xs) / np.float32(replicas)
        seen += replicas
    return {"w": w.tolist(), "b": b.tolist(), "seen": seen, "step": start_step + steps}


@pytest.mark.slow
def test_two_processes_save_once_and_the_checkpoint_restores_into_four_processes_then_one(
    tmp_path: pathlib.Path,
) -> None:
    # 2 processes x 2 replicas: 4 replica files, one index
    done, results, _ = _launch(tmp_path, "train", 2, local=2)
    assert done.returncode == 0, done.stdout + done.stderr
    p4, p2 = results[0]["second"], results[0]["first"]
    for r in results:
        assert r["replicas"] == 4
        assert r["restored"] == r["saved"] == results[0]["saved"]
        assert r["latest"] == results[0]["second"]
        assert r["first_save_keys"]["type"] == "DistributedError"  # the second save removed the first one's keys
    saved = results[0]["saved"]
    assert {k: saved[k] for k in ("w", "b", "step")} == {
        k: v for k, v in _expected_step_values(4, 0, 4).items() if k != "seen"}
    assert saved["seen"] == 16.0  # a SUM sync-on-read variable reads every process's replicas
    index = _index(p4)
    assert sorted(index["files"]) == sorted(
        ["model-4.safetensors", "model-4.devices.json"] + [f"model-4.replica-{k}-of-4.safetensors" for k in range(4)])
    comps = index["variables"]["seen"]["components"]
    assert [c["file"] for c in comps] == [f"model-4.replica-{k}-of-4.safetensors" for k in range(4)]
    devices = json.loads(pathlib.Path(p4 + ".devices.json").read_text())["devices"]
    assert [c["device"] for c in devices["w"]["components"]] == [
        "/job:worker/task:0/cpu:0", "/job:worker/task:0/cpu:1", "/job:worker/task:1/cpu:0", "/job:worker/task:1/cpu:1"]
    assert os.path.exists(p2 + ".index.json")  # max_to_keep=3 keeps both

    # 4 processes x 1 replica: same 4 replicas, process k reads replica file k's components
    done, results4, _ = _launch(tmp_path, "resume", 4, local=1)
    assert done.returncode == 0, done.stdout + done.stderr
    for k, r in enumerate(results4):
        assert r["restored"]["w"] == saved["w"] and r["restored"]["step"] == 4
        assert r["restored"]["seen"] == 16.0
        assert r["restored"]["seen_components"] == [saved["seen_components"][0]]  # each replica's own count
        assert r["saved"] == results4[0]["saved"]
    resumed = results4[0]["saved"]
    expected = _expected_step_values(4, 4, 1, saved["w"], saved["b"], 16.0)
    assert {k: resumed[k] for k in ("w", "b", "step", "seen")} == expected

    # one process, no strategy: the logical values
    with gv.Registry():
        loaded = gv.load_checkpoint(results4[0]["prefix"], device="/cpu:0")
        assert loaded["w"].numpy().tolist() == resumed["w"]
        assert loaded["b"].numpy().tolist() == resumed["b"]
        assert float(loaded["seen"].numpy()) == resumed["seen"] == 20.0
        assert int(loaded["step"].numpy()) == 5
        w = gv.Variable(np.zeros((3, 4), np.float32), name="w")
        gv.Saver({"w": w}).restore(results4[0]["prefix"])
        assert w.numpy().tolist() == resumed["w"]


def test_one_process_failing_to_write_commits_nothing_and_every_process_raises_the_same_error(
    tmp_path: pathlib.Path,
) -> None:
    done, results, _ = _launch(tmp_path, "fail", 2)
    assert done.returncode == 0, done.stdout + done.stderr
    errors = [r["second"] for r in results]
    assert errors[0] == errors[1], errors
    assert errors[0]["type"] == "CheckpointCommitError" and errors[0]["processes"] == [1]
    assert ("(writing across 2 processes): process 1 failed: writing model-2.replica-1-of-2.safetensors failed: "
            "File too large; checkpoints at other prefixes are untouched") in errors[0]["error"]
    folder = tmp_path / "ckpt"
    assert not (folder / "model-2.index.json").exists()
    assert not [p.name for p in folder.iterdir() if p.name.startswith("model-2")]  # tidied everywhere
    assert all(r["latest"] == results[0]["first"] for r in results)
    with gv.Registry():
        assert sorted(gv.load_checkpoint(results[0]["first"], device="/cpu:0")) == ["b", "seen", "step", "w"]


def test_a_late_process_is_named_and_nothing_is_committed(tmp_path: pathlib.Path) -> None:
    done, results, _ = _launch(tmp_path, "late", 2)
    assert done.returncode == 0, done.stdout + done.stderr
    errors = [r["second"] for r in results]
    assert errors[0] == errors[1], errors  # the late one reads process 0's decision when it comes
    assert errors[0]["processes"] == [1]
    assert "process(es) 1 did not report within 1.5s" in errors[0]["error"]
    assert not (tmp_path / "ckpt" / "model-2.index.json").exists()


@pytest.mark.parametrize(
    "scenario, says",
    [("differ", "(start across 2 processes): process 1 saved other variables than process 0"),
     ("uninitialized", "(start across 2 processes): process 1 failed: cannot save variable 'lazy'")],
)
def test_processes_that_cannot_save_the_same_variables_stop_before_writing(
    tmp_path: pathlib.Path, scenario: str, says: str,
) -> None:
    done, results, _ = _launch(tmp_path, scenario, 2)
    assert done.returncode == 0, done.stdout + done.stderr
    errors = [r["second"] for r in results]
    assert errors[0] == errors[1], errors
    assert errors[0]["type"] == "CheckpointCommitError" and says in errors[0]["error"], errors[0]
    assert errors[0]["processes"] == [1]
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").iterdir())


def test_process_0_killed_mid_save_ends_the_others_and_the_previous_checkpoint_loads(tmp_path: pathlib.Path) -> None:
    done, results, elapsed = _launch(tmp_path, "kill0", 2, timeout=60)
    assert done.returncode != 0
    assert elapsed < 45, done.stdout  # nobody waits out the 20 s commit timeout twice, nor the launcher's
    assert all("unreachable" not in r for r in results)
    first = results[0]["first"]
    folder = tmp_path / "ckpt"
    assert not (folder / "model-2.index.json").exists()
    assert gv.latest_checkpoint(folder) == first
    with gv.Registry():
        loaded = gv.load_checkpoint(first, device="/cpu:0")
        assert int(loaded["step"].numpy()) == 0


def test_the_demo_trains_in_two_processes_and_one_process_continues_from_their_checkpoint() -> None:
    # Adam in replica context sums every process's gradients; saves go across processes
    done = subprocess.run([sys.executable, "-m", "gpuvars", "demo", "--processes", "2", "--steps", "30", "--every", "10"],
                          capture_output=True, text=True, timeout=150, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[0]   step    30" in done.stdout and "model.ckpt-30.replica-1-of-2.safetensors" in done.stdout
    assert "ok: training continued from the checkpoint the processes saved" in done.stdout
