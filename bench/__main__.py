"""``python -m bench``: every benchmark scenario in one run, one JSON, the plots, the README table.

    python -m bench [--quick] [--gpu] [--scenarios ops,checkpoint,...] [--out bench-results]
    python -m bench plot RESULTS.json [--out DIR]        # the PNGs again (matplotlib: the bench extra)
    python -m bench readme RESULTS.json [--readme PATH]  # README.md's generated benchmark table

Run from the repository root. Each scenario is one of the programs in ``bench/`` (each times
every cell in a fresh process, prefaulted, medians quoted), run as a child with ``--json``;
this driver adds the one machine record, normalizes every program's goals to
``{scenario, goal, measured, limit, unit, met}``, writes ``results.json`` and draws one PNG
per figure. A scenario whose program fails is recorded with its status and the tail of its
output, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from harness import machine_record

#: scenario -> (program, its arguments in --quick mode, in full mode, in --gpu mode or None)
SCENARIOS: dict[str, tuple[str, list[str], list[str], list[str] | None]] = {
    "ops": ("bench_ops.py", ["--quick"], [], ["--backends", "cupy,jax", "--quick"]),
    "checkpoint": ("bench_checkpoint.py", ["--quick", "--workloads", "big,small"],
                   ["--repeats", "3", "--workloads", "big,small,tiny"], ["--quick", "--gpu", "--workloads", "big"]),
    "growth": ("bench_checkpoint.py", ["--quick", "--growth", "--systems", "raw2,gpuvars,safetensors", "--phases",
                                       "save,restore"],
               ["--growth", "--repeats", "3", "--systems", "raw,raw2,gpuvars,safetensors,torch", "--phases",
                "save,restore", "--max-shard-size", "1GiB"], None),
    "distribute": ("bench_distribute.py", ["--quick"], [], ["--quick", "--gpu"]),
    "optim": ("bench_optim.py", ["--quick"], [], ["--gpu", "--quick"]),
    "async": ("bench_async.py", ["--quick"], [], None),
    "multiprocess": ("bench_multiprocess.py", ["--quick"], [], None),
}


def _run_program(name: str, args: list[str], out_json: str, timeout: float) -> dict[str, Any]:
    program = SCENARIOS[name][0]
    cmd = [sys.executable, os.path.join(HERE, program), *args, "--json", out_json]
    print(f"\n=== {name}: {' '.join(['python', 'bench/' + program, *args])}", flush=True)
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, check=False)
        status, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as exc:
        status, output = 124, (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    seconds = time.perf_counter() - started
    print(output, end="" if output.endswith("\n") else "\n", flush=True)
    record: dict[str, Any] = {"command": " ".join(["python", "bench/" + program, *args]), "status": status,
                              "seconds": round(seconds, 1)}
    try:
        with open(out_json, encoding="utf-8") as fh:
            record["payload"] = json.load(fh)
    except (OSError, ValueError):
        record["payload"] = None
        record["output_tail"] = output.splitlines()[-30:]
    return record


# --- every program's goals, in one shape -----------------------------------------------------------


def goals_of(scenario: str, payload: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The goals a program's JSON reports (each made by ``harness.goal``), with the scenario
    named; an entry of any other shape is dropped, so one program's bad output cannot stop
    the others' table."""
    if not payload or not isinstance(payload.get("goals"), list):
        return []
    keys = ("goal", "measured", "limit", "unit", "met")
    return [{"scenario": scenario, **{k: g.get(k) for k in keys}} for g in payload["goals"]
            if isinstance(g, dict) and isinstance(g.get("goal"), str)]


def run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="every scenario's quick mode (~5 minutes on 2 cores)")
    ap.add_argument("--gpu", action="store_true", help="the GPU scenarios (bench/gpu.sh)")
    ap.add_argument("--scenarios", default=None, help=f"comma list of {', '.join(SCENARIOS)} (default: all)")
    ap.add_argument("--out", default="bench-results", help="folder for results.json and the PNGs")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per scenario (default 1800)")
    ap.add_argument("--no-plots", action="store_true", help="JSON only")
    args = ap.parse_args(argv)
    names = list(SCENARIOS) if args.scenarios is None else [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; known: {list(SCENARIOS)}")
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine_record(tempfile.gettempdir()),
        "mode": "gpu" if args.gpu else "quick" if args.quick else "full",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "scenarios": {},
        "goals": [],
    }
    with tempfile.TemporaryDirectory(prefix="gpuvars-bench-") as tmp:
        for name in names:
            _, quick, full, gpu = SCENARIOS[name]
            if args.gpu and gpu is None:
                results["scenarios"][name] = {"skipped": "no GPU mode"}
                continue
            chosen = gpu if args.gpu else quick if args.quick else full
            assert chosen is not None
            record = _run_program(name, chosen, os.path.join(tmp, f"{name}.json"), args.timeout)
            results["scenarios"][name] = record
            results["goals"].extend(g for g in goals_of(name, record["payload"]) if g["measured"] is not None)
    results["seconds"] = round(time.perf_counter() - started, 1)
    path = os.path.join(args.out, "results.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1)
    print(f"\n=== {len(names)} scenario(s) in {results['seconds']:.0f} s; wrote {path}")
    for g in results["goals"]:
        state = "-" if g["met"] is None else "met" if g["met"] else "NOT MET"
        measured = "not measured" if g["measured"] is None else f"{g['measured']:.3g} {g['unit']}"
        print(f"goal [{g['scenario']}] {g['goal']}: {measured} (limit {g['limit']}): {state}")
    if not args.no_plots:
        from plot import plot_all

        for png in plot_all(results, args.out):
            print(f"wrote {png}")
    failed = [n for n, r in results["scenarios"].items() if r.get("status") not in (0, None)]
    if failed:
        print(f"scenario(s) that failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands: dict[str, Callable[[list[str]], int]] = {}
    if argv and argv[0] in ("plot", "readme"):
        from plot import plot_command, readme_command

        commands = {"plot": plot_command, "readme": readme_command}
        return commands[argv[0]](argv[1:])
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
