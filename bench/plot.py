"""Figures and the README table from ``python -m bench``'s results.json.

Every figure is drawn from the JSON alone (``python -m bench plot results.json``), so a
result file from another machine (``bash bench/gpu.sh``) draws the same way; each figure
names the machine in its caption. matplotlib comes with the ``bench`` extra
(``pip install -e ".[bench]"``); without it the JSON is still written and this says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any, Iterable

from harness import machine_line

README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def _first(pair: tuple[Any, Any]) -> Any:
    return pair[0]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _payload(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    rec = results.get("scenarios", {}).get(name) or {}
    payload = rec.get("payload")
    return payload if isinstance(payload, dict) else None


def _finish(plt: Any, fig: Any, results: dict[str, Any], title: str, path: str, written: list[str]) -> None:
    fig.suptitle(title, fontsize=11)
    fig.text(0.5, 0.005, machine_line(results.get("machine", {})), ha="center", fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)


def _growth(results: dict[str, Any], out: str, plt: Any, written: list[str]) -> None:
    payload = _payload(results, "growth")
    if payload is None:
        return
    cells = [c for c in payload.get("cells", []) if "median_s" in c]
    for sweep, xkey, xlabel, ykey, ylabel in (
        ("bytes", "data_bytes", "total size (MiB)", "gib_s", "GiB/s"),
        ("count", "n_tensors", "tensors (same total bytes)", "us_per_tensor", "us per tensor"),
    ):
        rows = [c for c in cells if str(c.get("workload", "")).startswith(f"{sweep}-")]
        if not rows:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, phase in zip(axes, ("save", "restore")):
            for system in sorted({c["system"] for c in rows}):
                pts = sorted(((c[xkey], c) for c in rows if c["system"] == system and c["phase"] == phase), key=_first)
                if not pts:
                    continue
                xs = [x / (1 << 20) if xkey == "data_bytes" else x for x, _ in pts]
                ys = [c["median_s"] / c["n_tensors"] * 1e6 if ykey == "us_per_tensor" else c[ykey] for _, c in pts]
                ax.plot(xs, ys, marker="o", label=system)
            ax.set_xscale("log")
            ticks = sorted({x / (1 << 20) if xkey == "data_bytes" else x for x in (c[xkey] for c in rows)})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
            if ykey == "us_per_tensor":
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            fit = payload.get("fits", {}).get(f"gpuvars {phase}")
            ax.set_title(phase if not fit else f"{phase} (gpuvars fit: {fit['fixed_ms']:.1f} ms + "
                         f"{fit['per_tensor_us']:.1f} us/tensor + {fit['per_gib_s']:.2f} s/GiB)", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        title = f"checkpoint {'throughput vs size' if sweep == 'bytes' else 'cost per tensor vs tensor count'}"
        _finish(plt, fig, results, title, os.path.join(out, f"checkpoint_{sweep}.png"), written)


def _checkpoint_rss(results: dict[str, Any], out: str, plt: Any, written: list[str]) -> None:
    payload = _payload(results, "checkpoint")
    if payload is None:
        return
    cells = [c for c in payload.get("cells", []) if c.get("workload") == "big" and c.get("extra_rss_mib") is not None]
    if not cells:
        return
    fig, ax = plt.subplots(figsize=(8, 3.6))
    labels = [f"{c['system']}\n{c['phase']}" for c in cells]
    ax.bar(range(len(cells)), [c["extra_rss_mib"] for c in cells])
    ax.set_xticks(range(len(cells)), labels, fontsize=6)
    ax.set_ylabel("peak extra RSS (MiB)")
    size = cells[0].get("data_bytes", 0) / (1 << 20)
    _finish(plt, fig, results, f"peak extra memory of a {size:.0f} MiB save / restore", os.path.join(out, "checkpoint_rss.png"),
            written)


def _ops(results: dict[str, Any], out: str, plt: Any, written: list[str]) -> None:
    payload = _payload(results, "ops")
    if payload is None:
        return
    rows = payload.get("rows", [])
    for backend in sorted({r["backend"] for r in rows}):
        mine = [r for r in rows if r["backend"] == backend]
        ops = sorted({r["op"] for r in mine})
        fig, axes = plt.subplots(1, len(ops), figsize=(3.2 * len(ops), 3.4), squeeze=False)
        for ax, op in zip(axes[0], ops):
            pts = sorted(((r["size"], r) for r in mine if r["op"] == op), key=_first)
            xs = [s for s, _ in pts]
            ax.plot(xs, [r["gpuvars_ns"] / 1e3 for _, r in pts], marker="o", label="gpuvars")
            ax.plot(xs, [r["raw_ns"] / 1e3 for _, r in pts], marker="s", label="raw " + backend)
            if any(r.get("jit_ns") for _, r in pts):
                ax.plot(xs, [(r.get("jit_ns") or float("nan")) / 1e3 for _, r in pts], marker="^", label="raw jit")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(op, fontsize=9)
            ax.set_xlabel("elements")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel("us per call")
        axes[0][0].legend(fontsize=7)
        _finish(plt, fig, results, f"per-op cost vs size ({backend})", os.path.join(out, f"ops_{backend}.png"), written)


def _optim(results: dict[str, Any], out: str, plt: Any, written: list[str]) -> None:
    payload = _payload(results, "optim")
    if payload is None or not payload.get("rows"):
        return
    rows = payload["rows"]
    line_vars = next((r["nvars"] for r in rows if r["case"] == "large"), None)
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, system in enumerate(sorted({r["system"] for r in rows})):
        color = f"C{k}"
        pts = sorted(((r["params"], r) for r in rows if r["system"] == system and r["nvars"] == line_vars), key=_first)
        ax.plot([p for p, _ in pts], [r["step_ms"] for _, r in pts], marker="o", color=color,
                label=f"{system} ({line_vars} variables)")
        for r in rows:
            if r["system"] == system and r["nvars"] != line_vars:
                ax.scatter([r["params"]], [r["step_ms"]], marker="x", color=color)
    ax.text(0.02, 0.98, "x: the same, as many small variables", transform=ax.transAxes, fontsize=7, va="top")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("Adam step (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _finish(plt, fig, results, "optimizer step time vs parameters", os.path.join(out, "optim.png"), written)


def _async(results: dict[str, Any], out: str, plt: Any, written: list[str]) -> None:
    payload = _payload(results, "async")
    if payload is None:
        return
    calls = [c for c in payload.get("call", []) if c.get("call_s")]
    if not calls:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for system in sorted({c["key"][0] for c in calls}):
        pts = sorted((c["key"][1], statistics.median(c["call_s"]) * 1e3) for c in calls if c["key"][0] == system)
        ax.plot([n for n, _ in pts], [t for _, t in pts], marker="o", label=system)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("variables")
    ax.set_ylabel("save(blocking=False) call (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _finish(plt, fig, results, "how long an asynchronous save blocks the caller", os.path.join(out, "async_call.png"), written)


def _multiprocess(results: dict[str, Any], out: str, plt: Any, written: list[str]) -> None:
    payload = _payload(results, "multiprocess")
    rows = [] if payload is None else [r for r in payload.get("allreduce_rows", []) if r.get("median_ns")]
    if not rows:
        return
    names = {"mp": "across processes (MultiWorkerMirrored)", "raw": "raw JAX process_allgather",
             "inproc": "one process (MirroredStrategy)"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("mp", "raw", "inproc"):
        pts = sorted((r["n"], r["median_ns"] / 1e6) for r in rows if r["mode"] == mode)
        if pts:
            ax.plot([n for n, _ in pts], [t for _, t in pts], marker="o", label=names[mode])
    ax.set_yscale("log")
    ax.set_xticks(sorted({r["n"] for r in rows}))
    ax.set_xlabel("replicas (one per process, or logical CPUs in one process)")
    ax.set_ylabel("all_reduce SUM of 1M float32 (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _finish(plt, fig, results, "replica-context SUM across processes", os.path.join(out, "multiprocess.png"), written)


FIGURES = (_growth, _checkpoint_rss, _ops, _optim, _async, _multiprocess)


def plot_all(results: dict[str, Any], out: str) -> list[str]:
    """Every figure the results hold data for, as PNGs in ``out``; their paths."""
    try:
        plt = _pyplot()
    except ImportError:
        print("no figures: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return []
    written: list[str] = []
    for figure in FIGURES:
        try:
            figure(results, out, plt, written)
        except (KeyError, TypeError, ValueError) as exc:  # one odd payload costs its figure, not the others
            print(f"figure {figure.__name__[1:]}: skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
    return written


def goals_table(results: dict[str, Any], figures: Iterable[str] = ()) -> str:
    """The README's generated section: the machine, every goal, the figures."""
    lines = [f"Generated by `python -m bench readme` from a `python -m bench{' --quick' if results.get('mode') == 'quick' else ''}` "
             f"run ({results.get('started', '?')}, {results.get('seconds', '?')} s) on: {machine_line(results.get('machine', {}))}.",
             "", "| scenario | goal | measured | limit | met |", "|---|---|---:|---:|---|"]
    for g in results.get("goals", []):
        measured = "-" if g["measured"] is None else f"{abs(g['measured']):.3g} {g['unit'].split(' ')[0].lstrip('-')}"
        limit = "-" if g["limit"] is None else f"{abs(g['limit']):.3g}"
        met = "-" if g["met"] is None else "yes" if g["met"] else "**no**"
        lines.append(f"| {g['scenario']} | {g['goal']} | {measured} | {limit} | {met} |")
    for name, rec in results.get("scenarios", {}).items():
        if rec.get("status") not in (0, None):
            lines.append(f"\nScenario {name} failed (status {rec['status']}): `{(rec.get('output_tail') or [''])[-1][:200]}`")
    figs = list(figures)
    if figs:
        lines.append("")
        lines.extend(f"![{os.path.splitext(os.path.basename(f))[0]}]({f})" for f in figs)
    return "\n".join(lines)


def plot_command(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench plot", description="the PNGs of a results.json")
    ap.add_argument("results")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default: the results' folder)")
    args = ap.parse_args(argv)
    with open(args.results, encoding="utf-8") as fh:
        results = json.load(fh)
    out = args.out or os.path.dirname(os.path.abspath(args.results))
    os.makedirs(out, exist_ok=True)
    for png in plot_all(results, out):
        print(f"wrote {png}")
    return 0


def readme_command(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench readme",
                                 description=f"replace README.md's text between {README_START} and {README_END}")
    ap.add_argument("results")
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--figures", default=None,
                    help="folder of the PNGs, relative to the README (default: the results' folder)")
    args = ap.parse_args(argv)
    with open(args.results, encoding="utf-8") as fh:
        results = json.load(fh)
    folder = os.path.dirname(os.path.abspath(args.results))
    rel = args.figures or os.path.relpath(folder, os.path.dirname(os.path.abspath(args.readme)))
    figures = sorted(os.path.join(rel, f) for f in os.listdir(folder) if f.endswith(".png"))
    with open(args.readme, encoding="utf-8") as fh:
        text = fh.read()
    if README_START not in text or README_END not in text:
        print(f"{args.readme} has no {README_START} ... {README_END} section", file=sys.stderr)
        return 2
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    with open(args.readme, "w", encoding="utf-8") as fh:
        fh.write(head + README_START + "\n" + goals_table(results, figures) + "\n" + README_END + tail)
    print(f"updated {args.readme}")
    return 0
