"""Host-side helpers shared by the backends (pure numpy; no library imports)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def unique_rounds(indices: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
    """Split positions of ``indices`` into rounds in which every index appears once.

    Applying a non-accumulating update (``a[i] *= u``) round by round gives the same
    result as an accumulating ``ufunc.at``: repeated indices are combined in order.
    """
    flat = np.asarray(indices).reshape(-1)
    order = np.argsort(flat, kind="stable")
    sorted_idx = flat[order]
    starts = np.r_[True, sorted_idx[1:] != sorted_idx[:-1]] if flat.size else np.zeros(0, bool)
    # rank of each position among equal indices: 0 for the first occurrence, 1 next, ...
    group_start = np.maximum.accumulate(np.where(starts, np.arange(flat.size), 0)) if flat.size else flat
    rank = np.empty(flat.size, dtype=np.int64)
    rank[order] = np.arange(flat.size) - group_start
    return [np.nonzero(rank == r)[0] for r in range(int(rank.max()) + 1 if flat.size else 0)]


def truncated(draw: Callable[[int], Any], n: int, lo: float, hi: float, xp: Any) -> Any:
    """Draw ``n`` standard normals, redrawing any outside ``[lo, hi]`` (TF's truncated_normal)."""
    out = draw(n)
    bad = xp.nonzero((out < lo) | (out > hi))[0]
    while bad.size:
        out[bad] = draw(int(bad.size))
        bad = bad[(out[bad] < lo) | (out[bad] > hi)]
    return out


def draw_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype to draw in: float64 for float64, float32 for every narrower float."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
