"""Several processes on this machine's CPU: ``python -m gpuvars launch`` starts 2 or 4 of
them, joined by ``gv.distributed.initialize()`` (JAX's distributed runtime, gloo).

Each test runs one worker script under the launcher in a subprocess with a hard timeout
(the launcher's own ``--timeout`` is shorter), and every process writes what it saw to a
JSON file. The single-process reference is a MirroredStrategy over as many logical CPU
devices, run in this process.
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
from gpuvars import config

pytestmark = pytest.mark.skipif(not backends.installed("jax"), reason="multi-process runs need jax")

WORKER = textwrap.dedent(
    '''
    import json, os, sys, time
    import numpy as np
    import gpuvars as gv

    scenario, out = sys.argv[1], sys.argv[2]
    gv.distributed.initialize(timeout=30)
    me, n = gv.distributed.process_id(), gv.distributed.num_processes()
    result = {"me": me, "n": n}
    print(f"process {me} of {n}", flush=True)

    def steps(strategy, values):
        """The same aggregated updates as the single-process reference (the test's)."""
        out = {}
        with gv.Registry(), strategy.scope():
            agg = gv.VariableAggregation
            w = gv.Variable(np.full(5, float(me), np.float32), name="w", aggregation=agg.SUM)
            m = gv.Variable(np.ones(5, np.float32), name="m", aggregation=agg.MEAN)
            f = gv.Variable(np.zeros(5, np.float32), name="f", aggregation=agg.ONLY_FIRST_REPLICA)
            out["w0"] = w.numpy().tolist()

            def step(x, k):
                ctx = gv.get_replica_context()
                w.assign_add(x * k)
                m.assign_sub(x / k)
                f.assign(x + k)
                return ctx.all_reduce("SUM", x), ctx.all_reduce("MEAN", x)

            for k in (1.0, 2.0, 3.0):
                sums, means = strategy.run(step, (values, np.float32(k)))
            out["w"], out["m"], out["f"] = w.numpy().tolist(), m.numpy().tolist(), f.numpy().tolist()
            out["agree"] = all(v.components_agree() for v in (w, m, f))
            out["all_reduce_sum"], out["all_reduce_mean"] = np.asarray(sums).tolist(), np.asarray(means).tolist()
            out["reduce_sum"] = np.asarray(strategy.reduce("SUM", values)).tolist()
            out["reduce_mean"] = np.asarray(strategy.reduce("MEAN", values)).tolist()
        return out

    if scenario == "basics":
        gv.distributed.barrier("start", 20)
        gv.distributed.kv_put(f"hello/{me}", {"from": me, "list": [me, "x"]})
        result["got"] = [gv.distributed.kv_get(f"hello/{k}", 20) for k in range(n)]
        gv.distributed.barrier("start", 20)  # the same name again: the next barrier of that name
        try:
            gv.distributed.kv_get("nobody/sets/this", 0.5)
        except gv.DistributedError as exc:
            result["kv_timeout"] = str(exc)
        result["initialized"] = gv.distributed.is_initialized()
    elif scenario == "mirrored":
        strategy = gv.MultiWorkerMirroredStrategy()
        result["replicas"] = strategy.num_replicas_in_sync
        x = np.random.default_rng(me).standard_normal(5).astype(np.float32)
        result.update(steps(strategy, x))
    elif scenario == "fail":
        if me == 1:
            raise RuntimeError("process 1 fails on purpose")
        gv.distributed.barrier("never", 120)  # the launcher must end this one
    elif scenario == "late":
        if me == 1:
            time.sleep(4)
        try:
            gv.distributed.barrier("late", 1.5)
        except gv.DistributedError as exc:
            result["error"], result["processes"] = str(exc), list(exc.processes)
    with open(os.path.join(out, f"result_{me}.json"), "w") as fh:
        json.dump(result, fh)
    '''
)


def _launch(tmp_path: pathlib.Path, scenario: str, n: int, timeout: float = 45, env: dict[str, str] | None = None
            ) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]], float]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "gpuvars", "launch", "-n", str(n), "--timeout", str(timeout),
           str(script), scenario, str(tmp_path)]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 20, check=False,
                          env={**os.environ, **(env or {})})
    elapsed = time.monotonic() - started
    results = []
    for k in range(n):
        path = tmp_path / f"result_{k}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {})
    return done, results, elapsed


@pytest.mark.slow
def test_four_processes_join_meet_at_barriers_and_share_json(tmp_path: pathlib.Path) -> None:
    done, results, _ = _launch(tmp_path, "basics", 4)
    assert done.returncode == 0, done.stdout + done.stderr
    for k, r in enumerate(results):
        assert r["me"] == k and r["n"] == 4 and r["initialized"] is True
        assert r["got"] == [{"from": j, "list": [j, "x"]} for j in range(4)]
        assert "nobody/sets/this" in r["kv_timeout"] and "0.5s" in r["kv_timeout"]
    lines = done.stdout.splitlines()
    assert any(line.startswith("[3] ") for line in lines), done.stdout  # forwarded with its prefix


def _single_process(n: int, per_replica: list[np.ndarray[Any, Any]]) -> dict[str, Any]:
    """The reference: the same steps on a MirroredStrategy over n logical CPU devices."""
    config.set_logical_devices("cpu", n)
    strategy = gv.MirroredStrategy([f"/cpu:{i}" for i in range(n)])
    agg = gv.VariableAggregation
    values = gv.PerReplica(per_replica)
    with strategy.scope():
        w = gv.Variable(np.zeros(5, np.float32), name="w", aggregation=agg.SUM)  # process 0's initial value
        m = gv.Variable(np.ones(5, np.float32), name="m", aggregation=agg.MEAN)
        f = gv.Variable(np.zeros(5, np.float32), name="f", aggregation=agg.ONLY_FIRST_REPLICA)

        def step(x: Any, k: Any) -> Any:
            ctx = gv.get_replica_context()
            assert ctx is not None
            w.assign_add(x * k)
            m.assign_sub(x / k)
            f.assign(x + k)
            return ctx.all_reduce("SUM", x), ctx.all_reduce("MEAN", x)

        for k in (1.0, 2.0, 3.0):
            out = strategy.run(step, (values, np.float32(k)))
        sums, means = out.values[0]
        return {
            "w": w.numpy().tolist(), "m": m.numpy().tolist(), "f": f.numpy().tolist(),
            "all_reduce_sum": np.asarray(sums).tolist(), "all_reduce_mean": np.asarray(means).tolist(),
            "reduce_sum": np.asarray(strategy.reduce("SUM", values)).tolist(),
            "reduce_mean": np.asarray(strategy.reduce("MEAN", values)).tolist(),
        }


@pytest.mark.parametrize(
    "n, cpu_backend",
    [(2, "numpy"), (2, "jax"), pytest.param(4, "numpy", marks=pytest.mark.slow)],
)
def test_mirrored_variables_agree_and_equal_the_single_process_result(
    tmp_path: pathlib.Path, n: int, cpu_backend: str
) -> None:
    done, results, _ = _launch(tmp_path, "mirrored", n, env={"GPUVARS_CPU_BACKEND": cpu_backend})
    assert done.returncode == 0, done.stdout + done.stderr
    expected = _single_process(n, [np.random.default_rng(k).standard_normal(5).astype(np.float32) for k in range(n)])
    keys = ["w", "m", "f", "all_reduce_sum", "all_reduce_mean", "reduce_sum", "reduce_mean"]
    for r in results:
        assert r["replicas"] == n and r["agree"] is True
        assert r["w0"] == [0.0] * 5  # process 0's initial value, broadcast
        assert {k: r[k] for k in keys} == {k: results[0][k] for k in keys}  # every process: the same bits
        assert {k: r[k] for k in keys} == expected  # and the single-process result, exactly


def test_one_process_failing_ends_the_launcher_quickly(tmp_path: pathlib.Path) -> None:
    done, results, elapsed = _launch(tmp_path, "fail", 2)
    assert done.returncode != 0
    assert "[1] RuntimeError: process 1 fails on purpose" in done.stdout
    assert "[launch] process 1 exited with status 1" in done.stdout
    assert elapsed < 30  # process 0 waits in a 120 s barrier: the launcher ended it
    assert results == [{}, {}]


def test_a_barrier_timeout_names_the_missing_process(tmp_path: pathlib.Path) -> None:
    done, results, _ = _launch(tmp_path, "late", 2)
    assert done.returncode == 0, done.stdout + done.stderr
    first = results[0]
    assert first["processes"] == [1]
    assert "barrier 'late'" in first["error"] and "process(es) 1 did not arrive" in first["error"]


def test_the_launcher_kills_everything_past_its_timeout(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "sleeper.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(600)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "gpuvars", "launch", "-n", "2", "--timeout", "2", str(script)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 124
    assert time.monotonic() - started < 15
    assert "[0] started" in done.stdout and "[1] started" in done.stdout
    assert "[launch] timed out after 2s" in done.stdout


def test_initialize_without_arguments_or_environment_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GPUVARS_COORDINATOR", "GPUVARS_NUM_PROCESSES", "GPUVARS_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(gv.InvalidArgumentError, match="coordinator_address .or GPUVARS_COORDINATOR."):
        gv.distributed.initialize()
    with pytest.raises(gv.InvalidArgumentError, match="process_id must be an int in \\[0, 2\\)"):
        gv.distributed.initialize("127.0.0.1:1", 2, 2)
    assert not gv.distributed.is_initialized()
    assert (gv.distributed.process_id(), gv.distributed.num_processes()) == (0, 1)
    with pytest.raises(gv.DistributedError, match="needs gv.distributed.initialize"):
        gv.distributed.barrier("x", 1)


# --- devices of tasks: /job:worker/task:K on 2 processes ------------------------------------

TASKS_WORKER = textwrap.dedent(
    '''
    import json, os, sys, warnings
    import numpy as np
    import gpuvars as gv
    from gpuvars import placement

    out, index = sys.argv[1], int(sys.argv[2])
    gv.distributed.initialize(timeout=30)
    me = gv.distributed.process_id()
    other = 1 - me
    r = {"me": me, "local": gv.list_devices(), "all": gv.list_devices(all_processes=True)}
    r["spec"] = placement.resolve("/cpu:0").spec.to_string()
    r["own"] = gv.Variable(np.ones(2, np.float32), name="own", device=f"/job:worker/task:{me}/cpu:{index}").device
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r["soft"] = gv.Variable(np.ones(2, np.float32), name="soft", device=f"/job:worker/task:{other}/cpu:{index}").device
    r["warnings"] = [str(w.message) for w in caught if issubclass(w.category, gv.PlacementWarning)]
    errors = {}
    for label, spec in (("ps", "/job:ps/task:0"), ("far", "/job:worker/task:2/cpu:0")):
        try:
            gv.Variable(1.0, name=label, device=spec)
        except gv.DevicePlacementError as exc:
            errors[label] = str(exc)
    gv.config.set_soft_device_placement(False)
    try:
        gv.Variable(1.0, name="hard", device=f"/job:worker/task:{other}/cpu:0")
    except gv.DevicePlacementError as exc:
        errors["hard"] = str(exc)
    r["errors"] = errors
    gv.distributed.barrier("tasks done", 20)
    with open(os.path.join(out, f"tasks_{me}.json"), "w") as fh:
        json.dump(r, fh)
    '''
)


@pytest.mark.parametrize("cpu_backend", ["numpy", "jax"])
def test_two_processes_name_each_others_devices_by_task(tmp_path: pathlib.Path, cpu_backend: str) -> None:
    script = tmp_path / "tasks_worker.py"
    script.write_text(TASKS_WORKER)
    # the JAX CPU backend: as many CPU devices per process as XLA_FLAGS gives (conftest: 4)
    cpus = 4 if cpu_backend == "jax" else 1
    index = cpus - 1  # the last CPU: another task's /cpu:K falls back to this process's /cpu:K
    cmd = [sys.executable, "-m", "gpuvars", "launch", "-n", "2", "--timeout", "45", str(script), str(tmp_path), str(index)]
    env = {**os.environ, "GPUVARS_CPU_BACKEND": cpu_backend}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=65, check=False, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    results = [json.loads((tmp_path / f"tasks_{k}.json").read_text()) for k in range(2)]
    everything = [f"/job:worker/task:{k}/cpu:{i}" for k in range(2) for i in range(cpus)]
    for me, r in enumerate(results):
        other = 1 - me
        assert r["me"] == me
        assert r["local"] == [f"/cpu:{i}" for i in range(cpus)]
        assert r["all"] == everything
        assert r["spec"] == f"/job:worker/replica:0/task:{me}/device:CPU:0"
        assert r["own"] == f"/cpu:{index}" and r["soft"] == f"/cpu:{index}"
        (warning,) = r["warnings"]
        assert f"'/job:worker/task:{other}/cpu:{index}' is not available" in warning
        assert f"it is a device of task {other}, another process" in warning
        assert f"this process is /job:worker/task:{me}" in warning and f"using '/cpu:{index}' instead" in warning
        hard = r["errors"]["hard"]
        assert f"'/job:worker/task:{other}/cpu:0' for variable 'hard'" in hard and f"task {other}" in hard
        assert "Soft placement is off" in hard
        assert "there is no job 'ps'" in r["errors"]["ps"] and "job 'worker' with tasks 0 to 1" in r["errors"]["ps"]
        assert "there is no task 2 (tasks 0 to 1)" in r["errors"]["far"]
        assert f"every process's: {everything}" in r["errors"]["far"]
        assert "for variable 'far'" in r["errors"]["far"]
