"""One optimizer step, gpuvars against what users would pick instead, measured in one run.

Cases (float32, Adam):
  large: 200 variables, 50M elements in all (250k each)
  small: 2,000 variables of 1,000 elements

Systems, each in a fresh process, the same gradients every step, memory touched by warm-up
steps before timing (first touch runs at ~0.5 GB/s on these VMs):
  gpuvars-numpy   gv.optim.Adam on numpy variables (blocked in-place ufuncs)
  gpuvars-jax     gv.optim.Adam on JAX CPU variables (one jit per device)
  torch-fused     torch.optim.Adam(fused=True)       (if torch is installed)
  torch-foreach   torch.optim.Adam(foreach=True)
  optax-jit       optax.adam inside one jax.jit over the parameter list, donated
Figures are medians of the step times over --steps timed steps, medians again over --rounds
fresh processes. Goals (issue 9): large <= 1.5x torch fused; small <= 15 us of host time per
variable (gpuvars-numpy).

    python bench/bench_optim.py [--quick] [--rounds 3] [--steps 10]
    python bench/bench_optim.py --gpu [--quick]   # on a GPU machine (bench/gpu.sh)

GPU mode: Adam over 200 variables of 2.5M float32 (500M elements, --quick 50M) with
gpuvars-cupy and gpuvars-jax on /gpu:0, beside torch fused on cuda when installed; the
achieved bandwidth counts 7 passes of 4 bytes per element (p, m, v read and written, g
read) against a device-to-device copy measured in the same process (goal: >= 80%).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

CASES = {"large": (200, 250_000), "mid": (200, 25_000), "low": (200, 2_500), "small": (2000, 1000)}
QUICK = {"large": (50, 100_000), "mid": (50, 10_000), "low": (50, 1000), "small": (500, 1000)}
# large, mid and low: the same variable count, 100x the parameters apart (the figure's line); small: many variables
SYSTEMS = ("gpuvars-numpy", "gpuvars-jax", "torch-fused", "torch-foreach", "optax-jit")
GPU_SYSTEMS = ("gpuvars-cupy", "gpuvars-jaxgpu", "torch-cuda")


def _gpu_cell(system: str, nvars: int, size: int, steps: int) -> dict[str, float]:
    """One system's Adam step on /gpu:0 and a device copy of the same bytes (the bandwidth floor)."""
    import numpy as np

    rng = np.random.default_rng(0)
    host = rng.standard_normal(size).astype(np.float32)
    if system == "torch-cuda":
        import torch

        ps = [torch.tensor(host, device="cuda", requires_grad=True) for _ in range(nvars)]
        for p in ps:
            p.grad = torch.full_like(p, 1e-2)
        topt = torch.optim.Adam(ps, lr=1e-3, fused=True)
        step, sync = topt.step, torch.cuda.synchronize
        a = torch.empty(size * nvars, device="cuda")
        b = torch.empty_like(a)

        def copy() -> None:
            b.copy_(a)
    else:
        import gpuvars as gv

        lib = "cupy" if system == "gpuvars-cupy" else "jax"
        gv.config.set_gpu_backend(lib)
        vs = [gv.Variable(host, name=f"v{i}", device="/gpu:0") for i in range(nvars)]
        gs = [gv.copy_to(np.full(size, 1e-2, np.float32), "/gpu:0") for _ in range(nvars)]
        opt = gv.optim.Adam(1e-3)
        pairs = list(zip(gs, vs))

        def step() -> None:
            opt.apply_gradients(pairs)

        if lib == "cupy":
            import cupy

            sync = cupy.cuda.Device(0).synchronize
            a = cupy.empty(size * nvars, np.float32)
            b = cupy.empty_like(a)

            def copy() -> None:
                b[...] = a
        else:
            import jax
            import jax.numpy as jnp

            def sync() -> None:
                vs[-1].value().block_until_ready()

            a = jnp.zeros(size * nvars, np.float32)
            copier = jax.jit(lambda x: x + 0)
            out = [a]

            def copy() -> None:
                out[0] = copier(a)
                out[0].block_until_ready()
    for _ in range(3):
        step()
        copy()
    sync()
    times, copies = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        copy()
        sync()
        copies.append(time.perf_counter() - t0)
    elems = nvars * size
    step_s, copy_s = statistics.median(times), statistics.median(copies)
    return {"step_s": step_s, "nvars": nvars, "size": size,
            "gbps": 7 * 4 * elems / step_s / 1e9, "copy_gbps": 2 * 4 * elems / copy_s / 1e9}


def _gpu_main(quick: bool, steps: int) -> int:
    nvars, size = (20, 2_500_000) if quick else (200, 2_500_000)
    print(f"GPU Adam step, {nvars} variables of {size} float32, median of {steps} steps; fresh process per system")
    worst = None
    for system in GPU_SYSTEMS:
        mod = {"gpuvars-cupy": "cupy", "gpuvars-jaxgpu": "jax", "torch-cuda": "torch"}[system]
        if importlib.util.find_spec(mod) is None:
            print(f"  {system:16s} not installed")
            continue
        if mod in ("cupy", "jax"):
            import gpuvars_backends

            probe = gpuvars_backends.probe(mod, "gpu")
            if not probe.usable:
                print(f"  {system:16s} no GPU: {probe.reason}")
                continue
        cmd = [sys.executable, __file__, "--gpu-cell", f"{system}:{nvars}:{size}", "--steps", str(steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        line = next((l for l in out.stdout.splitlines() if l.startswith(TAG)), None)
        if line is None:
            print(f"  {system:16s} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        r = json.loads(line[len(TAG):])
        frac = r["gbps"] / r["copy_gbps"]
        print(f"  {system:16s} {r['step_s'] * 1e3:8.2f} ms  {r['gbps']:7.1f} GB/s  = {frac:.0%} of a device copy "
              f"({r['copy_gbps']:.0f} GB/s)")
        if system.startswith("gpuvars"):
            worst = frac if worst is None else min(worst, frac)
    if worst is not None:
        print(f"goal: GPU Adam step >= 80% of copy bandwidth: worst gpuvars system {worst:.0%}: "
              f"{'met' if worst >= 0.8 else 'NOT MET'}")
    return 0
TAG = "BENCH-OPTIM "


def _cell(system: str, nvars: int, size: int, steps: int) -> dict[str, float]:
    import numpy as np

    rng = np.random.default_rng(0)
    params = [rng.standard_normal(size).astype(np.float32) for _ in range(nvars)]
    grads = [rng.standard_normal(size).astype(np.float32) * 1e-2 for _ in range(nvars)]
    if system.startswith("gpuvars"):
        import gpuvars as gv

        if system == "gpuvars-jax":
            gv.config.set_cpu_backend("jax")
        vs = [gv.Variable(p, name=f"v{i}") for i, p in enumerate(params)]
        opt = gv.optim.Adam(1e-3)
        if system == "gpuvars-jax":
            import jax

            grads = [jax.device_put(g) for g in grads]  # gradients already on the device, as jax.grad gives them
        pairs = list(zip(grads, vs))

        def step() -> None:
            opt.apply_gradients(pairs)

        def sync() -> None:
            if system == "gpuvars-jax":
                vs[-1].value().block_until_ready()
    elif system.startswith("torch"):
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        ps = [torch.tensor(p, requires_grad=True) for p in params]
        for p, g in zip(ps, grads):
            p.grad = torch.tensor(g)
        kw = {"fused": True} if system == "torch-fused" else {"foreach": True}
        topt = torch.optim.Adam(ps, lr=1e-3, **kw)

        def step() -> None:
            topt.step()

        def sync() -> None:
            pass
    else:
        import jax
        import optax

        tx = optax.adam(1e-3)
        jp = [jax.device_put(p) for p in params]
        jg = [jax.device_put(g) for g in grads]
        state = [tx.init(jp)]
        holder = [jp]

        @jax.jit
        def _update(p, s, g):  # type: ignore[no-untyped-def]
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        upd = jax.jit(_update.__wrapped__, donate_argnums=(0, 1))

        def step() -> None:
            holder[0], state[0] = upd(holder[0], state[0], jg)

        def sync() -> None:
            jax.block_until_ready(holder[0])

    for _ in range(3):  # warm-up: compile, touch every buffer
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "nvars": nvars, "size": size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller cases, 1 round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--json", metavar="PATH", help="also write the rows, the goals and the machine here")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--gpu", action="store_true", help="the GPU mode (bench/gpu.sh)")
    ap.add_argument("--gpu-cell", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gpu_cell:
        system, nvars, size = args.gpu_cell.split(":")
        print(TAG + json.dumps(_gpu_cell(system, int(nvars), int(size), args.steps)))
        return 0
    if args.gpu:
        return _gpu_main(args.quick, args.steps)
    if args.cell:
        system, case = args.cell.split(":")
        nvars, size = (QUICK if args.quick else CASES)[case]
        print(TAG + json.dumps(_cell(system, nvars, size, args.steps)))
        return 0
    have = {"torch-fused": "torch", "torch-foreach": "torch", "optax-jit": "optax", "gpuvars-jax": "jax"}
    systems = [s for s in args.systems.split(",") if s]
    rounds = 1 if args.quick else args.rounds
    cases = QUICK if args.quick else CASES
    results: dict[tuple[str, str], list[float]] = {}
    for rnd in range(rounds):
        for case in cases:
            order = systems[rnd % len(systems):] + systems[: rnd % len(systems)]  # rotate: drift spreads
            for system in order:
                mod = have.get(system)
                if mod and importlib.util.find_spec(mod) is None:
                    continue
                cmd = [sys.executable, __file__, "--cell", f"{system}:{case}", "--steps", str(args.steps)]
                cmd += ["--quick"] if args.quick else []
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
                line = next((l for l in out.stdout.splitlines() if l.startswith(TAG)), None)
                if line is None:
                    print(f"{system} {case}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                results.setdefault((case, system), []).append(json.loads(line[len(TAG):])["step_s"])
    print(f"machine: {os.cpu_count()} cores; {rounds} round(s) of fresh processes, median of {args.steps} steps each")
    print(f"{'case':6s} {'system':14s} {'step':>10s} {'per var':>9s} {'x torch-fused':>14s}")
    for case, (nvars, size) in cases.items():
        base = results.get((case, "torch-fused"))
        base_s = statistics.median(base) if base else None
        for system in systems:
            got = results.get((case, system))
            if not got:
                print(f"{case:6s} {system:14s} {'not installed':>10s}")
                continue
            t = statistics.median(got)
            ratio = f"{t / base_s:.2f}x" if base_s else "-"
            print(f"{case:6s} {system:14s} {t * 1e3:8.2f} ms {t / nvars * 1e6:7.1f} us {ratio:>14s}")
    goals = []
    large = results.get(("large", "gpuvars-numpy")), results.get(("large", "torch-fused"))
    r = statistics.median(large[0]) / statistics.median(large[1]) if all(large) else None  # type: ignore[arg-type]
    if r is not None:
        print(f"goal: large Adam step {r:.2f}x torch fused (target <= 1.5x): {'met' if r <= 1.5 else 'NOT MET'}")
    goals.append({"goal": f"large Adam step ({cases['large'][0] * cases['large'][1]:,} floats): gpuvars-numpy / "
                          "torch fused", "measured": r, "limit": 1.5, "unit": "x"})
    small = results.get(("small", "gpuvars-numpy"))
    per = statistics.median(small) / cases["small"][0] * 1e6 if small else None
    if per is not None:
        print(f"goal: small Adam step {per:.1f} us per variable (target <= 15 us): {'met' if per <= 15 else 'NOT MET'}")
    goals.append({"goal": f"small Adam step ({cases['small'][0]:,} x {cases['small'][1]:,}): gpuvars-numpy per variable",
                  "measured": per, "limit": 15.0, "unit": "us"})
    if args.json:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from harness import machine_record

        rows = [{"case": case, "system": system, "nvars": cases[case][0], "size": cases[case][1],
                 "params": cases[case][0] * cases[case][1], "step_ms": statistics.median(v) * 1e3,
                 "min_ms": min(v) * 1e3, "max_ms": max(v) * 1e3, "rounds": len(v)}
                for (case, system), v in sorted(results.items())]
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"benchmark": "bench_optim", "machine": machine_record(os.getcwd()), "rounds": rounds,
                       "steps": args.steps, "rows": rows, "goals": goals}, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
