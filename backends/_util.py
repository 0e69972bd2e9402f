"""Host-side helpers shared by the backends (pure numpy; no library imports)."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

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


# --- double buffering: the order of copies and waits, apart from any library ------------------
#
# A device library supplies ``start`` (queue an asynchronous copy for one buffer and mark its
# end) and ``wait`` (block until that buffer's copy is done); these functions decide which
# buffer each chunk uses and when it may be touched, so the same code runs against a CUDA
# stream and against the numpy stand-in of the CPU tests.


def staged_out(
    total: int,
    buffers: Sequence[np.ndarray[Any, Any]],
    start: Callable[[int, int, int], None],
    wait: Callable[[int], None],
) -> Iterator[np.ndarray[Any, Any]]:
    """Yield bytes ``[0, total)`` of a device array in order, in chunks of host buffers used in turn.

    ``start(i, offset, n)`` queues the copy of bytes ``[offset, offset + n)`` into
    ``buffers[i][:n]``; ``wait(i)`` returns once that copy has landed. While the caller
    holds chunk k (in buffer ``k % len(buffers)``) the next chunks are already being copied
    into the other buffers; a buffer is refilled only after the caller asked for the chunk
    after the one it held. Copies still queued when the caller stops early are the
    caller's to drain before the buffers are reused.
    """
    size = min(int(b.nbytes) for b in buffers)
    if total and size <= 0:
        raise ValueError(f"staging buffers must be non-empty to move {total} bytes")
    spans = [(off, min(size, total - off)) for off in range(0, total, size or 1)]
    depth = len(buffers)
    issued = 0
    for k, (_, n) in enumerate(spans):
        # every chunk before k has been handed out and given back: chunks up to k + depth - 1
        # reuse buffers that are free now
        while issued < len(spans) and issued < k + depth:
            off_i, n_i = spans[issued]
            start(issued % depth, off_i, n_i)
            issued += 1
        wait(k % depth)
        yield buffers[k % depth][:n]


def staged_in(
    chunks: Iterator[memoryview],
    depth: int,
    start: Callable[[int, memoryview, int], None],
    wait: Callable[[int], None],
) -> int:
    """Copy host ``chunks`` to consecutive device offsets; returns the bytes queued.

    ``chunks`` fills ``depth`` host buffers in turn (chunk k lands in buffer ``k % depth``)
    when it is advanced; ``start(i, view, offset)`` queues the copy of ``view`` (in buffer
    i) to device byte ``offset``; ``wait(i)`` returns once buffer i's last copy is done.
    A buffer is waited for before ``chunks`` refills it, so the host reads chunk k + 1
    while chunk k crosses to the device. The copies still queued when this returns (or
    raises) are the caller's to drain.
    """
    pending = [False] * depth
    offset = k = 0
    while True:
        i = k % depth
        if pending[i]:
            wait(i)
            pending[i] = False
        view = next(chunks, None)
        if view is None:
            return offset
        if view.nbytes:
            start(i, view, offset)
            pending[i] = True
        offset += view.nbytes
        k += 1
