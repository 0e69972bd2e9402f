"""Helpers the benchmark programs share (run as scripts, so ``bench/`` is on sys.path)."""

from __future__ import annotations

import importlib.metadata
import os

import numpy as np

MiB = 1 << 20


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
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        changed = subprocess.run(["git", "--no-optional-locks", "-C", here, "status", "--porcelain", "--", "gpuvars",
                                  "backends"], capture_output=True, text=True, timeout=10).stdout.strip()
        info["commit"] = f"{commit}+uncommitted changes" if commit and changed else commit
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
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
