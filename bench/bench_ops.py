"""Per-call cost of gpuvars updates (assign, assign_add, scatter_add, scatter_update) against the raw library.

For every backend that is usable here, a 1-D float32 variable of 16 and of 1M (2**20)
elements is updated in a tight loop, once through gpuvars and once with the raw library
call that does the same work:

=========  ===========================  ===========================================
backend    gpuvars                      raw baseline
=========  ===========================  ===========================================
numpy      ``v.assign(src)``            ``np.copyto(dst, src)``
           ``v.assign_add(d)``          ``np.add(dst, d, out=dst)``
           ``v.scatter_add(idx, upd)``  ``np.add.at(dst, idx, upd)``
           ``v.scatter_update(idx, u)`` ``dst[idx] = upd`` (fancy-index assignment)
jax        same calls, then             ``x = jax.device_put(src, dev)`` (src is already
           ``block_until_ready``        on dev: close to a no-op), ``x = x + d``,
                                        ``x = x.at[idx].add(upd)``, ``x = x.at[idx].set(upd)``;
                                        each + block_until_ready. A second baseline,
                                        ``raw_jit``: the same four as ``jax.jit`` functions
                                        (compiled before timing)
cupy       same calls                   ``cupy.copyto``, ``cupy.add(out=)``,
                                        ``cupyx.scatter_add``, ``dst[idx] = upd``; device
                                        sync after each batch
=========  ===========================  ===========================================

scatter_add uses 4 indices at 16 elements and 1024 at 1M. Both sides get the very same
operand objects (numpy arrays for numpy, arrays on the device for JAX/CuPy). JAX runs on
the GPU when JAX sees one, else on its CPU devices (``gv.config.set_cpu_backend("jax")``).

Method: each (system, backend, size) cell runs in a fresh process (this program re-invokes
itself with ``--cell``) and reports one JSON line. In a cell every array is touched before
timing, each op is warmed up (>= 1000 calls and >= 0.2 s, capped at 1 s), then timed in
batches with ``time.perf_counter_ns``: per-call cost = batch time / batch size, the batch
size chosen so one batch lasts ~50 ms; the cell reports the median over the batches. The
whole set of cells is run for ``--rounds`` rounds (gpuvars/raw order alternating) and the
table quotes the median over rounds. The figures include the Python loop around the call
(the cost of an empty loop iteration is measured and printed, not subtracted).

Usage::

    python bench/bench_ops.py                 # ~2 min on a 2-core VM (5 rounds)
    python bench/bench_ops.py --quick         # ~15 s: 1 round, 7 shorter batches
    python bench/bench_ops.py --json out.json # also write every row and the machine info
    python bench/bench_ops.py --backends numpy --sizes 16

The goals checked at the end, all at 16 elements: a gpuvars assign on numpy costs no more
than 2x ``np.copyto`` (first bench issue); a numpy ``scatter_update`` no more than 3x raw
fancy-index assignment, and a JAX ``assign_add`` / ``scatter_update`` no more than 1.5x the
jitted raw JAX equivalent (fixed-costs issue). Speed is reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import harness
import numpy as np
from harness import Skip, System
from harness import fmt_ns as _fmt_ns
from harness import fmt_size as _fmt_size

SIZES = (16, 1 << 20)
OPS = ("assign", "assign_add", "scatter_add", "scatter_update")
BACKENDS = ("numpy", "jax", "cupy")
#: what must be importable for each backend's cells (else the backend is skipped, with the reason)
BACKEND_REQUIRES = {"numpy": (), "jax": ("jax",), "cupy": ("cupy",)}
#: the systems each backend is measured with (only JAX has a compiled raw baseline)
SYSTEMS_OF = {"numpy": ("gpuvars", "raw"), "jax": ("gpuvars", "raw", "raw_jit"), "cupy": ("gpuvars", "raw")}
#: (backend, op, baseline system, target ratio) at 16 elements
GOALS = (
    ("numpy", "assign", "raw", 2.0),
    ("numpy", "scatter_update", "raw", 3.0),
    ("jax", "assign_add", "raw_jit", 1.5),
    ("jax", "scatter_update", "raw_jit", 1.5),
)

#: What the raw side of each row calls, per backend (printed in the table notes / JSON).
RAW_CALLS: dict[str, dict[str, str]] = {
    "numpy": {
        "assign": "np.copyto(dst, src)",
        "assign_add": "np.add(dst, d, out=dst)",
        "scatter_add": "np.add.at(dst, idx, upd)",
        "scatter_update": "dst[idx] = upd",
    },
    "jax": {
        "assign": "x = jax.device_put(src, dev); block",
        "assign_add": "x = x + d; block",
        "scatter_add": "x = x.at[idx].add(upd); block",
        "scatter_update": "x = x.at[idx].set(upd); block",
    },
    "cupy": {
        "assign": "cupy.copyto(dst, src)",
        "assign_add": "cupy.add(dst, d, out=dst)",
        "scatter_add": "cupyx.scatter_add(dst, idx, upd)",
        "scatter_update": "dst[idx] = upd",
    },
}
#: the compiled raw baselines (system raw_jit), JAX only
JIT_CALLS = {
    "assign": "x = jit(lambda x, s: s)(x, src); block",
    "assign_add": "x = jit(lambda x, d: x + d)(x, d); block",
    "scatter_add": "x = jit(lambda x, i, u: x.at[i].add(u))(x, idx, upd); block",
    "scatter_update": "x = jit(lambda x, i, u: x.at[i].set(u))(x, idx, upd); block",
}

#: A batch body: run the op ``n`` times (the loop lives inside, so no extra call per op).
Batch = Callable[[int], None]


class Gpuvars(System):
    name = "gpuvars"
    note = "v.assign(src) / v.assign_add(d) / v.scatter_add(idx, upd) / v.scatter_update(idx, upd)"


class Raw(System):
    name = "raw"
    note = "the backend's own call doing the same work (RAW_CALLS)"


class RawJit(System):
    name = "raw_jit"
    note = "the same four as jax.jit functions, compiled before timing (JIT_CALLS)"
    requires = ("jax",)


SYSTEMS: dict[str, type[System]] = {s.name: s for s in (Gpuvars, Raw, RawJit)}


def _n_indices(size: int) -> int:
    return 4 if size <= 16 else 1024


def _host_operands(size: int) -> dict[str, np.ndarray[Any, Any]]:
    """Touched host operands: initial value, assign source, delta, scatter indices/updates."""
    rng = np.random.default_rng(1234)
    k = _n_indices(size)
    return {
        "init": np.full(size, 0.5, np.float32),
        "src": rng.random(size, dtype=np.float32),
        "d": np.full(size, 1e-3, np.float32),
        "idx": np.sort(rng.choice(size, k, replace=False)).astype(np.int64),
        "upd": np.full(k, 1e-3, np.float32),
    }


# --- per-backend batch bodies ----------------------------------------------------------------


def _numpy_batches(system: str, size: int) -> tuple[dict[str, Batch], dict[str, Any]]:
    h = _host_operands(size)
    src, d, idx, upd = h["src"], h["d"], h["idx"], h["upd"]
    info: dict[str, Any] = {"device": "host"}
    if system == "gpuvars":
        import gpuvars as gv

        v = gv.Variable(h["init"], name="bench", device="/cpu:0")
        info["device"] = f"{v.device} ({v.backend})"
        v.assign(src)  # touch the storage

        def g_assign(n: int) -> None:
            f = v.assign
            for _ in range(n):
                f(src)

        def g_add(n: int) -> None:
            f = v.assign_add
            for _ in range(n):
                f(d)

        def g_scatter(n: int) -> None:
            f = v.scatter_add
            for _ in range(n):
                f(idx, upd)

        def g_scatter_update(n: int) -> None:
            f = v.scatter_update
            for _ in range(n):
                f(idx, upd)

        return {"assign": g_assign, "assign_add": g_add, "scatter_add": g_scatter, "scatter_update": g_scatter_update}, info

    dst = np.array(h["init"])  # a private, touched buffer

    def r_assign(n: int) -> None:
        f = np.copyto
        for _ in range(n):
            f(dst, src)

    def r_add(n: int) -> None:
        f = np.add
        for _ in range(n):
            f(dst, d, out=dst)

    def r_scatter(n: int) -> None:
        f = np.add.at
        for _ in range(n):
            f(dst, idx, upd)

    def r_scatter_update(n: int) -> None:
        for _ in range(n):
            dst[idx] = upd

    return {"assign": r_assign, "assign_add": r_add, "scatter_add": r_scatter, "scatter_update": r_scatter_update}, info


def _jax_batches(system: str, size: int) -> tuple[dict[str, Batch], dict[str, Any]]:
    why = harness.missing(BACKEND_REQUIRES["jax"])
    if why:
        raise Skip(why)
    import jax

    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    dev = gpus[0] if gpus else jax.devices("cpu")[0]
    h = _host_operands(size)
    src, d, idx, upd = (jax.device_put(h[k], dev) for k in ("src", "d", "idx", "upd"))
    for arr in (src, d, idx, upd):
        arr.block_until_ready()
    info: dict[str, Any] = {"device": f"{dev.platform}:{dev.id} ({getattr(dev, 'device_kind', '?')})"}
    if system == "gpuvars":
        import gpuvars as gv

        if gpus:
            gv.config.set_gpu_backend("jax")
            where = "/gpu:0"
        else:
            gv.config.set_cpu_backend("jax")
            where = "/cpu:0"
        v = gv.Variable(h["init"], name="bench", device=where)
        if v.backend != "jax":
            raise Skip(f"gpuvars placed the variable on {v.device} with {v.backend}, not jax")
        info["device"] += f" as gpuvars {v.device}"
        v.assign(src).value().block_until_ready()  # type: ignore[union-attr]

        def g_assign(n: int) -> None:
            f, value = v.assign, v.value
            for _ in range(n):
                f(src)
                value().block_until_ready()

        def g_add(n: int) -> None:
            f, value = v.assign_add, v.value
            for _ in range(n):
                f(d)
                value().block_until_ready()

        def g_scatter(n: int) -> None:
            f, value = v.scatter_add, v.value
            for _ in range(n):
                f(idx, upd)
                value().block_until_ready()

        def g_scatter_update(n: int) -> None:
            f, value = v.scatter_update, v.value
            for _ in range(n):
                f(idx, upd)
                value().block_until_ready()

        return {"assign": g_assign, "assign_add": g_add, "scatter_add": g_scatter, "scatter_update": g_scatter_update}, info

    state = {"x": jax.device_put(h["init"], dev)}
    state["x"].block_until_ready()
    if system == "raw_jit":
        return _jax_jit_batches(state, src, d, idx, upd), info

    def r_assign(n: int) -> None:
        put = jax.device_put
        x = state["x"]
        for _ in range(n):
            x = put(src, dev)
            x.block_until_ready()
        state["x"] = x

    def r_add(n: int) -> None:
        x = state["x"]
        for _ in range(n):
            x = x + d
            x.block_until_ready()
        state["x"] = x

    def r_scatter(n: int) -> None:
        x = state["x"]
        for _ in range(n):
            x = x.at[idx].add(upd)
            x.block_until_ready()
        state["x"] = x

    def r_scatter_update(n: int) -> None:
        x = state["x"]
        for _ in range(n):
            x = x.at[idx].set(upd)
            x.block_until_ready()
        state["x"] = x

    return {"assign": r_assign, "assign_add": r_add, "scatter_add": r_scatter, "scatter_update": r_scatter_update}, info


def _jax_jit_batches(state: dict[str, Any], src: Any, d: Any, idx: Any, upd: Any) -> dict[str, Batch]:
    """The raw_jit baseline: each op one ``jax.jit`` function, compiled here (before timing)."""
    import jax

    fns = {
        "assign": (jax.jit(lambda x, s: s), (src,)),
        "assign_add": (jax.jit(lambda x, dd: x + dd), (d,)),
        "scatter_add": (jax.jit(lambda x, i, u: x.at[i].add(u)), (idx, upd)),
        "scatter_update": (jax.jit(lambda x, i, u: x.at[i].set(u)), (idx, upd)),
    }

    def make(f: Any, operands: tuple[Any, ...]) -> Batch:
        f(state["x"], *operands).block_until_ready()  # compile now

        def body(n: int) -> None:
            x = state["x"]
            for _ in range(n):
                x = f(x, *operands)
                x.block_until_ready()
            state["x"] = x

        return body

    return {op: make(f, operands) for op, (f, operands) in fns.items()}


def _cupy_batches(system: str, size: int) -> tuple[dict[str, Batch], dict[str, Any]]:
    why = harness.missing(BACKEND_REQUIRES["cupy"])
    if why:
        raise Skip(why)
    try:
        import cupy
        import cupyx

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise Skip("cupy sees no GPU")
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
    except Skip:
        raise
    except Exception as exc:
        raise Skip(f"cupy is not usable: {type(exc).__name__}: {exc}") from None
    h = _host_operands(size)
    src, d, idx, upd = (cupy.asarray(h[k]) for k in ("src", "d", "idx", "upd"))
    sync = cupy.cuda.Device().synchronize
    info: dict[str, Any] = {"device": f"gpu:0 ({name})"}
    if system == "gpuvars":
        import gpuvars as gv

        gv.config.set_gpu_backend("cupy")
        v = gv.Variable(h["init"], name="bench", device="/gpu:0")
        if v.backend != "cupy":
            raise Skip(f"gpuvars placed the variable on {v.device} with {v.backend}, not cupy")
        v.assign(src)
        sync()

        def g_assign(n: int) -> None:
            f = v.assign
            for _ in range(n):
                f(src)
            sync()

        def g_add(n: int) -> None:
            f = v.assign_add
            for _ in range(n):
                f(d)
            sync()

        def g_scatter(n: int) -> None:
            f = v.scatter_add
            for _ in range(n):
                f(idx, upd)
            sync()

        def g_scatter_update(n: int) -> None:
            f = v.scatter_update
            for _ in range(n):
                f(idx, upd)
            sync()

        return {"assign": g_assign, "assign_add": g_add, "scatter_add": g_scatter, "scatter_update": g_scatter_update}, info

    dst = cupy.asarray(h["init"])
    sync()

    def r_assign(n: int) -> None:
        f = cupy.copyto
        for _ in range(n):
            f(dst, src)
        sync()

    def r_add(n: int) -> None:
        f = cupy.add
        for _ in range(n):
            f(dst, d, out=dst)
        sync()

    def r_scatter(n: int) -> None:
        f = cupyx.scatter_add
        for _ in range(n):
            f(dst, idx, upd)
        sync()

    def r_scatter_update(n: int) -> None:
        for _ in range(n):
            dst[idx] = upd
        sync()

    return {"assign": r_assign, "assign_add": r_add, "scatter_add": r_scatter, "scatter_update": r_scatter_update}, info


_FACTORIES: dict[str, Callable[[str, int], tuple[dict[str, Batch], dict[str, Any]]]] = {
    "numpy": _numpy_batches,
    "jax": _jax_batches,
    "cupy": _cupy_batches,
}


# --- timing -----------------------------------------------------------------------------------


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Time every op of one (system, backend, size) cell in this process (the child of
    ``harness.spawn``; a backend that cannot run here raises ``Skip``)."""
    system, backend, size, batch_ms = cell["system"], cell["backend"], cell["size"], cell["batch_ms"]
    bodies, info = _FACTORIES[backend](system, size)
    return {"system": system, "backend": backend, "size": size, **info, "loop_ns": harness.loop_ns(batch_ms),
            "ops": {op: harness.time_calls(bodies[op], cell["batches"], batch_ms, cell["warmup_s"]) for op in OPS}}


# --- reporting --------------------------------------------------------------------------------




def machine_info() -> dict[str, Any]:
    """The shared machine record, with the load average at start (this program's figures are
    per-call nanoseconds, which a busy machine moves most)."""
    info = harness.machine_record(os.getcwd())
    info["loadavg_at_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return info


def build_rows(results: list[dict[str, Any]], backends: list[str], sizes: list[int]) -> list[dict[str, Any]]:
    """Median over rounds per (backend, size, op, system), the gpuvars/raw ratio and, for JAX,
    the gpuvars/raw_jit ratio."""
    rows = []
    for backend in backends:
        systems = SYSTEMS_OF[backend]
        for size in sizes:
            cells = {s: [r for r in results if r["backend"] == backend and r["size"] == size and r["system"] == s] for s in systems}
            if any(all("ops" not in c for c in cells[s]) for s in systems):
                continue
            for op in OPS:
                per = {s: [c["ops"][op]["ns"] for c in cells[s] if "ops" in c] for s in systems}
                med = {s: statistics.median(v) for s, v in per.items()}
                g, r = med["gpuvars"], med["raw"]
                spread = max((max(v) - min(v)) / statistics.median(v) for v in per.values())
                device = next(c.get("device") for c in cells["raw"] if "ops" in c)
                jit = med.get("raw_jit")
                rows.append({
                    "backend": backend,
                    "device": device,
                    "size": size,
                    "op": op,
                    "raw_call": RAW_CALLS[backend][op],
                    "jit_call": JIT_CALLS[op] if jit is not None else None,
                    "gpuvars_ns": g,
                    "raw_ns": r,
                    "ratio": g / r,
                    "jit_ns": jit,
                    "ratio_jit": None if jit is None else g / jit,
                    "spread": spread if min(len(v) for v in per.values()) > 1 else None,
                    **{f"{s}_rounds_ns": v for s, v in per.items()},
                })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'backend':<8} {'size':>5}  {'op':<14} {'gpuvars/call':>13} {'raw/call':>11} {'ratio':>6} "
        f"{'jit/call':>10} {'vs jit':>6} {'spread':>7}   raw baseline"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        spread = "-" if r["spread"] is None else f"{100 * r['spread']:.0f}%"
        vs_jit = "-" if r["ratio_jit"] is None else f"{r['ratio_jit']:.2f}x"
        print(
            f"{r['backend']:<8} {_fmt_size(r['size']):>5}  {r['op']:<14} {_fmt_ns(r['gpuvars_ns']):>13} "
            f"{_fmt_ns(r['raw_ns']):>11} {r['ratio']:>5.2f}x {_fmt_ns(r['jit_ns']):>10} {vs_jit:>6} {spread:>7}   "
            f"{r['raw_call']}"
        )
    if any(r["jit_call"] for r in rows):
        print("\njit/call: the raw op as a jax.jit function (compiled before timing): "
              + "; ".join(f"{op}: {call}" for op, call in JIT_CALLS.items()))


def check_goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Print each 16-element goal (measured or not) and return the measured ones for the JSON
    (``harness.goal``)."""
    out = []
    for backend, op, base, target in GOALS:
        row = next((r for r in rows if r["backend"] == backend and r["size"] == 16 and r["op"] == op), None)
        name = "np.copyto" if op == "assign" else ("raw fancy-index assignment" if backend == "numpy" else "jitted raw JAX")
        ratio = None if row is None else row["ratio" if base == "raw" else "ratio_jit"]
        if ratio is None:
            print(f"goal: 16-element {backend} {op} vs {name}: not measured (needs --backends {backend} and size 16)")
            continue
        goal = harness.goal(f"16-element {backend} {op} / {name}", ratio, target, "x")
        print(f"goal: 16-element {backend} {op} costs {ratio:.2f}x {name} "
              f"(target <= {target:g}x): {'MET' if goal['met'] else 'NOT MET'}")
        out.append(goal)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 7 batches of 20 ms, 0.1 s warm-up")
    parser.add_argument("--json", metavar="PATH", help="also write every row and the machine info here")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma list of numpy,jax,cupy")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma list of element counts")
    parser.add_argument("--rounds", type=int, help="fresh-process rounds per cell (default 5; quick 1)")
    parser.add_argument("--batches", type=int, help="timed batches per op (default 9; quick 7)")
    parser.add_argument("--batch-ms", type=float, help="target batch duration (default 50; quick 20)")
    parser.add_argument("--warmup-s", type=float, help="minimum warm-up per op (default 0.2; quick 0.1)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if harness.cell_main(run_cell, argv):
        return 0
    args = parser.parse_args(argv)
    defaults = (1, 7, 20.0, 0.1) if args.quick else (5, 9, 50.0, 0.2)
    for name, value in zip(("rounds", "batches", "batch_ms", "warmup_s"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)

    backends = [b for b in args.backends.split(",") if b]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    for b in backends:
        if b not in BACKENDS:
            parser.error(f"unknown backend {b!r}; choose from {BACKENDS}")
    machine = machine_info()
    print("machine: " + harness.machine_line(machine))
    print(
        f"settings: {args.rounds} round(s) of fresh processes per cell, {args.batches} batches of "
        f"~{args.batch_ms:g} ms per op, warm-up >= {args.warmup_s:g} s; figures are medians"
    )
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for backend in backends:
        why = harness.missing(BACKEND_REQUIRES[backend])
        if why:
            skipped[backend] = why
    timing = {"batches": args.batches, "batch_ms": args.batch_ms, "warmup_s": args.warmup_s}
    for rnd in range(args.rounds):
        for backend in backends:
            if backend in skipped:
                continue
            for size in sizes:
                for system in harness.rotated(SYSTEMS_OF[backend], rnd):
                    cell = harness.spawn(__file__, {"system": system, "backend": backend, "size": size, **timing},
                                         timeout=300, env=harness.child_env(pin_malloc=False))
                    if "skip" in cell or "error" in cell:
                        skipped[backend] = cell.get("skip") or f"error: {cell['error']}"
                        break
                    results.append(cell)
                if backend in skipped:
                    break
    failed = any(why.startswith("error: ") for why in skipped.values())
    for backend, why in skipped.items():
        print(f"{'FAILED' if why.startswith('error: ') else 'skip'} {backend}: {why}")
    rows = build_rows(results, [b for b in backends if b not in skipped], sizes)
    devices = sorted({f"{r['backend']} on {r['device']}" for r in rows})
    if devices:
        print("devices: " + "; ".join(devices))
    print()
    print_table(rows)
    loops = [c["loop_ns"] for c in results if "loop_ns" in c]
    print(
        "\nspread: (max - min) / median of the per-round figures, the worse of the two sides; "
        "a large one means the row is noise-dominated"
    )
    if loops:
        print(f"each figure includes ~{statistics.median(loops):.0f} ns of Python loop per call, not subtracted")
    goal_info = check_goals(rows)
    elapsed = time.perf_counter() - started
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    start_load = machine.get("loadavg_at_start") or [float("nan")]
    load_text = f"; 1-min load average {start_load[0]:.2f} at start, {load[0]:.2f} at end" if load else ""
    print(f"total {elapsed:.0f} s{load_text}")
    if args.json:
        harness.write_json(
            args.json, program="bench_ops", machine=machine, cells=results, goals=goal_info,
            command=" ".join(["python", "bench/bench_ops.py", *argv]),
            settings={k: getattr(args, k) for k in ("quick", "rounds", "batches", "batch_ms", "warmup_s")},
            systems={name: cls.note for name, cls in SYSTEMS.items()}, skipped=skipped, rows=rows,
            elapsed_s=elapsed, loadavg_at_end=list(load) if load else None,
        )
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
