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
