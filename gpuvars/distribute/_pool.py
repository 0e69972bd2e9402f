"""Persistent replica threads: what ``strategy.run`` runs replicas 1..n-1 on.

A strategy's pool starts its threads on the first multi-replica ``run`` and keeps them for
the strategy's life: starting n threads per call cost more than most steps (217 us at 2
replicas, 446 us at 4, 2-core VM). The caller's thread runs replica 0 itself, so a call
wakes n - 1 threads and is woken once, by the last replica to finish.

The threads are daemons and hold no reference to the strategy: a weakref finalizer of the
strategy (also run at interpreter exit) sends each one a stop sentinel, and they end. One
call at a time reserves a pool (:meth:`ReplicaPool.acquire`, which never waits); a call that
finds it busy (another thread's ``run``, or a ``run`` nested inside a replica) runs on
fresh threads of its own (:func:`run_on_fresh_threads`), so nothing can deadlock. A
forked child starts new threads (the parent's do not exist there). Each task is a
callable run exactly as given (the caller wraps it in its context copy).
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Sequence

__all__ = ["ReplicaPool", "run_on_fresh_threads"]

Task = Callable[[], None]


class _Countdown:
    """Releases ``done`` when ``left`` tasks have called :meth:`finish` (one wake-up for the caller)."""

    __slots__ = ("_left", "_lock", "done")

    def __init__(self, left: int) -> None:
        self._left = left
        self._lock = threading.Lock()
        self.done = threading.Lock()
        self.done.acquire()

    def finish(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self.done.release()


def _worker(inbox: queue.SimpleQueue[tuple[Task, _Countdown] | None]) -> None:
    while True:
        item = inbox.get()
        if item is None:
            return
        task, countdown = item
        del item
        try:
            task()  # the task records its own outcome; an escape must not end the thread
        except BaseException:  # pragma: no cover - tasks catch everything themselves
            pass
        finally:
            # drop the task before blocking again: it references the strategy (its
            # finalizer, hence these threads' stop, must not wait for the next call)
            del task
            countdown.finish()
            del countdown


class ReplicaPool:
    """``size`` persistent daemon threads, named ``{name}-1`` .. ``{name}-{size}``."""

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._busy = threading.Lock()  # held for the whole of one call
        self._inboxes: list[queue.SimpleQueue[tuple[Task, _Countdown] | None]] = []
        self._threads: list[threading.Thread] = []
        self._pid = -1
        self._closed = False

    def _start(self) -> None:
        self._inboxes = [queue.SimpleQueue() for _ in range(self._size)]
        self._threads = [
            threading.Thread(target=_worker, args=(q,), name=f"{self._name}-{k + 1}", daemon=True)
            for k, q in enumerate(self._inboxes)
        ]
        for t in self._threads:
            t.start()
        self._pid = os.getpid()

    def acquire(self) -> bool:
        """Reserve the pool for one call; False (at once, never waiting) when it is busy or closed."""
        if not self._busy.acquire(blocking=False):
            return False
        if self._closed:
            self._busy.release()
            return False
        return True

    def release(self) -> None:
        """End the reservation :meth:`acquire` made."""
        self._busy.release()

    def run(self, first: Task, rest: Sequence[Task]) -> None:
        """Run ``first`` on this thread and ``rest`` (``size`` tasks) on the pool's threads;
        return when all have ended. The caller holds the reservation (:meth:`acquire`)."""
        if self._pid != os.getpid():  # first use, or a forked child (the parent's threads are not here)
            self._start()
        countdown = _Countdown(len(rest))
        for inbox, task in zip(self._inboxes, rest):
            inbox.put((task, countdown))
        try:
            first()
        finally:
            countdown.done.acquire()  # every other replica has finished

    def close(self) -> None:
        """Stop the threads (each ends after its current task); later calls use fresh threads."""
        self._closed = True
        if self._pid == os.getpid():
            for inbox in self._inboxes:
                inbox.put(None)
        self._inboxes, self._threads = [], []


def run_on_fresh_threads(first: Task, rest: Sequence[Task], name: str) -> None:
    """Run ``first`` on this thread and each of ``rest`` on a new thread; return when all ended."""
    threads = [threading.Thread(target=t, name=f"{name}-{k + 1}", daemon=True) for k, t in enumerate(rest)]
    for t in threads:
        t.start()
    try:
        first()
    finally:
        for t in threads:
            t.join()
