"""Spread tensor I/O over a few threads: pread, memcpy and xxh3 all release the GIL.

Work is split into one contiguous run of tensors per thread with about equal bytes, so
20,000 tiny tensors cost a handful of thread hand-offs, not 20,000. And :func:`gc_paused`,
for the bulk creation of per-tensor objects around it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import os
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

THREADS = min(4, os.cpu_count() or 1)
MIN_PARALLEL_BYTES = 64 << 20  # below this, threads cost more than they save


def split(items: Sequence[T], sizes: Sequence[int], parts: int) -> list[list[T]]:
    """``items`` in order, cut into at most ``parts`` contiguous runs of about equal total size."""
    total = sum(sizes)
    if parts <= 1 or len(items) <= 1 or total == 0:
        return [list(items)] if items else []
    runs: list[list[T]] = [[]]
    target, acc = total / parts, 0
    for item, size in zip(items, sizes):
        if acc >= target * len(runs) and len(runs) < parts:
            runs.append([])
        runs[-1].append(item)
        acc += size
    return [r for r in runs if r]


def run(items: Sequence[T], sizes: Sequence[int], fn: Callable[[T], R]) -> list[R]:
    """``[fn(item) for item in items]``, on up to THREADS threads when the bytes justify it.

    Results keep ``items``' order; the first exception is raised after every thread stops.
    """
    if THREADS <= 1 or sum(sizes) < MIN_PARALLEL_BYTES or len(items) < 2:
        return [fn(item) for item in items]
    groups = split(items, sizes, THREADS)
    with concurrent.futures.ThreadPoolExecutor(len(groups), thread_name_prefix="gpuvars-io") as pool:
        futures = [pool.submit(lambda g: [fn(item) for item in g], g) for g in groups]
        concurrent.futures.wait(futures)
    out: list[R] = []
    for f in futures:
        out.extend(f.result())  # re-raises the first failure, in order
    return out


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The garbage collector off inside (and back on after, also on error, if it was on).

    Per-tensor objects (JSON dicts, index entries, pins) are made by the hundred thousand
    and none of them forms a cycle, yet each allocation counts toward a collection: measured
    on 200,000 tensors, collections were 26-42% of a save or restore. Nested and concurrent
    pauses are safe: only the pause that found the collector on turns it back on.
    """
    was = gc.isenabled()
    if was:
        gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
