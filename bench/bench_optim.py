"""One optimizer step, gpuvars against what users would pick instead, measured in one run.

Cases (float32, Adam; ``--quick``: the smaller sizes in brackets):
  large: 200 variables of 250k elements, 50M in all     (quick: 50 x 100k)
  mid:   200 variables of 25k                            (quick: 50 x 10k, full mode only)
  low:   200 variables of 2,500                          (quick: 50 x 1k)
  small: 2,000 variables of 1,000 elements               (quick: 500 x 1k)
large, mid and low have the same variable count, 10x the parameters apart (the figure's line);
small has many variables. ``--quick`` leaves mid out, and torch-foreach unless ``--systems``
names it (each cell is a fresh process: ~2-4 s of imports here, most of a quick run).

Systems (``harness.System``; one whose library is missing is skipped with the reason):
  gpuvars-numpy   gv.optim.Adam on numpy variables (blocked in-place ufuncs)
  gpuvars-jax     gv.optim.Adam on JAX CPU variables (one jit per device)
  torch-fused     torch.optim.Adam(fused=True)       (if torch is installed)
  torch-foreach   torch.optim.Adam(foreach=True)
  optax-jit       optax.adam inside one jax.jit over the parameter list, donated

Method (``bench/harness.py``): every (system, case) cell runs in a fresh process
(``harness.spawn`` / ``harness.cell_main``), the same gradients every step; one untimed warm-up
step (compiles, touches every buffer; steps are steady from the second one), then ``--steps``
timed steps (``harness.time_steps``), each waiting for the device. The children run with
glibc's adaptive mmap threshold (``harness.child_env(pin_malloc=False)``: the pin turns every
step's temporaries into fresh page faults). Figures are medians of the step times, medians
again over ``--rounds`` fresh processes (systems rotating). Goals (issue 9): large <= 1.5x
torch fused; small <= 15 us of host time per variable (gpuvars-numpy).

    python bench/bench_optim.py [--quick] [--rounds 3] [--steps 10] [--json out.json]
    python bench/bench_optim.py --gpu [--quick]   # on a GPU machine (bench/gpu.sh)

GPU mode: Adam over 200 variables of 2.5M float32 (500M elements, --quick 20 variables: 50M)
with gpuvars-cupy and gpuvars-jaxgpu on /gpu:0, beside torch fused on cuda when installed; the
achieved bandwidth counts 7 passes of 4 bytes per element (p, m, v read and written, g read)
against a device-to-device copy measured in the same process (goal: >= 80%, reported in the
JSON as copy bandwidth / step bandwidth <= 1.25).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, ClassVar

import harness
from harness import Skip, System

CASES = {"large": (200, 250_000), "mid": (200, 25_000), "low": (200, 2_500), "small": (2000, 1000)}
QUICK = {"large": (50, 100_000), "low": (50, 1000), "small": (500, 1000)}
GPU_SHAPE, GPU_QUICK_SHAPE = (200, 2_500_000), (20, 2_500_000)
GOAL_LARGE_RATIO = 1.5
GOAL_SMALL_US = 15.0
GOAL_GPU_FRACTION = 0.8

#: A step (or a copy) that waits for its device before it returns.
Step = Callable[[], None]


# --- systems ----------------------------------------------------------------------------------


class CpuSystem(System):
    """An Adam step over ``params`` with fixed ``grads`` (host arrays), built in the cell's child."""

    def setup(self, params: list[Any], grads: list[Any]) -> Step:
        raise NotImplementedError


class GpuvarsNumpy(CpuSystem):
    name = "gpuvars-numpy"
    note = "gv.optim.Adam(1e-3).apply_gradients on numpy variables"

    def setup(self, params: list[Any], grads: list[Any]) -> Step:
        import gpuvars as gv

        vs = [gv.Variable(p, name=f"v{i}") for i, p in enumerate(params)]
        opt = gv.optim.Adam(1e-3)
        pairs = list(zip(grads, vs))

        def step() -> None:
            opt.apply_gradients(pairs)

        return step


class GpuvarsJax(CpuSystem):
    name = "gpuvars-jax"
    note = "gv.optim.Adam(1e-3).apply_gradients on JAX CPU variables, gradients on the device; block_until_ready"
    requires = ("jax",)

    def setup(self, params: list[Any], grads: list[Any]) -> Step:
        import jax

        import gpuvars as gv

        gv.config.set_cpu_backend("jax")
        vs = [gv.Variable(p, name=f"v{i}") for i, p in enumerate(params)]
        opt = gv.optim.Adam(1e-3)
        pairs = list(zip([jax.device_put(g) for g in grads], vs))  # already on the device, as jax.grad gives them

        def step() -> None:
            opt.apply_gradients(pairs)
            vs[-1].value().block_until_ready()

        return step


class TorchFused(CpuSystem):
    name = "torch-fused"
    note = "torch.optim.Adam(fused=True).step(), all cores"
    requires = ("torch",)
    kw: ClassVar[dict[str, bool]] = {"fused": True}

    def setup(self, params: list[Any], grads: list[Any]) -> Step:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        ps = [torch.tensor(p, requires_grad=True) for p in params]
        for p, g in zip(ps, grads):
            p.grad = torch.tensor(g)
        return torch.optim.Adam(ps, lr=1e-3, **self.kw).step


class TorchForeach(TorchFused):
    name = "torch-foreach"
    note = "torch.optim.Adam(foreach=True).step(), all cores"
    kw: ClassVar[dict[str, bool]] = {"foreach": True}


class OptaxJit(CpuSystem):
    name = "optax-jit"
    note = "optax.adam update + apply_updates in one jax.jit over the parameter list, params and state donated"
    requires = ("jax", "optax")

    def setup(self, params: list[Any], grads: list[Any]) -> Step:
        import jax
        import optax

        tx = optax.adam(1e-3)
        holder = [[jax.device_put(p) for p in params]]
        jg = [jax.device_put(g) for g in grads]
        state = [tx.init(holder[0])]

        def _update(p, s, g):  # type: ignore[no-untyped-def]
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        upd = jax.jit(_update, donate_argnums=(0, 1))

        def step() -> None:
            holder[0], state[0] = upd(holder[0], state[0], jg)
            jax.block_until_ready(holder[0])

        return step


class GpuSystem(System):
    """An Adam step on /gpu:0 and a device copy of the same bytes (the bandwidth floor)."""

    def setup(self, nvars: int, size: int) -> tuple[Step, Step]:
        raise NotImplementedError


class GpuvarsGpu(GpuSystem):
    lib = "?"

    def setup(self, nvars: int, size: int) -> tuple[Step, Step]:
        import gpuvars_backends
        import numpy as np

        probe = gpuvars_backends.probe(self.lib, "gpu")
        if not probe.usable:
            raise Skip(f"no GPU for {self.lib}: {probe.reason}")
        import gpuvars as gv

        gv.config.set_gpu_backend(self.lib)
        host = np.random.default_rng(0).standard_normal(size).astype(np.float32)
        vs = [gv.Variable(host, name=f"v{i}", device="/gpu:0") for i in range(nvars)]
        gs = [gv.copy_to(np.full(size, 1e-2, np.float32), "/gpu:0") for _ in range(nvars)]
        opt = gv.optim.Adam(1e-3)
        pairs = list(zip(gs, vs))
        if self.lib == "cupy":
            import cupy

            sync = cupy.cuda.Device(0).synchronize
            a = cupy.empty(size * nvars, np.float32)
            b = cupy.empty_like(a)

            def step() -> None:
                opt.apply_gradients(pairs)
                sync()

            def copy() -> None:
                b[...] = a
                sync()

            return step, copy
        import jax
        import jax.numpy as jnp

        x = jnp.zeros(size * nvars, np.float32)
        copier = jax.jit(lambda y: y + 0)

        def jstep() -> None:
            opt.apply_gradients(pairs)
            vs[-1].value().block_until_ready()

        def jcopy() -> None:
            copier(x).block_until_ready()

        return jstep, jcopy


class GpuvarsCupy(GpuvarsGpu):
    name = "gpuvars-cupy"
    note = "gv.optim.Adam on cupy variables on /gpu:0; device synchronize"
    requires = ("cupy",)
    lib = "cupy"


class GpuvarsJaxGpu(GpuvarsGpu):
    name = "gpuvars-jaxgpu"
    note = "gv.optim.Adam on JAX variables on /gpu:0; block_until_ready"
    requires = ("jax",)
    lib = "jax"


class TorchCuda(GpuSystem):
    name = "torch-cuda"
    note = "torch.optim.Adam(fused=True) on cuda; torch.cuda.synchronize"
    requires = ("torch",)

    def setup(self, nvars: int, size: int) -> tuple[Step, Step]:
        import numpy as np
        import torch

        if not torch.cuda.is_available():
            raise Skip("torch sees no CUDA device")
        host = np.random.default_rng(0).standard_normal(size).astype(np.float32)
        ps = [torch.tensor(host, device="cuda", requires_grad=True) for _ in range(nvars)]
        for p in ps:
            p.grad = torch.full_like(p, 1e-2)
        opt = torch.optim.Adam(ps, lr=1e-3, fused=True)
        a = torch.empty(size * nvars, device="cuda")
        b = torch.empty_like(a)

        def step() -> None:
            opt.step()
            torch.cuda.synchronize()

        def copy() -> None:
            b.copy_(a)
            torch.cuda.synchronize()

        return step, copy


SYSTEMS: dict[str, type[CpuSystem]] = {s.name: s for s in (GpuvarsNumpy, GpuvarsJax, TorchFused, TorchForeach, OptaxJit)}
QUICK_SYSTEMS = tuple(s for s in SYSTEMS if s != "torch-foreach")
GPU_SYSTEMS: dict[str, type[GpuSystem]] = {s.name: s for s in (GpuvarsCupy, GpuvarsJaxGpu, TorchCuda)}


# --- one cell (in the child) ------------------------------------------------------------------


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Time one (system, case) cell in this process: ``--steps`` Adam steps after one untimed
    warm-up; on the GPU also a device copy of the same bytes."""
    import numpy as np

    nvars, size, steps = cell["nvars"], cell["size"], cell["steps"]
    if cell.get("gpu"):
        gsys = GPU_SYSTEMS[cell["system"]]
        gsys.require()
        step, copy = gsys().setup(nvars, size)
        times = harness.time_steps(step, steps)
        copies = harness.time_steps(copy, steps)
        elems = nvars * size
        step_s, copy_s = statistics.median(times), statistics.median(copies)
        return {**cell, "step_s": step_s, "times_s": times, "copy_s": copy_s,
                "gbps": 7 * 4 * elems / step_s / 1e9, "copy_gbps": 2 * 4 * elems / copy_s / 1e9}
    csys = SYSTEMS[cell["system"]]
    csys.require()
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(size).astype(np.float32) for _ in range(nvars)]
    grads = [rng.standard_normal(size).astype(np.float32) * 1e-2 for _ in range(nvars)]
    step = csys().setup(params, grads)
    del params
    times = harness.time_steps(step, steps)
    return {**cell, "step_s": statistics.median(times), "times_s": times}


# --- the driver -------------------------------------------------------------------------------


def _spawn(cell: dict[str, Any]) -> dict[str, Any]:
    return harness.spawn(__file__, cell, timeout=900, env=harness.child_env(pin_malloc=False))


def gpu_main(args: argparse.Namespace, machine: dict[str, Any]) -> int:
    nvars, size = GPU_QUICK_SHAPE if args.quick else GPU_SHAPE
    print(f"GPU Adam step, {nvars} variables of {size} float32, median of {args.steps} steps after 1 untimed; "
          "fresh process per system")
    cells: list[dict[str, Any]] = []
    worst = None
    for name, cls in GPU_SYSTEMS.items():
        why = cls.unavailable()
        if why:
            print(f"  {name:16s} skip: {why}")
            continue
        r = _spawn({"gpu": True, "system": name, "nvars": nvars, "size": size, "steps": args.steps})
        cells.append(r)
        if "skip" in r or "error" in r:
            print(f"  {name:16s} {'skip' if 'skip' in r else 'FAILED'}: {r.get('skip') or r.get('error')}")
            continue
        frac = r["gbps"] / r["copy_gbps"]
        print(f"  {name:16s} {r['step_s'] * 1e3:8.2f} ms  {r['gbps']:7.1f} GB/s  = {frac:.0%} of a device copy "
              f"({r['copy_gbps']:.0f} GB/s)")
        if name.startswith("gpuvars"):
            worst = frac if worst is None else min(worst, frac)
    goals = []
    if worst is not None:
        print(f"goal: GPU Adam step >= {GOAL_GPU_FRACTION:.0%} of copy bandwidth: worst gpuvars system {worst:.0%}: "
              f"{'met' if worst >= GOAL_GPU_FRACTION else 'NOT MET'}")
    goals.append(harness.goal(f"GPU Adam step ({nvars * size:,} floats): device copy bandwidth / worst gpuvars "
                              "system's step bandwidth", None if worst is None else 1 / worst,
                              round(1 / GOAL_GPU_FRACTION, 3), "x"))
    if args.json:
        harness.write_json(args.json, program="bench_optim", machine=machine, cells=cells, goals=goals, mode="gpu",
                           steps=args.steps, systems={n: c.note for n, c in GPU_SYSTEMS.items()}, rows=[])
        print(f"wrote {args.json}")
    return 1 if any("error" in c for c in cells) else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smaller cases, mid and torch-foreach left out, 1 round, 5 steps")
    ap.add_argument("--rounds", type=int, help="fresh processes per cell (default 3; quick 1)")
    ap.add_argument("--steps", type=int, help="timed steps per cell after 1 untimed (default 10; quick 5)")
    ap.add_argument("--systems", help=f"comma list of {', '.join(SYSTEMS)} (default: all; quick: {', '.join(QUICK_SYSTEMS)})")
    ap.add_argument("--json", metavar="PATH", help="also write the rows, the goals and the machine here")
    ap.add_argument("--gpu", action="store_true", help="the GPU mode (bench/gpu.sh)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if harness.cell_main(run_cell, argv):
        return 0
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 5 if args.quick else 10
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    machine = harness.machine_record(os.getcwd())
    print("machine: " + harness.machine_line(machine))
    if args.gpu:
        return gpu_main(args, machine)
    names = [s for s in (args.systems or ",".join(QUICK_SYSTEMS if args.quick else SYSTEMS)).split(",") if s]
    for s in names:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
    ok, skipped = harness.available(SYSTEMS[s] for s in names)
    systems = [s.name for s in ok]
    cases = QUICK if args.quick else CASES
    started = time.perf_counter()
    cells: list[dict[str, Any]] = []
    results: dict[tuple[str, str], list[float]] = {}
    for rnd in range(args.rounds):
        for case, (nvars, size) in cases.items():
            for system in harness.rotated(systems, rnd):
                if system in skipped:
                    continue
                r = _spawn({"system": system, "case": case, "nvars": nvars, "size": size, "steps": args.steps})
                cells.append(r)
                if "skip" in r or "error" in r:
                    skipped[system] = r.get("skip") or f"error: {r['error']}"
                    print(f"{system} {case}: {skipped[system]}", file=sys.stderr)
                    for line in r.get("stderr_tail", []):
                        print(f"    {line}", file=sys.stderr)
                    continue
                results.setdefault((case, system), []).append(r["step_s"])
    elapsed = time.perf_counter() - started
    print(f"{args.rounds} round(s) of fresh processes, median of {args.steps} steps after 1 untimed each")
    print(f"{'case':6s} {'system':14s} {'step':>10s} {'per var':>9s} {'x torch-fused':>14s}")
    rows = []
    for case, (nvars, size) in cases.items():
        base = results.get((case, "torch-fused"))
        base_s = statistics.median(base) if base else None
        for system in names:
            got = results.get((case, system))
            if not got:
                why = skipped.get(system, "no result")
                print(f"{case:6s} {system:14s} {'skip' if not why.startswith('error') else 'FAILED'}: {why}")
                continue
            s = harness.summary(got)
            t = s["median"]
            ratio = f"{t / base_s:.2f}x" if base_s else "-"
            print(f"{case:6s} {system:14s} {t * 1e3:8.2f} ms {t / nvars * 1e6:7.1f} us {ratio:>14s}")
            rows.append({"case": case, "system": system, "nvars": nvars, "size": size, "params": nvars * size,
                         "step_ms": t * 1e3, "min_ms": s["min"] * 1e3, "max_ms": s["max"] * 1e3, "rounds": s["n"]})
    goals = []
    large = results.get(("large", "gpuvars-numpy")), results.get(("large", "torch-fused"))
    r = statistics.median(large[0]) / statistics.median(large[1]) if large[0] and large[1] else None
    if r is not None:
        print(f"goal: large Adam step {r:.2f}x torch fused (target <= {GOAL_LARGE_RATIO}x): "
              f"{'met' if r <= GOAL_LARGE_RATIO else 'NOT MET'}")
    goals.append(harness.goal(f"large Adam step ({cases['large'][0] * cases['large'][1]:,} floats): gpuvars-numpy / "
                              "torch fused", r, GOAL_LARGE_RATIO, "x"))
    small = results.get(("small", "gpuvars-numpy"))
    per = statistics.median(small) / cases["small"][0] * 1e6 if small else None
    if per is not None:
        print(f"goal: small Adam step {per:.1f} us per variable (target <= {GOAL_SMALL_US:g} us): "
              f"{'met' if per <= GOAL_SMALL_US else 'NOT MET'}")
    goals.append(harness.goal(f"small Adam step ({cases['small'][0]:,} x {cases['small'][1]:,}): gpuvars-numpy per "
                              "variable", per, GOAL_SMALL_US, "us"))
    failed = any(why.startswith("error: ") for why in skipped.values())
    print(f"total {elapsed:.0f} s")
    if args.json:
        harness.write_json(args.json, program="bench_optim", machine=machine, cells=cells, goals=goals, rows=rows,
                           rounds=args.rounds, steps=args.steps, systems={n: c.note for n, c in SYSTEMS.items()},
                           skipped=skipped, elapsed_s=elapsed)
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
