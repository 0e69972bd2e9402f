"""Multi-process runs (JAX's distributed runtime, gloo on CPU) against one process doing the
same work: a replica-context SUM all-reduce, and a checkpoint save that commits across processes.

Part ``allreduce``. ``strategy.run(step, args=(x,))`` where ``step`` is
``gv.get_replica_context().all_reduce("SUM", x)`` and ``x`` is a 1-D float32 of ``--elements``
(default 1M = 2**20, 4 MiB) on the replica's device, numpy variables' host memory:

=================  ==============================================================================
row                what one timed call is
=================  ==============================================================================
multi-process      N processes under ``python -m gpuvars launch -n N``, one replica each,
                   ``gv.MultiWorkerMirroredStrategy(["/cpu:0"])``: the local sum, one
                   ``process_allgather`` of the bytes across processes, the sum in process order
in-process         one process, ``gv.MirroredStrategy`` over N logical CPU devices
                   (``gv.config.set_logical_devices("cpu", N)``): N replica threads meet at a
                   barrier and the N values are summed in memory
raw JAX floor      in the same N processes, ``multihost_utils.process_allgather(x)`` of the same
                   4 MiB host array, nothing else (what the multi-process all-reduce cannot beat)
=================  ==============================================================================

Each process times every call (``harness.time_steps``: ``--warmup`` untimed calls, a barrier,
then ``--samples`` timed calls, the same fixed counts on every process, since a collective needs
all of them);
a cell's figure is the median over calls of the slowest process's median, with min/max over
calls. The result of every call is checked once (untimed): sum of ``x_k = k + 1``.

Part ``save``. 16 mirrored float32 variables totalling ``--save-mib`` (default 256 MiB; quick
64 MiB), ``gv.Saver(variables, max_to_keep=None).save(prefix, options=gv.SaveOptions(
experimental_variable_policy=P))`` with P = NONE (the default: process 0 writes the logical
tensors, the others write nothing) and EXPAND_DISTRIBUTED_VARIABLES (also one replica file per
component, each process writing its own): 2 processes under the launcher with
``MultiWorkerMirroredStrategy`` (one replica each; the save commits once, on process 0, after
both processes' files are fsynced) against one process with ``MirroredStrategy`` over 2 logical
CPU devices, the same variables and policy, so the same bytes. A timed save starts after a
barrier; its time is the slowest process's; one untimed warm-up save precedes ``--repeats``
timed ones (``harness.time_steps``). MiB/s = logical MiB (2**20 bytes) per second; the files of
every save are deleted (untimed) before the next.

Method (the house rules of bench/, ``bench/harness.py``): every cell is a fresh launch
(multi-process: ``python -m gpuvars launch -n N`` of this program with ``--worker``, each process
writing its timings to a JSON file the driver reads) or a fresh process (in-process:
``harness.spawn`` / ``harness.cell_main``, one tagged result line). The children run with
glibc's adaptive mmap threshold (``harness.child_env(pin_malloc=False)``: the pin inflates these
steps' times). Before timing, each process touches and frees an anonymous buffer and (saves)
writes and unlinks a scratch file of its share of the bytes + 64 MiB, so the pages a timed step
takes are host-backed. Cells rotate order between rounds. The systems are ``harness.System``
classes; without jax the program prints why and exits 0 (multi-process runs need JAX). The
ratios (multi-process / in-process, all-reduce and saves) go into the JSON as goals in
``harness.goal`` shape, reported, not held to a limit (issue 10 names none).

Usage::

    python bench/bench_multiprocess.py --quick         # ~30 s on a 2-core VM
    python bench/bench_multiprocess.py                 # ~3 min: 3 rounds, 256 MiB saves
    python bench/bench_multiprocess.py --parts allreduce --processes 2
    python bench/bench_multiprocess.py --json out.json # also every process's timings

Speed is reported, never asserted; a wrong result is marked WRONG and the exit status is 1.
On a 2-core machine 4 processes (or 4 replica threads) share 2 cores: those rows measure
oversubscription as well.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import harness
import numpy as np
from harness import MiB, System, fmt_ns, warm_free_pages

ELEMENTS = 1 << 20
PROCESSES = (2, 4)
SAVE_PROCESSES = 2
N_VARS = 16
WARM_MARGIN = 64 * MiB
POLICIES = {"NONE": "none", "EXPAND": "expand_distributed_variables"}


class MultiProcess(System):
    name = "mp"
    note = ("N processes under python -m gpuvars launch, gv.MultiWorkerMirroredStrategy(['/cpu:0']), "
            "one replica each")
    requires = ("jax",)


class InProcess(System):
    name = "inproc"
    note = "one process, gv.MirroredStrategy over N logical CPU devices"


class RawJax(System):
    name = "raw"
    note = "in the same N processes, jax.experimental.multihost_utils.process_allgather of the bytes"
    requires = ("jax",)


SYSTEMS: dict[str, type[System]] = {s.name: s for s in (MultiProcess, InProcess, RawJax)}


# --- the worker (one process of a cell) ------------------------------------------------------------


def _worker(cell: dict[str, Any]) -> None:
    """One process of a multi-process launch: its record goes to ``out/result_<process>.json``."""
    import gpuvars as gv

    out = _work(cell)
    with open(os.path.join(cell["out"], f"result_{out['process']}.json"), "w", encoding="utf-8") as fh:
        json.dump(out, fh)
    gv.distributed.barrier("done", 120)


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """The in-process cell, in the child of ``harness.spawn``."""
    return {"processes": [_work(cell)]}


def _work(cell: dict[str, Any]) -> dict[str, Any]:
    import gpuvars as gv

    mp = cell["mode"] == "mp"
    n = cell["n"]
    strategy: Any
    if mp:
        gv.distributed.initialize(timeout=60)
        me = gv.distributed.process_id()
        assert gv.distributed.num_processes() == n
        strategy = gv.MultiWorkerMirroredStrategy(["/cpu:0"])
        devices = ["/cpu:0"]
    else:
        me = 0
        gv.config.set_logical_devices("cpu", n)
        devices = [f"/cpu:{k}" for k in range(n)]
        strategy = gv.MirroredStrategy(devices)
    gv.config.set_soft_device_placement(False)

    def barrier(name: str) -> None:
        if mp:
            gv.distributed.barrier(name, 120)

    out: dict[str, Any] = {"process": me, **{k: cell[k] for k in ("part", "mode", "n")}}
    with gv.Registry():
        if cell["part"] == "allreduce":
            out.update(_allreduce(gv, cell, strategy, devices, me, mp, barrier))
        else:
            out.update(_save(gv, cell, strategy, me, mp, barrier))
    return out


def _allreduce(gv: Any, cell: dict[str, Any], strategy: Any, devices: list[str], me: int, mp: bool,
               barrier: Any) -> dict[str, Any]:
    size, n = cell["elements"], cell["n"]
    first = me * len(devices)  # the replica id of this process's first replica
    xs = gv.PerReplica([gv.copy_to(np.full(size, first + k + 1, np.float32), d) for k, d in enumerate(devices)])

    def step(x: Any) -> Any:
        return gv.get_replica_context().all_reduce("SUM", x)

    run = strategy.run
    got = run(step, args=(xs,))  # checked once, untimed
    values = list(got.values) if isinstance(got, gv.PerReplica) else [got]
    want = np.full(size, n * (n + 1) / 2, np.float32)
    ok = len(values) == len(devices) and all(np.array_equal(np.asarray(v), want) for v in values)
    warm_free_pages(8 * n * size * 4 + WARM_MARGIN)
    gc.collect()

    def timed(fn: Any) -> list[float]:
        """ns of each of ``samples`` calls, after ``warmup`` untimed ones and a barrier."""
        harness.time_steps(fn, 0, warmup=cell["warmup"])
        barrier("timed")
        return [t * 1e9 for t in harness.time_steps(fn, cell["samples"], warmup=0)]

    result: dict[str, Any] = {"ok": bool(ok), "ns": timed(lambda: run(step, args=(xs,)))}
    if mp:
        from jax.experimental import multihost_utils

        host = np.full(size, me + 1, np.float32)
        gathered = np.asarray(multihost_utils.process_allgather(host))
        result["ok"] = bool(ok and np.array_equal(gathered.sum(axis=0), want))
        result["raw_ns"] = timed(lambda: multihost_utils.process_allgather(host))
    return result


def _save(gv: Any, cell: dict[str, Any], strategy: Any, me: int, mp: bool, barrier: Any) -> dict[str, Any]:
    folder, n = cell["dir"], cell["n"]
    per_var = cell["save_bytes"] // N_VARS
    shape = (per_var // 4 // 1024, 1024)
    rng = np.random.default_rng(0)
    data = [rng.random(shape, dtype=np.float32) for _ in range(N_VARS)]
    logical = sum(a.nbytes for a in data)
    with strategy.scope():
        variables = [gv.Variable(a, name=f"layer{i:02d}") for i, a in enumerate(data)]
    opts = gv.SaveOptions(experimental_variable_policy=POLICIES[cell["policy"]])
    expand = cell["policy"] == "EXPAND"
    # this process's share of the bytes written: the logical tensors (process 0) and the replica
    # files of its own components (EXPAND)
    share = (logical if me == 0 else 0) + (logical * (n if not mp else 1) if expand else 0)
    scratch = os.path.join(folder, f".warm-{me}")
    os.makedirs(scratch, exist_ok=True)
    prefixes: list[str] = []
    state: dict[str, Any] = {"i": -1, "file_bytes": 0, "ok": True}
    last = harness.WARMUP_STEPS + cell["repeats"] - 1

    def before() -> None:
        state["i"] += 1
        state["saver"] = gv.Saver(variables, max_to_keep=None)
        warm_free_pages(share + WARM_MARGIN, scratch)
        gc.collect()
        barrier("save")

    def step() -> None:
        state["prefix"] = state["saver"].save(os.path.join(folder, f"model-{state['i']}"), options=opts)

    def after() -> None:
        prefix = state["prefix"]
        prefixes.append(str(prefix))
        barrier("saved")
        if me == 0:
            state["file_bytes"] = sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())
            if state["i"] == last:
                bad = gv.CheckpointReader(prefix).verify()
                state["ok"] &= not bad
                state["ok"] &= state["file_bytes"] >= logical * (1 + n if expand else 1)
            for e in os.scandir(folder):  # untimed: the next save starts from an empty folder
                if e.is_file():
                    os.unlink(e.path)
        barrier("cleaned")

    times = harness.time_steps(step, cell["repeats"], before=before, after=after)
    shutil.rmtree(scratch, ignore_errors=True)
    ok, file_bytes = state["ok"], state["file_bytes"]
    return {"ok": bool(ok), "policy": cell["policy"], "save_s": times, "prefixes": prefixes,
            "logical_bytes": logical, "file_bytes": file_bytes, "share_bytes": share}


# --- the driver ------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    """``harness.child_env(pin_malloc=False)``, JAX on the CPU, one JAX CPU device per process,
    ``bench/`` importable."""
    env = harness.child_env({"JAX_PLATFORMS": "cpu"}, pin_malloc=False)
    env.pop("XLA_FLAGS", None)  # one JAX CPU device per process
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


def run_one(cell: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``cell``: a fresh launch of n processes (each writes its JSON, read here) or one
    fresh process (``harness.spawn``); ``{"processes": [...]}``, or ``{"error": ...}``."""
    out = tempfile.mkdtemp(prefix="bench-mp-out-")
    folder = None
    try:
        cell = {**cell, "out": out}
        if cell["part"] == "save":
            folder = tempfile.mkdtemp(prefix="cell-", dir=cell["dir"])
            cell["dir"] = folder
        if cell["mode"] != "mp":
            r = harness.spawn(__file__, cell, timeout=timeout + 30, env=_env())
            if "error" in r:
                return {"error": r["error"], "tail": r.get("stderr_tail", [])}
            return {"processes": r["processes"]}
        worker = [os.path.abspath(__file__), "--worker", json.dumps(cell)]
        cmd = [sys.executable, "-m", "gpuvars", "launch", "-n", str(cell["n"]), "--timeout", str(timeout), *worker]
        count = cell["n"]
        try:
            done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=_env(), timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout + 30:g} s"}
        results = []
        for k in range(count):
            path = os.path.join(out, f"result_{k}.json")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as fh:
                    results.append(json.load(fh))
        if done.returncode != 0 or len(results) != count:
            tail = (done.stdout + done.stderr).strip().splitlines()
            return {"error": f"exit status {done.returncode}: {tail[-1] if tail else ''}", "tail": tail[-20:]}
        return {"processes": results}
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


def _stats(per_process: list[list[float]]) -> dict[str, float]:
    """The slowest process's median, and min/max over every sample (``harness.summary``)."""
    each = [harness.summary(s) for s in per_process]
    return {"median": max(e["median"] for e in each), "min": min(e["min"] for e in each),
            "max": max(e["max"] for e in each)}


def allreduce_rows(results: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for cell, r in results:
        if cell["part"] == "allreduce":
            groups.setdefault((cell["mode"], cell["n"]), []).append(r)
    rows: list[dict[str, Any]] = []
    for (mode, n), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0] != "mp")):
        keys = ["ns", "raw_ns"] if mode == "mp" else ["ns"]
        for key in keys:
            per_round = [_stats([p[key] for p in r["processes"]]) for r in rs]
            rows.append({"mode": mode if key == "ns" else "raw", "n": n, "rounds": len(rs),
                         "ok": all(p["ok"] for r in rs for p in r["processes"]),
                         "median_ns": harness.summary([s["median"] for s in per_round])["median"],
                         "min_ns": min(s["min"] for s in per_round), "max_ns": max(s["max"] for s in per_round)})
    by = {(r["mode"], r["n"]): r for r in rows}
    for r in rows:
        base = by.get(("inproc", r["n"]))
        r["x_inproc"] = r["median_ns"] / base["median_ns"] if base else None
    return rows


def save_rows(results: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for cell, r in results:
        if cell["part"] == "save":
            groups.setdefault((cell["policy"], cell["mode"]), []).append(r)
    rows = []
    for (policy, mode), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "NONE", kv[0][1] != "mp")):
        # one figure per save: the slowest process's time (every process returns after the commit)
        times = [max(ts) for r in rs for ts in zip(*(p["save_s"] for p in r["processes"]))]
        p0 = [p for r in rs for p in r["processes"] if p["process"] == 0]
        logical = p0[0]["logical_bytes"]
        t = harness.summary(times)["median"]
        rows.append({"policy": policy, "mode": mode, "n": rs[0]["processes"][0]["n"], "saves": len(times),
                     "ok": all(p["ok"] for r in rs for p in r["processes"]) and all(
                         len({p["prefixes"][i] for p in r["processes"]}) == 1 for r in rs for i in
                         range(len(r["processes"][0]["prefixes"]))),
                     "median_s": t, "min_s": min(times), "max_s": max(times), "logical_bytes": logical,
                     "file_bytes": p0[0]["file_bytes"], "mb_s": logical / MiB / t, "file_mb_s": p0[0]["file_bytes"] / MiB / t,
                     "times": times})
    by = {(r["policy"], r["mode"]): r for r in rows}
    for r in rows:
        base = by.get((r["policy"], "inproc"))
        r["x_inproc"] = r["median_s"] / base["median_s"] if base else None
    return rows


def _wrong(r: dict[str, Any]) -> str:
    return "" if r["ok"] else " WRONG"


LABELS = {"mp": "multi-process (MultiWorkerMirrored, 1 replica/process)",
          "inproc": "in-process (MirroredStrategy, logical CPUs)",
          "raw": "raw JAX floor (process_allgather)"}


def print_allreduce(rows: list[dict[str, Any]], elements: int) -> None:
    print(f"(a) replica-context all_reduce(\"SUM\", x) inside strategy.run, x = {elements:,} float32 "
          f"({elements * 4 / MiB:g} MiB) per replica, numpy")
    print()
    print("| replicas | system | median per call | min-max | x in-process | rounds |")
    print("|---:|---|---:|---|---:|---:|")
    for r in rows:
        x = "-" if r["mode"] == "inproc" or r["x_inproc"] is None else f"{r['x_inproc']:.2f}x"
        print(f"| {r['n']} | {LABELS[r['mode']]}{_wrong(r)} | {fmt_ns(r['median_ns'])} | "
              f"{fmt_ns(r['min_ns'])}-{fmt_ns(r['max_ns'])} | {x} | {r['rounds']} |")
    print()
    by = {(r["mode"], r["n"]): r for r in rows}
    for n in sorted({r["n"] for r in rows}):
        mp, ip, raw = by.get(("mp", n)), by.get(("inproc", n)), by.get(("raw", n))
        if mp and ip:
            extra = (f"; vs the raw JAX floor (process_allgather {fmt_ns(raw['median_ns'])}): "
                     f"{mp['median_ns'] / raw['median_ns']:.2f}x") if raw else ""
            print(f"ratio all_reduce SUM at {n} replicas: multi-process {fmt_ns(mp['median_ns'])} / in-process "
                  f"{fmt_ns(ip['median_ns'])} = {mp['median_ns'] / ip['median_ns']:.2f}x{extra}")


def print_save(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    mib = rows[0]["logical_bytes"] / MiB
    print(f"(b) Saver.save of {N_VARS} mirrored float32 variables, {mib:g} MiB logical, 2 replicas "
          "(fsyncs every file and the folder; across processes it commits once)")
    print()
    print("| policy | system | median s | MiB/s (logical) | files MiB | MiB/s (files) | x in-process | min-max s | saves |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        x = "-" if r["mode"] == "inproc" or r["x_inproc"] is None else f"{r['x_inproc']:.2f}x"
        system = "2 processes (MultiWorkerMirrored)" if r["mode"] == "mp" else "1 process (MirroredStrategy, 2 logical CPUs)"
        print(f"| {r['policy']}{_wrong(r)} | {system} | {r['median_s']:.3f} | {r['mb_s']:.0f} | "
              f"{r['file_bytes'] / MiB:.0f} | {r['file_mb_s']:.0f} | {x} | {r['min_s']:.3f}-{r['max_s']:.3f} | "
              f"{r['saves']} |")
    print()
    by = {(r["policy"], r["mode"]): r for r in rows}
    for policy in POLICIES:
        mp, ip = by.get((policy, "mp")), by.get((policy, "inproc"))
        if mp and ip:
            print(f"ratio save {policy}: 2 processes {mp['mb_s']:.0f} MiB/s vs 1 process {ip['mb_s']:.0f} MiB/s "
                  f"= {mp['mb_s'] / ip['mb_s']:.2f}x the throughput (time {mp['x_inproc']:.2f}x)")


def check_goals(a_rows: list[dict[str, Any]], s_rows: list[dict[str, Any]], elements: int) -> list[dict[str, Any]]:
    """The multi-process / in-process time ratios as goals (``harness.goal``, no limit: reported),
    each printed as a goal line."""
    goals = []
    by = {(r["mode"], r["n"]): r for r in a_rows}
    for (mode, n), r in sorted(by.items()):
        base = by.get(("inproc", n))
        if mode == "mp" and base:
            goals.append(harness.goal(f"all_reduce SUM {harness.fmt_size(elements)} float32, {n} processes / {n} devices "
                                      "in one process", r["median_ns"] / base["median_ns"], None, "x"))
    saves = {(r["policy"], r["mode"]): r for r in s_rows}
    for policy in POLICIES:
        mp, one = saves.get((policy, "mp")), saves.get((policy, "inproc"))
        if mp and one:
            goals.append(harness.goal(f"save {policy}: time across {mp['n']} processes / 1 process, same bytes",
                                      mp["median_s"] / one["median_s"], None, "x"))
    for g in goals:
        print(f"goal: {g['goal']}: {g['measured']:.2f}{g['unit']} (reported, no limit)")
    if goals:
        print()
    return goals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, 15 all-reduces, 64 MiB saves x 2 (+1 untimed)")
    ap.add_argument("--json", metavar="PATH", help="also write every process's timings and the machine here")
    ap.add_argument("--parts", default="allreduce,save", help="comma list of allreduce, save")
    ap.add_argument("--processes", default=",".join(map(str, PROCESSES)), help="allreduce: comma list of process counts")
    ap.add_argument("--elements", type=int, default=ELEMENTS, help="allreduce: float32 elements per replica")
    ap.add_argument("--rounds", type=int, help="fresh launches per cell (default 3; quick 1)")
    ap.add_argument("--samples", type=int, help="allreduce: timed calls per process (default 40; quick 15)")
    ap.add_argument("--warmup", type=int, help="allreduce: untimed calls first (default 5; quick 3)")
    ap.add_argument("--save-mib", type=int, help="save: MiB of variables (default 256; quick 64)")
    ap.add_argument("--repeats", type=int, help="save: timed saves per launch after 1 untimed (default 3; quick 2)")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "gpuvars-bench-multiprocess"),
                    help="save: folder on local disk for the checkpoints (a sub-folder per cell, removed after)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per launch before it is killed")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    if harness.cell_main(run_cell, argv):
        return 0
    args = ap.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    defaults = (1, 15, 3, 64, 2) if args.quick else (3, 40, 5, 256, 3)
    for name, value in zip(("rounds", "samples", "warmup", "save_mib", "repeats"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    parts = [p for p in args.parts.split(",") if p]
    procs = [int(p) for p in args.processes.split(",") if p]
    for p in parts:
        if p not in ("allreduce", "save"):
            ap.error(f"unknown part {p!r}; choose from allreduce, save")
    if min([args.rounds, args.samples, args.repeats, args.elements, args.save_mib] + procs) < 1 or args.warmup < 0:
        ap.error("counts must be >= 1")

    os.makedirs(args.dir, exist_ok=True)
    machine = harness.machine_record(args.dir)
    print(f"Machine: {harness.machine_line(machine)}")
    print(f"Command: python bench/bench_multiprocess.py {' '.join(argv)}".rstrip())
    _, skipped = harness.available(SYSTEMS.values())
    if MultiProcess.name in skipped:
        print(f"skipped: {skipped[MultiProcess.name]}: multi-process runs need JAX's distributed runtime "
              "(pip install 'gpuvars[jax]'); nothing was measured")
        if args.json:
            harness.write_json(args.json, program="bench_multiprocess", machine=machine, cells=[], goals=[],
                               args=vars(args), skipped=skipped, allreduce_rows=[], save_rows=[], failed=[])
            print(f"wrote {args.json}")
        return 0
    print(f"Settings: {args.rounds} round(s) of fresh launches per cell; all-reduce: {args.warmup} untimed + "
          f"{args.samples} timed calls per process; saves: {args.save_mib} MiB in {N_VARS} variables, "
          f"1 untimed + {args.repeats} timed saves per launch, files in {args.dir}; figures are medians")

    cells: list[dict[str, Any]] = []
    if "allreduce" in parts:
        for n in procs:
            for mode in ("mp", "inproc"):
                cells.append({"part": "allreduce", "mode": mode, "n": n, "elements": args.elements,
                              "samples": args.samples, "warmup": args.warmup})
    if "save" in parts:
        for policy in POLICIES:
            for mode in ("mp", "inproc"):
                cells.append({"part": "save", "mode": mode, "n": SAVE_PROCESSES, "policy": policy,
                              "save_bytes": args.save_mib * MiB, "repeats": args.repeats, "dir": args.dir})

    started = time.perf_counter()
    load_before = os.getloadavg()
    results: list[tuple[dict[str, Any], dict[str, Any]]] = []
    failed: list[str] = []
    for rnd in range(args.rounds):
        for cell in (cells if rnd % 2 == 0 else cells[::-1]):
            t0 = time.perf_counter()
            r = run_one(cell, args.timeout)
            what = " ".join(str(cell[k]) for k in ("part", "mode", "n", "policy") if k in cell)
            status = "error: " + r["error"] if "error" in r else (
                "ok" if all(p["ok"] for p in r["processes"]) else "WRONG VALUES")
            print(f"  round {rnd + 1}/{args.rounds} [{time.perf_counter() - t0:5.1f} s] {what}: {status}",
                  file=sys.stderr, flush=True)
            if "error" in r:
                failed.append(f"{what}: {r['error']}")
                for line in r.get("tail", []):
                    print(f"    {line}", file=sys.stderr)
                continue
            results.append((cell, r))
    elapsed = time.perf_counter() - started

    a_rows = allreduce_rows(results)
    s_rows = save_rows(results)
    print()
    if a_rows:
        print_allreduce(a_rows, args.elements)
        print()
        print("per call = strategy.run of the step, the slowest process's median over its calls (median over rounds); "
              "min-max over every call of every process. The multi-process all-reduce is: the local sum, "
              "process_allgather of the bytes (gloo over loopback TCP), the sum in process order, a copy to the "
              "replica's device; the in-process one: N replica threads meet at one barrier and sum in memory.")
        print()
    if s_rows:
        print_save(s_rows)
        print()
        print("A save's time is the slowest process's, from a barrier to the return of save() (the commit "
              "included); MiB/s (logical) = MiB of variables / s, MiB/s (files) = MiB of checkpoint files / s. "
              "NONE: process 0 writes everything, so two processes add only the commit rounds; EXPAND: "
              "each process writes its own replica file.")
        print()
    for f in failed:
        print(f"FAILED: {f}")
    wrong = any(not r["ok"] for r in a_rows + s_rows)
    if wrong:
        print("FAILED: a cell computed wrong values (marked WRONG)")
    goals = check_goals(a_rows, s_rows, args.elements)
    load_after = os.getloadavg()
    print(f"Total {elapsed:.0f} s; load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    if args.json:
        harness.write_json(args.json, program="bench_multiprocess", machine=machine,
                           cells=[{"cell": c, **r} for c, r in results], goals=goals, args=vars(args),
                           systems={n: c.note for n, c in SYSTEMS.items()}, allreduce_rows=a_rows, save_rows=s_rows,
                           failed=failed, elapsed_s=elapsed, loadavg_before=load_before, loadavg_after=load_after)
        print(f"wrote {args.json}")
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
