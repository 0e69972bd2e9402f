"""The one benchmark harness every scenario program in ``bench/`` runs on.

Each program (``bench_ops``, ``bench_checkpoint``, ``bench_distribute``, ``bench_optim``,
``bench_async``, ``bench_multiprocess``) is a scenario: it names its systems and cells and
how one cell runs; this module owns everything else, so the rules are the same everywhere:

- **Systems** (:class:`System`): one way of doing the scenario's work (the raw limit,
  gpuvars, safetensors, torch, orbax, optax ...). A system whose library is not installed is
  skipped with the reason (:meth:`System.unavailable`, or :class:`Skip` raised in the cell).
- **Fresh process per cell** (:func:`spawn` in the driver, :func:`cell_main` in the child):
  the child gets the pinned environment of :func:`child_env`, runs one cell, prints one
  line tagged :data:`RESULT_TAG`; a crash, a timeout or a skip comes back as a record
  (``error`` / ``skip``), never an exception in the driver.
- **Prefaulting** (:func:`warm_free_pages`): on these VMs freed memory goes back to the
  host and the next first touch runs at ~0.5 GB/s, so every step that allocates or writes
  is preceded by touching (and freeing) that much memory and page cache.
- **One warm-up and repeat rule.** A *step* (a save, a restore, an optimizer step: long
  enough to time alone) runs :data:`WARMUP_STEPS` untimed times, then ``repeats`` timed times
  (:func:`time_steps`). A *call* (an op of microseconds) runs untimed until it has made
  :data:`WARMUP_CALLS` calls and ``warmup_s`` seconds have passed, is then batched to about
  ``batch_ms`` per batch and timed over ``batches`` batches (:func:`time_calls`). Cells run
  once per round, the order of the systems rotating between rounds (:func:`rotated`).
  Figures are medians with min and max (:func:`summary`).
- **One machine record** (:func:`machine_record`) and one goal shape (:func:`goal`) in the
  JSON every program writes with ``--json`` (:func:`write_json`), which ``python -m bench``
  gathers into one ``results.json``.

The programs run as scripts, so ``bench/`` is on ``sys.path`` and they ``import harness``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

MiB = 1 << 20
GiB = 1 << 30

#: the prefix of the one result line a cell's child prints on stdout
RESULT_TAG = "BENCH-CELL-RESULT "
#: untimed steps before a step is timed (imports, lazy set-up, first-use effects of the kernel)
WARMUP_STEPS = 1
#: untimed calls (at least) before a call is timed
WARMUP_CALLS = 1000


# --- systems ----------------------------------------------------------------------------------


class Skip(Exception):
    """A system or cell that cannot run here; ``str(exc)`` is the reason, which the tables print."""


class System:
    """One way of doing a scenario's work, held against the others in the same run.

    Subclasses set :attr:`name`, :attr:`note` (one line for the tables: what is timed) and
    :attr:`requires` (modules that must be importable), and add the scenario's own methods
    (``save``/``restore``, ``step``, ...).
    """

    name: str = "?"
    note: str = ""
    requires: tuple[str, ...] = ()

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this system cannot run in this Python (a module it needs is missing), or None."""
        return missing(cls.requires)

    @classmethod
    def require(cls) -> None:
        """Raise :class:`Skip` with the reason if :meth:`unavailable` names one."""
        why = cls.unavailable()
        if why:
            raise Skip(f"{cls.name}: {why}")


def missing(modules: Iterable[str]) -> str | None:
    """``"<module> is not installed"`` for the first of ``modules`` this Python cannot import
    (found without importing it), or None."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"{module} is not installed"
    return None


def available(systems: Iterable[type[System]]) -> tuple[list[type[System]], dict[str, str]]:
    """The systems that can run here, and ``{name: why not}`` for the others."""
    ok: list[type[System]] = []
    skipped: dict[str, str] = {}
    for s in systems:
        why = s.unavailable()
        if why:
            skipped[s.name] = why
        else:
            ok.append(s)
    return ok, skipped


# --- timing -----------------------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, float | int]:
    """``{"median", "min", "max", "n"}`` of ``values`` (non-empty)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def rotated(items: Sequence[T], round_: int) -> list[T]:
    """``items`` rotated by ``round_``: each round starts with a different system, so a drift of
    the machine during the run spreads over all of them."""
    if not items:
        return []
    k = round_ % len(items)
    return list(items[k:]) + list(items[:k])


def time_steps(step: Callable[[], object], repeats: int, *, warmup: int = WARMUP_STEPS,
               before: Callable[[], object] | None = None, after: Callable[[], object] | None = None) -> list[float]:
    """Seconds of each of ``repeats`` timed runs of ``step``, after ``warmup`` untimed ones.

    ``before`` runs untimed before every run (prefault, zero the destinations), ``after`` untimed
    after every run (synchronize a device is *not* its job: a step that launches device work
    must wait for it itself; ``after`` checks or cleans up).
    """
    times: list[float] = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        if after is not None:
            after()
        if i >= warmup:
            times.append(t1 - t0)
    return times


def time_calls(body: Callable[[int], object], batches: int, batch_ms: float, warmup_s: float) -> dict[str, Any]:
    """Per-call nanoseconds of ``body(n)`` (which makes ``n`` calls): warmed up for at least
    :data:`WARMUP_CALLS` calls and ``warmup_s`` seconds (or 5x that time if the calls are slow),
    batched to ~``batch_ms`` per batch, ``{"ns": median, "min_ns", "max_ns", ...}`` over ``batches``."""
    t0 = time.perf_counter_ns()
    calls, n = 0, 1
    limit_ns = int(max(warmup_s, 0.0) * 1e9)
    while True:
        body(n)
        calls += n
        elapsed = time.perf_counter_ns() - t0
        if (calls >= WARMUP_CALLS and elapsed >= limit_ns) or elapsed >= max(limit_ns, 1) * 5:
            break
        n = min(n * 2, 4096)
    size = max(1, int(batch_ms * 1e6 / (elapsed / calls)))
    samples = []
    for _ in range(batches):
        t = time.perf_counter_ns()
        body(size)
        samples.append((time.perf_counter_ns() - t) / size)
    return {"ns": statistics.median(samples), "min_ns": min(samples), "max_ns": max(samples),
            "batch": size, "batches": batches, "warmup_calls": calls}


def loop_ns(batch_ms: float) -> float:
    """The cost of one iteration of an empty ``for _ in range(n)`` loop, ns (median of 5): what
    :func:`time_calls` counts on top of the call itself."""
    n = max(1000, int(batch_ms * 1e6 / 20))

    def empty(k: int) -> None:
        for _ in range(k):
            pass

    empty(n)
    samples = []
    for _ in range(5):
        t = time.perf_counter_ns()
        empty(n)
        samples.append((time.perf_counter_ns() - t) / n)
    return statistics.median(samples)


# --- one cell in a fresh process ----------------------------------------------------------------------


def child_env(extra: dict[str, str] | None = None, *, pin_malloc: bool = True) -> dict[str, str]:
    """The environment of every cell's child: glibc's mmap threshold pinned at its default (so
    freed big arrays go back to the kernel between repeats instead of hiding the next repeat's
    allocations in the heap), JAX not preallocating GPU memory, warnings off; then ``extra``.

    ``pin_malloc=False`` leaves glibc's adaptive threshold alone: right for programs whose timed
    step allocates and frees the same mid-size arrays over and over (an optimizer step, a small
    update), where the pin turns every step's temporaries into fresh page faults and measures the
    kernel, not the library (seen: a JAX Adam step at 8.5 ms became 28.6 ms under the pin)."""
    env = dict(os.environ)
    if pin_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.update(extra or {})
    return env


def spawn(program: str, cell: dict[str, Any], *, timeout: float = 900, env: dict[str, str] | None = None,
          python: str | None = None, args: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one cell of ``program`` (a path) in a fresh ``python`` (default: this one), as
    ``program --cell JSON`` (or ``program *args``), and return its result record.

    A child that crashes, prints no result or runs past ``timeout`` seconds gives
    ``{**cell, "error": the last line of its output, "stderr_tail": [...]}``.
    """
    cmd = [python or sys.executable, os.path.abspath(program), *(args if args is not None else
                                                                 ["--cell", json.dumps(cell)])]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env if env is not None else child_env(),
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**cell, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return {**cell, "error": tail[-1].strip() if tail else f"exit status {proc.returncode}",
                "stderr_tail": tail[-15:], "stderr": proc.stderr}
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_TAG):])
    if proc.stderr.strip():
        result.setdefault("stderr", proc.stderr)
    return result


def emit(result: dict[str, Any]) -> None:
    """Print a cell's result as the one tagged line :func:`spawn` reads."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def cell_main(run_cell: Callable[[dict[str, Any]], dict[str, Any]], argv: Sequence[str]) -> bool:
    """The child side: if ``argv`` is ``["--cell", JSON]``, run the cell, :func:`emit` its result
    (a :class:`Skip` becomes ``{**cell, "skip": reason}``) and return True; else return False."""
    if len(argv) < 2 or argv[0] != "--cell":
        return False
    cell = json.loads(argv[1])
    try:
        result = run_cell(cell)
    except Skip as why:
        result = {**cell, "skip": str(why)}
    emit(result)
    return True


# --- results ----------------------------------------------------------------------------------


def goal(goal_: str, measured: float | None, limit: float | None, unit: str = "x") -> dict[str, Any]:
    """One goal in the shape every program reports: ``met`` is ``measured <= limit`` (None if
    either is missing: reported, not held to a limit)."""
    met = None if measured is None or limit is None else bool(measured <= limit)
    return {"goal": goal_, "measured": measured, "limit": limit, "unit": unit, "met": met}


def write_json(path: str, *, program: str, machine: dict[str, Any], cells: list[dict[str, Any]],
               goals: list[dict[str, Any]], **extra: Any) -> None:
    """The JSON every program writes with ``--json``: the machine, every cell's record, the goals
    (each from :func:`goal`), and whatever the program adds (its own tables' rows)."""
    payload = {"program": program, "machine": machine, "cells": cells, "goals": goals, **extra}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1, default=str)


# --- memory, versions, formatting ---------------------------------------------------------------------


def warm_free_pages(nbytes: int, folder: str | None = None) -> None:
    """Touch then free ``nbytes`` of anonymous memory and (with ``folder``) write and unlink a
    scratch file of ``nbytes``, so the free pages the timed step takes are host-backed.

    The content is distinct in every page (a counter), never a repeated pattern: the host may
    merge identical pages, and a write to a merged page is slow again.
    """
    block = np.arange(max(nbytes, 8) // 8, dtype=np.uint64)
    del block
    if folder is not None:
        chunk = np.arange(2 * MiB, dtype=np.uint64)  # 16 MiB
        path = os.path.join(folder, ".scratch")
        with open(path, "wb") as f:
            left = nbytes
            while left > 0:
                f.write(chunk.data[: min(left, chunk.nbytes)])
                left -= chunk.nbytes
                chunk += chunk.size
        os.unlink(path)


def version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def fmt_ns(ns: float | None) -> str:
    """``1,234 ns`` / ``12.3 us`` / ``1.23 ms``."""
    if ns is None:
        return "-"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e4:
        return f"{ns / 1e3:.1f} us"
    return f"{ns:,.0f} ns"


def fmt_size(size: int) -> str:
    """An element count: ``1M`` for exact mebi-counts, else the number."""
    return f"{size >> 20}M" if size >= MiB and size % MiB == 0 else str(size)


def machine_record(folder: str) -> dict[str, object]:
    """The one machine record every benchmark's JSON carries: CPU, cores, RAM, kernel, the
    file system under ``folder``, the Python packages that matter, gpuvars' commit (marked
    when its sources differ from it), and what the GPUs are (from ``nvidia-smi`` if any)."""
    import platform
    import subprocess

    info: dict[str, object] = {"python": platform.python_version(), "kernel": platform.release(),
                               "arch": platform.machine(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
        with open("/proc/meminfo") as f:
            info["ram_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
        best = ("", "?", "?")
        real = os.path.realpath(folder)
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                    best = (mnt, fstype, dev)
        info["filesystem"] = f"{best[1]} on {best[2]} (mounted at {best[0]})"
    except OSError:
        pass
    info["packages"] = {p: version(p) for p in ("numpy", "safetensors", "xxhash", "jax", "cupy-cuda13x", "cupy-cuda12x",
                                                "torch", "orbax-checkpoint", "optax", "matplotlib")}
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        changed = subprocess.run(["git", "--no-optional-locks", "-C", here, "status", "--porcelain", "--", "gpuvars",
                                  "backends"], check=False, capture_output=True, text=True, timeout=10).stdout.strip()
        info["commit"] = f"{commit}+uncommitted changes" if commit and changed else commit
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], check=False,
                             capture_output=True, text=True, timeout=20)
        info["gpus"] = [ln.strip() for ln in smi.stdout.splitlines() if ln.strip()] if smi.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        info["gpus"] = []
    return info


def machine_line(m: dict[str, object]) -> str:
    """The machine record in one line (for tables and figure captions)."""
    gpus = m.get("gpus") or []
    gpu = f", GPUs: {', '.join(map(str, gpus))}" if gpus else ", no GPU"  # type: ignore[call-overload]
    return (f"{m.get('cpu', '?')}, {m.get('cores')} cores, {m.get('ram_gib', '?')} GiB RAM{gpu}, Linux {m.get('kernel')}, "
            f"files on {m.get('filesystem', '?')}; Python {m.get('python')}; gpuvars @ {m.get('commit')}")
