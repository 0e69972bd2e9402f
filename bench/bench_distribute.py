"""Distributed variables: mirrored assign and replica-context SUM updates over 1/2/4 devices, and
EXPAND_DISTRIBUTED_VARIABLES vs NONE checkpoints of the same mirrored variables.

Part ``ops`` (per call, per replica). For each backend, a 1-D float32 size (16 and 1M = 2**20
elements) and a replica count n in {1, 2, 4}, one ``gv.MirroredStrategy(["/cpu:0", ...,
"/cpu:{n-1}"])`` over logical CPU devices (``gv.config.set_logical_devices("cpu", 4)``;
numpy, and JAX's CPU devices with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``):

=================  ====================================================  ===========================
row                timed call                                            compared with
=================  ====================================================  ===========================
assign             ``plain.assign(x)``, a plain gv.Variable on /cpu:0    (the baseline)
mirrored assign    ``w.assign(x)`` on a MirroredVariable, cross-replica  plain assign, per replica
                   context: writes every component (x: host numpy)
assign_add         ``plain.assign_add(d0)``, d0 on /cpu:0                (the baseline)
run(noop)          ``strategy.run(lambda: None)``: handing the step to the  raw threads, raw pool
                   replicas and waiting for them, nothing else
raw threads        the same empty step, raw Python: start and join n     -
                   ``threading.Thread`` per call (what run did before
                   persistent replica threads)
raw pool           the same empty step, raw Python: n - 1 persistent     -
                   threads fed by ``queue.SimpleQueue``, the caller runs
                   one inline and waits on one lock (the floor of
                   gpuvars' scheme, without contexts or bookkeeping)
run NONE           ``strategy.run(step, args=(PerReplica(d_k),))`` with  plain assign_add
                   ``step = lambda d: w.assign_add(d)``, w aggregation
                   NONE: each replica updates its own copy, no rendezvous
run SUM            the same step on a SUM-aggregated w: every replica     run NONE; plain assign_add
                   meets at the rendezvous (TF's merge_call), the
                   deltas are all-reduced, each replica adds the sum
=================  ====================================================  ===========================

d_k lives on replica k's device (as a per-replica gradient would). Replica 0 runs on the
calling thread, the others on the strategy's persistent threads; a rendezvous is one
``threading.Barrier`` wait per collective: at 16 elements the rows measure the hand-off and
synchronization, not arithmetic. The goal printed at the end: ``run(noop)`` at 4 replicas
at most 100 us (the worst cell: backend and size). "per replica" = per-call time / n.
``SUM - NONE`` is the price of the rendezvous plus the reduction; ``run(noop)`` the price of
the threads alone.

Part ``ckpt``. 16 mirrored float32 variables of 4 MiB (1024 x 1024; 64 MiB logical) on 2
and 4 replicas: ``gv.Saver(vars, options=SaveOptions(policy)).save(prefix)`` (it fsyncs
every file and the folder) and ``saver.restore(prefix)`` into the same variables (zeroed,
untimed, before each restore), with policy NONE (one logical tensor per variable; a
restore reads it into the primary and copies it to the other components) and
EXPAND_DISTRIBUTED_VARIABLES (also one replica file per component; a restore into the same
topology reads every component from its own replica file). Reported: seconds, GiB/s of
logical bytes (64 MiB) and of the bytes the step really moved through ``write``/``read``
system calls (``wchar``/``rchar`` of ``/proc/self/io``), and EXPAND/NONE. Every restore is
checked against the source on every component (untimed).

Systems (``harness.System``): ``gpuvars`` (every row above but the raw ones, and the
checkpoints), ``raw_threads`` and ``raw_pool`` (the two raw baselines of ``run(noop)``); a
system or backend whose module is missing is skipped with the reason.

Method (``bench/harness.py``, the house rules of bench/): every cell runs in a fresh process
(``harness.spawn`` re-invokes this program with ``--cell``; the child answers through
``harness.cell_main``), JAX's CPU cells with ``--xla_force_host_platform_device_count=4``;
the checkpoint cells run with glibc's mmap threshold pinned, the ops cells without (their
calls reuse mid-size temporaries; ``harness.child_env``). The cells run for ``--rounds``
rounds, the order of the cells reversed every other round and, inside an ops cell, the
order of the systems rotating (``harness.rotated``); the tables quote the median over rounds
of each cell's own median (``harness.summary``). Before timing, a cell touches and frees an
anonymous buffer (and, before a save, writes and unlinks a scratch file) of the step's
size + 64 MiB, so the pages the step takes are host-backed (first touch on these VMs runs
at ~0.5 GB/s). Ops (``harness.time_calls``): each op is warmed up (>= 1000 calls and >=
``--warmup-s``, or 5x that time for slow calls), then timed in ``--batches`` batches of
~``--batch-ms`` with ``time.perf_counter_ns``; a cell's figure is the median per-call time
over its batches. JAX and GPU calls end with a wait for every device the call touched
(``block_until_ready`` / a device synchronize), inside the timed call; numpy has nothing to
wait for. Checkpoints: ``--repeats`` timed save+restore pairs per process (no untimed pair
before them). ``--quick`` runs fewer cells: ops only at 16 elements and 4 replicas (the
goal's cell), checkpoints only at 2 replicas, one round, shorter batches.

``--gpu`` runs the same cells on ``/gpu:0`` .. ``/gpu:{n-1}`` with CuPy
(``gv.config.set_gpu_backend("cupy")``) and with JAX (``"jax"``) instead of the CPU
cells, each replica count only where that many GPUs exist (where none fits: the ops on
as many replicas as there are GPUs, the checkpoints on 1); what cannot run prints
``skipped: <reason>``.

Usage::

    python bench/bench_distribute.py                  # ~5 min on a 2-core VM: 3 rounds of 20 cells
    python bench/bench_distribute.py --quick          # ~25 s: 1 round, 6 cells, short batches
    python bench/bench_distribute.py --json out.json  # also every cell, the rows, the goal and the machine
    python bench/bench_distribute.py --parts ops --backends numpy --sizes 16 --replicas 1,4
    python bench/bench_distribute.py --gpu --quick    # the GPU cells (bench/gpu.sh)

The JSON (``harness.write_json``) has the shared keys (``program``, ``machine``, ``cells``,
``goals``: the goal above as ``harness.goal``, in microseconds) and this program's
``ops_rows``, ``run_goal``, ``ckpt_rows``, ``notes``, ``skipped`` and ``failed``.

Speed is reported, never asserted; a cell that computes a wrong value is marked WRONG.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import harness
import numpy as np
from harness import GiB, MiB, Skip, System, warm_free_pages
from harness import fmt_ns as _fmt_ns
from harness import fmt_size as _fmt_size

SIZES = (16, 1 << 20)
REPLICAS = (1, 2, 4)
CKPT_REPLICAS = (2, 4)
#: --quick: the goal's cell (16 elements, 4 replicas) and the checkpoints at 2 replicas: 6 fresh processes, not 20
QUICK_SIZES, QUICK_REPLICAS, QUICK_CKPT_REPLICAS = (16,), (4,), (2,)
CPU_BACKENDS = ("numpy", "jax")
GPU_BACKENDS = ("cupy", "jax")
#: what must be importable for each backend's cells (else the backend is skipped, with the reason)
BACKEND_REQUIRES = {"numpy": (), "jax": ("jax",), "cupy": ("cupy",)}
CPU_DEVICES = 4  # logical CPU devices every CPU cell creates (JAX: its CPU device count)
OPS = ("assign", "mirrored_assign", "assign_add", "run_noop", "run_none", "run_sum", "raw_threads_noop", "raw_pool_noop")
RUN_GOAL = "strategy.run of an empty step, 4 replicas (worst backend)"
RUN_GOAL_US = 100.0  # fixed-costs issue: strategy.run of an empty step under 100 us at 4 replicas
POLICIES = ("NONE", "EXPAND")
N_VARS = 16
VAR_SHAPE = (1024, 1024)  # float32: 4 MiB
WARM_MARGIN = 64 * MiB
DELTA = 1.0 / 1024  # exact in float32: sums of deltas stay exact, so components agree bit for bit


# --- systems -------------------------------------------------------------------------------------


class Gpuvars(System):
    name = "gpuvars"
    note = ("plain.assign / mirrored w.assign / plain.assign_add / strategy.run(noop) / strategy.run(step) with "
            "w NONE and SUM; Saver.save / restore with policy NONE and EXPAND_DISTRIBUTED_VARIABLES")
    requires = ("gpuvars",)


class RawThreads(System):
    name = "raw_threads"
    note = "the empty step, raw Python: start and join n threading.Thread per call"


class RawPool(System):
    name = "raw_pool"
    note = ("the empty step, raw Python: n - 1 persistent threads fed by queue.SimpleQueue, the caller runs one "
            "inline and waits on one lock")


SYSTEMS: dict[str, type[System]] = {s.name: s for s in (Gpuvars, RawThreads, RawPool)}
#: the ops of part ``ops`` each system's code does (the checkpoints are gpuvars' alone)
OPS_OF = {"gpuvars": OPS[:6], "raw_threads": ("raw_threads_noop",), "raw_pool": ("raw_pool_noop",)}


# --- helpers shared by the cells ------------------------------------------------------------------


def proc_io() -> dict[str, int]:
    """``rchar``/``wchar`` of this process (all threads), or {} where /proc/self/io is missing."""
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f if line.startswith(("rchar", "wchar")))}
    except OSError:
        return {}


def _setup(platform_: str, lib: str) -> Any:
    """Configure gpuvars for ``lib`` on ``platform_`` (before any placement) and return it."""
    Gpuvars.require()
    why = harness.missing(BACKEND_REQUIRES[lib])
    if why:
        raise Skip(f"{lib}: {why}")
    import gpuvars as gv

    if platform_ == "cpu":
        if lib == "jax":
            gv.config.set_cpu_backend("jax")
        gv.config.set_logical_devices("cpu", CPU_DEVICES)
    else:
        import gpuvars_backends as backends

        probe = backends.probe(lib, "gpu")
        if not probe.usable:
            raise Skip(f"{lib} cannot use a GPU here: {probe.reason}")
        gv.config.set_gpu_backend(lib)
    gv.config.set_soft_device_placement(False)  # never measure a silent fallback to /cpu:0
    return gv


def _devices(gv: Any, platform_: str, n: int) -> list[str]:
    have = [d for d in gv.list_devices() if d.startswith(f"/{platform_}:")]
    if len(have) < n:
        raise Skip(f"{n} replicas need {n} {platform_.upper()} devices; this process has {len(have)}")
    return [f"/{platform_}:{k}" for k in range(n)]


def _backend_device_index(lib: str, array: Any) -> int:
    """The device index of ``array`` as its own library reports it."""
    if lib == "cupy":
        return int(array.device.id)
    if lib == "jax":
        import jax

        dev = next(iter(array.devices()))
        return list(jax.devices(dev.platform)).index(dev)
    return -1


def _check_placement(lib: str, variables: list[Any], devices: list[str]) -> None:
    """Every variable's storage is served by ``lib`` on the device it claims (Skip otherwise)."""
    for v, want in zip(variables, devices):
        if v.device != want or v.backend != lib:
            raise Skip(f"gpuvars placed {v.name} on {v.device} with {v.backend}, not {want} with {lib}")
        if lib != "numpy":
            index = _backend_device_index(lib, v.value())
            if f"/{want.split(':')[0].strip('/')}:{index}" != want:
                raise Skip(f"{v.name}: {lib} holds its storage on device {index}, not {want}")


def _syncer(lib: str, variables: list[Any]) -> Callable[[], None]:
    """A function that waits until every update of ``variables`` has finished on its device."""
    if lib == "numpy":
        return lambda: None
    if lib == "jax":
        import jax

        block = jax.block_until_ready

        def jax_sync() -> None:
            block([v.value() for v in variables])

        return jax_sync
    import cupy

    devs = [cupy.cuda.Device(i) for i in sorted({int(v.value().device.id) for v in variables})]

    def cupy_sync() -> None:
        for d in devs:
            d.synchronize()

    return cupy_sync


# --- part ops ------------------------------------------------------------------------------------


class _RawPool:
    """The raw baseline of persistent replica threads: ``size`` workers, one SimpleQueue each,
    the caller runs one task inline and then waits on one lock the last worker releases."""

    def __init__(self, size: int) -> None:
        self.inboxes: list[queue.SimpleQueue[Any]] = [queue.SimpleQueue() for _ in range(size)]
        self.count_lock = threading.Lock()
        self.left = 0
        self.done = threading.Lock()
        for q in self.inboxes:
            threading.Thread(target=self._work, args=(q,), daemon=True).start()

    def _work(self, q: queue.SimpleQueue[Any]) -> None:
        while (fn := q.get()) is not None:
            fn()
            with self.count_lock:
                self.left -= 1
                last = self.left == 0
            if last:
                self.done.release()

    def run(self, fn: Callable[[], None]) -> None:
        if not self.inboxes:
            fn()
            return
        self.left = len(self.inboxes)
        self.done.acquire()
        for q in self.inboxes:
            q.put(fn)
        fn()
        self.done.acquire()  # released by the last worker
        self.done.release()

    def close(self) -> None:
        for q in self.inboxes:
            q.put(None)


def run_ops_cell(cell: dict[str, Any]) -> dict[str, Any]:
    platform_, lib, size, n = cell["platform"], cell["lib"], cell["size"], cell["replicas"]
    gv = _setup(platform_, lib)
    devices = _devices(gv, platform_, n)
    strategy = gv.MirroredStrategy(devices)
    host_x = np.random.default_rng(7).random(size, dtype=np.float32)  # the assign source
    host_d = np.full(size, DELTA, np.float32)
    zeros = np.zeros(size, np.float32)
    with gv.Registry():
        plain = gv.Variable(zeros, name="plain", device=devices[0])
        with strategy.scope():
            w_assign = gv.Variable(zeros, name="w_assign")
            w_none = gv.Variable(zeros, name="w_none")
            w_sum = gv.Variable(zeros, name="w_sum", aggregation=gv.VariableAggregation.SUM)
        _check_placement(lib, [plain], devices[:1])
        for w in (w_assign, w_none, w_sum):
            _check_placement(lib, list(w.values), devices)
        d0 = gv.copy_to(host_d, devices[0])
        per_replica = gv.PerReplica([gv.copy_to(host_d, d) for d in devices])  # d_k on device k

        def step(d: Any) -> None:
            w_step.assign_add(d, read_value=False)

        # correctness first (untimed): SUM gives n * delta on every component, NONE delta
        ok = True
        for w_step in (w_sum, w_none):
            strategy.run(step, args=(per_replica,))
        ok &= all(np.array_equal(c.numpy(), np.full(size, n * DELTA, np.float32)) for c in w_sum.values)
        ok &= all(np.array_equal(c.numpy(), host_d) for c in w_none.values)
        w_assign.assign(host_x)
        ok &= all(np.array_equal(c.numpy(), host_x) for c in w_assign.values)

        sync_plain = _syncer(lib, [plain])
        sync_assign = _syncer(lib, list(w_assign.values))
        sync_none = _syncer(lib, list(w_none.values))
        sync_sum = _syncer(lib, list(w_sum.values))
        run = strategy.run

        def b_assign(k: int) -> None:
            f = plain.assign
            for _ in range(k):
                f(host_x, read_value=False)
                sync_plain()

        def b_mirrored_assign(k: int) -> None:
            f = w_assign.assign
            for _ in range(k):
                f(host_x, read_value=False)
                sync_assign()

        def b_assign_add(k: int) -> None:
            f = plain.assign_add
            for _ in range(k):
                f(d0, read_value=False)
                sync_plain()

        def noop() -> None:
            return None

        def b_run_noop(k: int) -> None:
            for _ in range(k):
                run(noop)

        def b_run_none(k: int) -> None:
            nonlocal w_step
            w_step = w_none
            for _ in range(k):
                run(step, args=(per_replica,))
                sync_none()

        def b_run_sum(k: int) -> None:
            nonlocal w_step
            w_step = w_sum
            for _ in range(k):
                run(step, args=(per_replica,))
                sync_sum()

        def b_raw_threads_noop(k: int) -> None:
            for _ in range(k):
                threads = [threading.Thread(target=noop) for _ in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()

        raw_pool = _RawPool(n - 1)

        def b_raw_pool_noop(k: int) -> None:
            for _ in range(k):
                raw_pool.run(noop)

        bodies = {"assign": b_assign, "mirrored_assign": b_mirrored_assign, "assign_add": b_assign_add,
                  "run_noop": b_run_noop, "run_none": b_run_none, "run_sum": b_run_sum,
                  "raw_threads_noop": b_raw_threads_noop, "raw_pool_noop": b_raw_pool_noop}
        warm_free_pages(8 * n * size * 4 + WARM_MARGIN)
        gc.collect()
        timed: dict[str, Any] = {}
        for system in harness.rotated(cell["systems"], cell.get("round", 0)):  # who goes first rotates by round
            for op in OPS_OF[system]:
                timed[op] = harness.time_calls(bodies[op], cell["batches"], cell["batch_ms"], cell["warmup_s"])
        ok &= w_sum.components_agree() and w_assign.components_agree()
        raw_pool.close()
    return {**cell, "devices": devices, "ok": bool(ok), "loop_ns": harness.loop_ns(cell["batch_ms"]),
            "ops": {op: timed[op] for op in OPS if op in timed}}


# --- part ckpt -----------------------------------------------------------------------------------


def run_ckpt_cell(cell: dict[str, Any]) -> dict[str, Any]:
    platform_, lib, n, policy = cell["platform"], cell["lib"], cell["replicas"], cell["policy"]
    gv = _setup(platform_, lib)
    devices = _devices(gv, platform_, n)
    strategy = gv.MirroredStrategy(devices)
    pol = gv.VariablePolicy.NONE if policy == "NONE" else gv.VariablePolicy.EXPAND_DISTRIBUTED_VARIABLES
    opts = gv.SaveOptions(experimental_variable_policy=pol)
    rng = np.random.default_rng(0)
    data = [rng.random(math.prod(VAR_SHAPE), dtype=np.float32).reshape(VAR_SHAPE) for _ in range(N_VARS)]
    logical = sum(a.nbytes for a in data)
    zeros = np.zeros(VAR_SHAPE, np.float32)
    folder = os.path.join(cell["dir"], f"cell-{os.getpid()}")
    os.makedirs(folder)
    saves: list[float] = []
    restores: list[float] = []
    wrote: list[int] = []
    read: list[int] = []
    file_bytes = 0
    ok = True
    try:
        with gv.Registry():
            with strategy.scope():
                variables = [gv.Variable(a, name=f"layer{i:02d}") for i, a in enumerate(data)]
            for v in variables:
                _check_placement(lib, list(v.values), devices)
            sync = _syncer(lib, [c for v in variables for c in v.values])
            sync()
            for i in range(cell["repeats"]):
                saver = gv.Saver(variables, max_to_keep=None, options=opts)
                expect = logical * (1 + n if policy == "EXPAND" else 1)
                warm_free_pages(expect + WARM_MARGIN, folder)
                gc.collect()
                io0 = proc_io()
                t0 = time.perf_counter()
                prefix = saver.save(os.path.join(folder, f"model-{i}"))
                t1 = time.perf_counter()
                io1 = proc_io()
                saves.append(t1 - t0)
                wrote.append(io1.get("wchar", 0) - io0.get("wchar", 0))
                file_bytes = sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())
                for v in variables:  # untimed: every component zeroed before the restore
                    v.assign(zeros, read_value=False)
                sync()
                warm_free_pages(logical * (n + 1) + WARM_MARGIN)
                gc.collect()
                io0 = proc_io()
                t0 = time.perf_counter()
                saver.restore(prefix)
                sync()
                t1 = time.perf_counter()
                io1 = proc_io()
                restores.append(t1 - t0)
                read.append(io1.get("rchar", 0) - io0.get("rchar", 0))
                ok &= all(np.array_equal(c.numpy(), a) for v, a in zip(variables, data) for c in v.values)
                for e in os.scandir(folder):
                    os.unlink(e.path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {**cell, "devices": devices, "ok": bool(ok), "logical_bytes": logical, "file_bytes": file_bytes,
            "save_s": saves, "restore_s": restores, "save_wchar": wrote, "restore_rchar": read,
            "io_counted": bool(proc_io())}


def probe_gpus() -> dict[str, dict[str, Any]]:
    """{lib: {"count": n, "reason": why not}} for CuPy and JAX on the GPU (run in a child)."""
    import gpuvars_backends as backends

    out = {}
    for lib in GPU_BACKENDS:
        p = backends.probe(lib, "gpu")
        out[lib] = {"count": p.count, "reason": p.reason}
    return out


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Run one cell in this process (the child of ``harness.spawn``; a cell that cannot run
    here raises ``Skip``, which ``harness.cell_main`` reports)."""
    if cell["kind"] == "ops":
        return run_ops_cell(cell)
    return run_ckpt_cell(cell)


# --- the driver ----------------------------------------------------------------------------------


def cell_env(platform_: str, lib: str, kind: str) -> dict[str, str]:
    """``harness.child_env`` for one cell: JAX's CPU cells get ``CPU_DEVICES`` CPU devices and
    never start a GPU; glibc's mmap threshold is pinned for the checkpoint cells (big arrays
    freed between repeats) and left adaptive for the ops cells, whose calls allocate and free
    the same mid-size temporaries over and over (see ``harness.child_env``)."""
    extra: dict[str, str] = {}
    if lib == "jax" and platform_ == "cpu":
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        extra["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={CPU_DEVICES}"])
        extra["JAX_PLATFORMS"] = "cpu"  # a CPU cell never starts a GPU, even where there is one
    return harness.child_env(extra, pin_malloc=kind == "ckpt")


def machine_info(folder: str) -> dict[str, Any]:
    """The shared machine record (``harness.machine_record``) for ``folder``, with the load
    average at start (per-call figures are what a busy machine moves most). Also used by
    bench_multiprocess."""
    info: dict[str, Any] = harness.machine_record(folder)
    info["loadavg_at_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return info


machine_line = harness.machine_line  # bench_multiprocess imports it from here


def ops_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (platform, lib, size, replicas): the median over rounds of each op, and the ratios."""
    groups: dict[tuple[str, str, int, int], list[dict[str, Any]]] = {}
    for c in cells:
        if c.get("kind") == "ops" and "ops" in c:
            groups.setdefault((c["platform"], c["lib"], c["size"], c["replicas"]), []).append(c)
    rows = []
    for (plat, lib, size, n), cs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "numpy", kv[0][1], kv[0][2], kv[0][3])):
        timed = [op for op in OPS if all(op in c["ops"] for c in cs)]  # a skipped system's ops are missing
        stats = {op: harness.summary([c["ops"][op]["ns"] for c in cs]) for op in timed}
        med = {op: st["median"] for op, st in stats.items()}
        spread = max((st["max"] - st["min"]) / st["median"] for st in stats.values()) if len(cs) > 1 else None
        rows.append({
            "platform": plat, "lib": lib, "size": size, "replicas": n, "rounds": len(cs),
            "ok": all(c["ok"] for c in cs), "ns": med, "spread": spread,
            "mirrored_assign_per_replica_ns": med["mirrored_assign"] / n,
            "mirrored_assign_per_replica_x_plain": med["mirrored_assign"] / n / med["assign"],
            "run_none_per_replica_ns": med["run_none"] / n,
            "run_sum_per_replica_ns": med["run_sum"] / n,
            "run_sum_x_none": med["run_sum"] / med["run_none"],
            "run_sum_per_replica_x_plain_add": med["run_sum"] / n / med["assign_add"],
            "run_none_per_replica_x_plain_add": med["run_none"] / n / med["assign_add"],
            "threads_ns": med["run_noop"],
            "local_updates_ns": med["run_none"] - med["run_noop"],
            "rendezvous_reduce_ns": med["run_sum"] - med["run_none"],
        })
    return rows


def ckpt_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for c in cells:
        if c.get("kind") == "ckpt" and "save_s" in c:
            groups.setdefault((c["platform"], c["lib"], c["replicas"], c["policy"]), []).append(c)
    rows = []
    for (plat, lib, n, policy), cs in groups.items():
        for phase, key, io_key in (("save", "save_s", "save_wchar"), ("restore", "restore_s", "restore_rchar")):
            times = [t for c in cs for t in c[key]]
            moved = [b for c in cs for b in c[io_key]]
            st = harness.summary(times)
            t = st["median"]
            b = harness.summary(moved)["median"] if all(c["io_counted"] for c in cs) else None
            rows.append({"platform": plat, "lib": lib, "replicas": n, "policy": policy, "phase": phase,
                         "ok": all(c["ok"] for c in cs), "median_s": t, "min_s": st["min"], "max_s": st["max"],
                         "samples": st["n"], "logical_bytes": cs[0]["logical_bytes"],
                         "file_bytes": cs[0]["file_bytes"], "io_bytes": b,
                         "logical_gib_s": cs[0]["logical_bytes"] / GiB / t,
                         "io_gib_s": None if b is None else b / GiB / t})
    by = {(r["platform"], r["lib"], r["replicas"], r["phase"], r["policy"]): r for r in rows}
    for r in rows:
        none = by.get((r["platform"], r["lib"], r["replicas"], r["phase"], "NONE"))
        r["x_none"] = r["median_s"] / none["median_s"] if none else None
    rows.sort(key=lambda r: (r["platform"], r["lib"] != "numpy", r["lib"], r["replicas"], r["phase"] != "save",
                             r["policy"] != "NONE"))
    return rows


def _wrong(r: dict[str, Any]) -> str:
    return "" if r["ok"] else " WRONG"


def print_ops(rows: list[dict[str, Any]]) -> None:
    print("(a) cross-replica assign of a host value: mirrored w.assign(x) writes every component")
    print()
    print("| backend | elements | replicas | plain assign | mirrored assign | per replica | per replica / plain |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ns = r["ns"]
        print(f"| {r['lib']} {r['platform']}{_wrong(r)} | {_fmt_size(r['size'])} | {r['replicas']} | "
              f"{_fmt_ns(ns['assign'])} | {_fmt_ns(ns['mirrored_assign'])} | "
              f"{_fmt_ns(r['mirrored_assign_per_replica_ns'])} | {r['mirrored_assign_per_replica_x_plain']:.2f}x |")
    print()
    print("(b) one strategy.run(step) where every replica does w.assign_add(d_k)")
    print()
    print("| backend | elements | replicas | plain assign_add | run NONE | NONE per replica | run SUM | "
          "SUM per replica | SUM / NONE | SUM per replica / plain | threads: run(noop) | SUM - NONE | spread |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ns = r["ns"]
        spread = "-" if r["spread"] is None else f"{100 * r['spread']:.0f}%"
        print(f"| {r['lib']} {r['platform']}{_wrong(r)} | {_fmt_size(r['size'])} | {r['replicas']} | "
              f"{_fmt_ns(ns['assign_add'])} | {_fmt_ns(ns['run_none'])} | {_fmt_ns(r['run_none_per_replica_ns'])} | "
              f"{_fmt_ns(ns['run_sum'])} | {_fmt_ns(r['run_sum_per_replica_ns'])} | {r['run_sum_x_none']:.2f}x | "
              f"{r['run_sum_per_replica_x_plain_add']:.1f}x | {_fmt_ns(ns['run_noop'])} | "
              f"{_fmt_ns(r['rendezvous_reduce_ns'])} | {spread} |")


def _x(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def print_run_floor(rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Table (d), the empty step against its raw baselines, and the goal: returns the run_goal
    record of the JSON and the goals (``harness.goal``) measured."""
    print("(d) strategy.run of an empty step against raw Python threads doing the same hand-off")
    print()
    print("| backend | elements | replicas | run(noop) | raw threads (start+join n) | raw pool (n - 1 persistent) | "
          "run / raw threads | run / raw pool |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ns = r["ns"]
        threads, pool = ns.get("raw_threads_noop"), ns.get("raw_pool_noop")
        print(f"| {r['lib']} {r['platform']} | {_fmt_size(r['size'])} | {r['replicas']} | {_fmt_ns(ns['run_noop'])} | "
              f"{_fmt_ns(threads)} | {_fmt_ns(pool)} | {_x(ns['run_noop'], threads)} | {_x(ns['run_noop'], pool)} |")
    at4 = [r["ns"]["run_noop"] for r in rows if r["replicas"] == 4]
    if not at4:
        print("\ngoal: strategy.run of an empty step at 4 replicas: not measured (needs --replicas 4)")
        return None, []
    worst = max(at4)
    goal = harness.goal(RUN_GOAL, worst / 1e3, RUN_GOAL_US, "us")
    print(f"\ngoal: strategy.run of an empty step at 4 replicas costs {_fmt_ns(worst)} (the worst cell; "
          f"target <= {_fmt_ns(RUN_GOAL_US * 1e3)}): {'MET' if goal['met'] else 'NOT MET'}")
    return {"target_ns": RUN_GOAL_US * 1e3, "worst_ns": worst, "met": goal["met"]}, [goal]


def print_ckpt(rows: list[dict[str, Any]]) -> None:
    print(f"(c) Saver.save / Saver.restore of {N_VARS} mirrored float32 variables x "
          f"{math.prod(VAR_SHAPE) * 4 // MiB} MiB ({N_VARS * math.prod(VAR_SHAPE) * 4 // MiB} MiB logical)")
    print()
    print("| backend | replicas | phase | policy | median s | logical GiB/s | MiB written/read | I/O GiB/s | "
          "files MiB | EXPAND / NONE | min-max s |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        io = "n/a" if r["io_bytes"] is None else f"{r['io_bytes'] / MiB:.0f}"
        io_rate = "n/a" if r["io_gib_s"] is None else f"{r['io_gib_s']:.2f}"
        ratio = "-" if r["policy"] == "NONE" or r["x_none"] is None else f"{r['x_none']:.2f}x"
        bad = "" if r["ok"] else " (WRONG DATA)"
        print(f"| {r['lib']} {r['platform']} | {r['replicas']} | {r['phase']} | {r['policy']}{bad} | "
              f"{r['median_s']:.3f} | {r['logical_gib_s']:.2f} | {io} | {io_rate} | {r['file_bytes'] / MiB:.0f} | "
              f"{ratio} | {r['min_s']:.3f}-{r['max_s']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"1 round, 5 batches of 15 ms, 0.05 s warm-up, ops at {_fmt_size(QUICK_SIZES[0])} elements "
                         f"and {','.join(map(str, QUICK_REPLICAS))} replicas, checkpoints at "
                         f"{','.join(map(str, QUICK_CKPT_REPLICAS))} replicas, 1 checkpoint repeat")
    ap.add_argument("--json", metavar="PATH", help="also write every cell, the rows and the machine here")
    ap.add_argument("--gpu", action="store_true", help="the cells on /gpu:N with CuPy and JAX instead of the CPU cells")
    ap.add_argument("--parts", default="ops,ckpt", help="comma list of ops, ckpt")
    ap.add_argument("--backends", help=f"comma list (CPU: {','.join(CPU_BACKENDS)}; --gpu: {','.join(GPU_BACKENDS)})")
    ap.add_argument("--sizes", help=f"ops: comma list of element counts (default {','.join(map(str, SIZES))}; "
                                    f"quick {','.join(map(str, QUICK_SIZES))})")
    ap.add_argument("--replicas", help=f"ops: comma list of replica counts, <= {CPU_DEVICES} on CPU (default "
                                       f"{','.join(map(str, REPLICAS))}; quick {','.join(map(str, QUICK_REPLICAS))})")
    ap.add_argument("--ckpt-replicas", help=f"ckpt: comma list of replica counts (default "
                                            f"{','.join(map(str, CKPT_REPLICAS))}; quick "
                                            f"{','.join(map(str, QUICK_CKPT_REPLICAS))})")
    ap.add_argument("--rounds", type=int, help="fresh-process rounds per cell (default 3; quick 1)")
    ap.add_argument("--batches", type=int, help="ops: timed batches per op (default 7; quick 5)")
    ap.add_argument("--batch-ms", type=float, help="ops: target batch duration (default 30; quick 15)")
    ap.add_argument("--warmup-s", type=float, help="ops: minimum warm-up per op (default 0.1; quick 0.05)")
    ap.add_argument("--repeats", type=int, help="ckpt: timed save+restore pairs per process (default 2; quick 1)")
    ap.add_argument("--dir", default="/tmp/gpuvars-bench-distribute", help="ckpt: folder for the checkpoint files")
    ap.add_argument("--probe-gpu", action="store_true", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    if harness.cell_main(run_cell, argv):
        return 0
    args = ap.parse_args(argv)
    if args.probe_gpu:
        harness.emit(probe_gpus())
        return 0
    defaults = ((1, 5, 15.0, 0.05, 1, QUICK_SIZES, QUICK_REPLICAS, QUICK_CKPT_REPLICAS) if args.quick else
                (3, 7, 30.0, 0.1, 2, SIZES, REPLICAS, CKPT_REPLICAS))
    for name, value in zip(("rounds", "batches", "batch_ms", "warmup_s", "repeats", "sizes", "replicas",
                            "ckpt_replicas"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, ",".join(map(str, value)) if isinstance(value, tuple) else value)

    platform_ = "gpu" if args.gpu else "cpu"
    known = GPU_BACKENDS if args.gpu else CPU_BACKENDS
    libs = [b for b in (args.backends or ",".join(known)).split(",") if b]
    parts = [p for p in args.parts.split(",") if p]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    replicas = [int(s) for s in args.replicas.split(",") if s]
    ckpt_replicas = [int(s) for s in args.ckpt_replicas.split(",") if s]
    for lib in libs:
        if lib not in known:
            ap.error(f"unknown backend {lib!r} for {platform_}; choose from {known}")
    for p in parts:
        if p not in ("ops", "ckpt"):
            ap.error(f"unknown part {p!r}; choose from ops, ckpt")
    if args.rounds < 1 or args.repeats < 1 or any(n < 1 for n in replicas + ckpt_replicas):
        ap.error("--rounds, --repeats and replica counts must be >= 1")
    if not args.gpu and any(n > CPU_DEVICES for n in replicas + ckpt_replicas):
        ap.error(f"at most {CPU_DEVICES} replicas on the logical CPU devices")
    os.makedirs(args.dir, exist_ok=True)

    machine = machine_info(args.dir)
    command = " ".join(["python", "bench/bench_distribute.py", *argv])
    print(f"Machine: {machine_line(machine)}")
    print(f"Command: {command}")
    notes: list[str] = []
    systems, skipped = harness.available(SYSTEMS.values())
    for name, why in skipped.items():
        notes.append(f"skipped: system {name}: {why}")
    if "gpuvars" in skipped:
        libs = []  # every cell times gpuvars
    for lib in list(libs):
        why = harness.missing(BACKEND_REQUIRES[lib])
        if why:
            skipped[lib] = why
            extra = f" (pip install 'gpuvars[{lib}]')" if lib == "jax" else ""
            notes.append(f"skipped: {lib} on {platform_.upper()}: {why}{extra}")
            libs.remove(lib)
    counts: dict[str, int] = {}
    if args.gpu and libs:
        probe = harness.spawn(__file__, {"kind": "probe"}, args=["--probe-gpu"], timeout=300, env=harness.child_env())
        for lib in libs:
            info = probe.get(lib) if "error" not in probe else None
            if info is None:
                skipped[lib] = f"the GPU probe failed: {probe.get('error')}"
            elif info["count"] < 1:
                skipped[lib] = str(info["reason"])
            else:
                counts[lib] = info["count"]
                continue
            notes.append(f"skipped: {lib} on GPU: {skipped[lib]}")
        libs = [lib for lib in libs if lib in counts]

    system_names = [s.name for s in systems]
    cells: list[dict[str, Any]] = []
    for lib in libs:
        have = counts.get(lib, CPU_DEVICES)
        if "ops" in parts:
            fits = [n for n in replicas if n <= have]
            if len(fits) < len(replicas):
                instead = min(have, max(replicas))
                notes.append(f"skipped: {lib} ops with {[n for n in replicas if n > have]} replicas: "
                             f"this machine has {have} GPU(s)" + ("" if fits else f"; {instead} replica(s) instead"))
                fits = fits or [instead]
            for size in sizes:
                for n in fits:
                    cells.append({"kind": "ops", "platform": platform_, "lib": lib, "size": size, "replicas": n,
                                  "systems": system_names, "batches": args.batches, "batch_ms": args.batch_ms,
                                  "warmup_s": args.warmup_s})
        if "ckpt" in parts:
            fits = [n for n in ckpt_replicas if n <= have]
            if len(fits) < len(ckpt_replicas):
                notes.append(f"skipped: {lib} checkpoints with {[n for n in ckpt_replicas if n > have]} replicas: "
                             f"this machine has {have} GPU(s)" + ("; 1 replica instead" if not fits else ""))
                fits = fits or [1]
            for n in fits:
                for policy in POLICIES:
                    cells.append({"kind": "ckpt", "platform": platform_, "lib": lib, "replicas": n, "policy": policy,
                                  "repeats": args.repeats, "dir": args.dir})
    if args.gpu and not libs:
        notes.append("skipped: no GPU cells can run here")
    print(f"Settings: {args.rounds} round(s) of fresh processes per cell; ops: {args.batches} batches of "
          f"~{args.batch_ms:g} ms per op after >= {harness.WARMUP_CALLS} calls and >= {args.warmup_s:g} s of warm-up, "
          f"sizes {args.sizes}, replicas {args.replicas}; checkpoints: {args.repeats} save+restore pair(s) per "
          f"process, replicas {args.ckpt_replicas}, files in {args.dir}; figures are medians")
    for note in notes:
        print(note)
    print("Note: replica 0 runs on the calling thread, the others on the strategy's persistent threads, and a "
          "rendezvous is one threading.Barrier wait, so at small sizes the run rows measure the hand-off and "
          "synchronization, not arithmetic.")

    started = time.perf_counter()
    load_before = os.getloadavg()
    records: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    failed: list[str] = []
    for rnd in range(args.rounds):
        order = cells if rnd % 2 == 0 else cells[::-1]
        for cell in order:
            t0 = time.perf_counter()
            r = harness.spawn(__file__, {**cell, "round": rnd}, timeout=600,
                              env=cell_env(platform_, cell["lib"], cell["kind"]))
            records.append(r)
            what = " ".join(str(cell[k]) for k in ("lib", "size", "replicas", "policy") if k in cell)
            status = r.get("error") or r.get("skip") or ("ok" if r.get("ok") else "WRONG VALUES")
            print(f"  round {rnd + 1}/{args.rounds} [{time.perf_counter() - t0:5.1f} s] {cell['kind']:4} {what}: {status}",
                  file=sys.stderr, flush=True)
            if "skip" in r:
                if rnd == 0:
                    print(f"skipped: {cell['kind']} {what}: {r['skip']}")
                continue
            if "error" in r:
                failed.append(f"{cell['kind']} {what}: {r['error']}")
                continue
            results.append(r)
    elapsed = time.perf_counter() - started

    run_goal: dict[str, Any] | None = None
    goals: list[dict[str, Any]] = []
    o_rows = ops_rows(results)
    c_rows = ckpt_rows(results)
    print()
    if o_rows:
        print_ops(o_rows)
        print()
        loops = [c["loop_ns"] for c in results if "loop_ns" in c]
        loop = f" (~{harness.summary(loops)['median']:.0f} ns of it the empty loop, not subtracted)" if loops else ""
        print(f"ns per call include the Python loop{loop} and, for JAX/GPU, the wait for every touched device. "
              "'per replica' = per call / replicas; 'threads' = strategy.run of an empty function; "
              "'SUM - NONE' = what the rendezvous (one barrier wait) and the all-reduce add to a step; "
              "spread = (max - min) / median over rounds, the worst op of the row.")
        print()
        run_goal, goals = print_run_floor(o_rows)
        print()
    if c_rows:
        print_ckpt(c_rows)
        print()
        print("Saves fsync every file and the folder; restores are warm-cache (the files were just written) and "
              "end with a device wait. 'MiB written/read' = wchar (save) / rchar (restore) of /proc/self/io during "
              "the step: EXPAND writes the logical file plus one replica file per component, and its restore reads "
              "each component from its own replica file; a NONE restore reads the logical tensor once and copies it "
              "to the other components.")
        print()
    for f in failed:
        print(f"FAILED: {f}")
    if any(not r["ok"] for r in o_rows + c_rows):
        print("FAILED: a cell computed wrong values (marked WRONG)")
    load_after = os.getloadavg()
    print(f"Total {elapsed:.0f} s; load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    if args.json:
        harness.write_json(
            args.json, program="bench_distribute", machine=machine, cells=records, goals=goals, command=command,
            args=vars(args), systems={name: cls.note for name, cls in SYSTEMS.items()}, skipped=skipped, notes=notes,
            ops_rows=o_rows, run_goal=run_goal, ckpt_rows=c_rows, failed=failed, elapsed_s=elapsed,
            loadavg_before=load_before, loadavg_after=load_after,
        )
        print(f"wrote {args.json}")
    return 1 if failed or any(not r["ok"] for r in o_rows + c_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
