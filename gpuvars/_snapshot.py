"""The value of each variable at a save's call (G1), in bounded memory (G3).

A save *pins* the storage of every variable it writes, at the call. The pin is the
write barrier: until the writer has read a pinned buffer, a mutation of that variable
first *captures* it. Rebinding backends (JAX) never mutate an array, so their pins are
captured at once and free: the pin keeps the old immutable array. In-place backends
(numpy, CuPy) keep the live buffer while it is unchanged; the first mutation before the
writer reaches it copies it into memory charged to the snapshot's budget
(``copy_on_write_bytes``) or, when the budget is spent, waits until the writer has
written it (back-pressure; the writer takes such a variable next). A pin the writer is
reading makes a mutation wait for the end of the read. The bytes hashed are the bytes
written, because nobody mutates them in between.

Locking. A mutation runs under its variable's lock (held by :mod:`gpuvars.variable`) and
calls :meth:`Pin.capture` there; a pin is made under the same lock, so a mutation in
flight finishes before the pin sees the buffer. Pins, the budget and the queue of
urgent pins share one condition per snapshot; the writer never takes a variable's lock,
so a mutation waiting on the condition cannot deadlock with the writer. This module
imports nothing of gpuvars: it sees a variable as its storage and backend.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterator

__all__ = ["Pin", "Snapshot"]

_PENDING, _CAPTURED, _DONE = 0, 1, 2


class _HostPool:
    """Copy-on-write buffers of host variables, kept for the next save: a copy into memory
    already touched runs at memcpy speed, one into fresh memory pays a page fault per 4 KiB
    (~0.5 GB/s on the VMs this was measured on: a 256 MiB copy took ~0.5 s fresh, ~40 ms
    reused). At most ``keep`` bytes are kept; exact sizes only (a training loop's variables
    come back with the same sizes every save)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._free: dict[int, list[Any]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> Any:
        with self._lock:
            bucket = self._free.get(nbytes)
            if not bucket:
                return None
            self._bytes -= nbytes
            return bucket.pop()

    def give(self, buf: Any) -> None:
        with self._lock:
            if self._bytes + buf.nbytes <= self.keep:
                self._free.setdefault(buf.nbytes, []).append(buf)
                self._bytes += buf.nbytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._bytes = 0

    @property
    def held(self) -> int:
        return self._bytes


host_pool = _HostPool(512 << 20)


def _host_copy(storage: Any) -> Any:
    """A copy of a host array, in a pooled buffer when one of its size is free."""
    import numpy as np

    buf = host_pool.take(storage.nbytes) if storage.nbytes else None
    if buf is None:
        return np.array(storage, copy=True, order="C")
    out = buf.view(storage.dtype).reshape(storage.shape)
    np.copyto(out, storage)
    return out


class Snapshot:
    """The pins of one save, their copy-on-write budget and the writer's urgent queue.

    Args:
        copy_on_write_bytes: the most bytes held in copies at once (None: no limit).
    """

    def __init__(self, copy_on_write_bytes: int | None) -> None:
        # the condition's own lock, taken raw on the per-tensor paths (pin, begin/end of a
        # run's reads): ``with cond`` is a Python-level __enter__/__exit__ pair, twice the cost
        self._lock = threading.Lock()
        self.cond = threading.Condition(self._lock)
        self.limit = copy_on_write_bytes
        self.held = 0  #: bytes held in copies now
        self.peak = 0  #: the most bytes ever held in copies
        self.copies = 0  #: how many pins were captured by a copy
        self.waits = 0  #: how many mutations waited for the writer (budget spent or a read in flight)
        self.pins: list[Pin] = []
        self._uncaptured = 0
        self._urgent: list[Pin] = []
        self._released = False

    def pin(self, storage: Any, backend: Any, device_index: int, name: str) -> Pin:
        """A pin of ``storage`` (the caller holds the variable's lock); captured at once
        for a rebinding backend."""
        p = Pin(self, storage, backend, device_index, name)
        inplace = backend.inplace
        lock = self._lock
        lock.acquire()
        try:
            self.pins.append(p)
            if inplace:
                self._uncaptured += 1
            else:
                p.state = _CAPTURED
        finally:
            lock.release()
        return p

    @property
    def captured(self) -> bool:
        """Whether every pin is captured or written (mutations no longer wait on this save)."""
        return self._uncaptured == 0

    def wait_captured(self, timeout: float | None = None) -> bool:
        """Wait until :attr:`captured`; False when ``timeout`` passed first."""
        with self.cond:
            return self.cond.wait_for(lambda: self._uncaptured == 0, timeout)

    @property
    def has_urgent(self) -> bool:
        """Whether a mutation may be waiting for a pin (a hint, read without the lock: the
        writer asks :meth:`next_urgent` only then)."""
        return bool(self._urgent)

    def begin_reads(self, pins: list[Pin]) -> tuple[list[Any], list[Pin]]:
        """:meth:`Pin.reading` for a run of pins under one acquisition of the lock: the
        bytes to write for each, and the pins whose live buffer is read (mutations of
        those wait until :meth:`end_reads`). Nothing is begun when one is released."""
        lock = self._lock
        lock.acquire()
        try:
            for p in pins:
                if p.state == _DONE:
                    raise RuntimeError(f"the snapshot of {p.name!r} was already released")
            arrays: list[Any] = []
            live: list[Pin] = []
            for p in pins:
                if p.state == _PENDING:
                    p.readers += 1
                    live.append(p)
                    arrays.append(p.storage)
                else:
                    arrays.append(p.copy if p.copy is not None else p.storage)
            return arrays, live
        finally:
            lock.release()

    def end_reads(self, pins: list[Pin], live: list[Pin]) -> None:
        """End the reads :meth:`begin_reads` began (also after a failed write), under one
        acquisition of the lock; a mutation waiting on one of them goes on."""
        with self.cond:
            for p in live:
                p.readers -= 1
            for p in pins:
                p.uses -= 1
                if p.uses <= 0 and p.state != _DONE:
                    p._finish()
            self.cond.notify_all()

    def next_urgent(self) -> Pin | None:
        """A pin a mutation waits for (the writer takes it next), or None."""
        with self.cond:
            while self._urgent:
                p = self._urgent.pop(0)
                if p.state == _PENDING:
                    return p
            return None

    def release(self) -> None:
        """End the snapshot (after the commit, or a failure): every pin is done, every copy
        freed, every waiting mutation goes on. Idempotent."""
        with self.cond:
            self._released = True
            for p in self.pins:
                if p.state != _DONE:
                    p._finish()
            self._urgent.clear()
            self.cond.notify_all()

    def _captured_one(self) -> None:
        self._uncaptured -= 1
        if self._uncaptured == 0:
            self.cond.notify_all()


class Pin:
    """One variable's buffer as a save saw it at the call."""

    __slots__ = ("snapshot", "storage", "backend", "device_index", "name", "nbytes", "state", "copy",
                 "readers", "uses", "urgent")

    def __init__(self, snapshot: Snapshot, storage: Any, backend: Any, device_index: int, name: str) -> None:
        self.snapshot = snapshot
        self.storage = storage
        self.backend = backend
        self.device_index = device_index
        self.name = name
        self.nbytes = int(math.prod(storage.shape)) * storage.dtype.itemsize
        self.state = _PENDING
        self.copy: Any = None
        self.readers = 0  # live reads in flight
        self.uses = 1  # reads the save will make (a mirrored primary is read for two files)
        self.urgent = False

    @property
    def done(self) -> bool:
        return self.state == _DONE

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.storage.shape)

    @property
    def dtype(self) -> Any:
        return self.storage.dtype

    def add_use(self) -> None:
        with self.snapshot.cond:
            self.uses += 1

    def capture(self) -> None:
        """Called by a mutation of the pinned variable, under its lock, before it writes:
        copy the buffer (budget allowing) or wait until the writer has read it."""
        snap = self.snapshot
        with snap.cond:
            while True:
                if self.state != _PENDING:
                    return
                if self.readers == 0 and (snap.limit is None or snap.held + self.nbytes <= snap.limit):
                    snap.held += self.nbytes
                    snap.peak = max(snap.peak, snap.held)
                    storage = self.storage
                    break
                snap.waits += 1
                if not self.urgent:
                    self.urgent = True
                    snap._urgent.append(self)
                snap.cond.wait()
        try:  # copy outside the condition: the writer may read the live buffer meanwhile (it is unchanged)
            if self.backend.host:
                copy = _host_copy(storage)
            else:
                copy = self.backend.asarray(storage, storage.dtype, self.device_index)
        except BaseException:
            with snap.cond:
                snap.held -= self.nbytes
                snap.cond.notify_all()
            raise
        with snap.cond:
            if self.state != _PENDING:  # written (or released) while we copied
                snap.held -= self.nbytes
                snap.cond.notify_all()
            else:
                self.copy, self.state = copy, _CAPTURED
                snap.copies += 1
                snap._captured_one()
            snap.cond.wait_for(lambda: self.readers == 0)  # a read of the live buffer ends first

    @contextlib.contextmanager
    def reading(self) -> Iterator[Any]:
        """The bytes to write: the copy, or the live buffer (mutations wait meanwhile)."""
        snap = self.snapshot
        with snap.cond:
            if self.state == _DONE:
                raise RuntimeError(f"the snapshot of {self.name!r} was already released")
            live = self.state == _PENDING
            array = self.storage if live else (self.copy if self.copy is not None else self.storage)
            if live:
                self.readers += 1
        try:
            yield array
        finally:
            with snap.cond:
                if live:
                    self.readers -= 1
                self.uses -= 1
                if self.uses <= 0 and self.state != _DONE:
                    self._finish()
                snap.cond.notify_all()

    def _finish(self) -> None:
        """Mark done and free the copy (the caller holds the snapshot's condition)."""
        snap = self.snapshot
        if self.state == _PENDING:
            snap._captured_one()
        if self.copy is not None:
            snap.held -= self.nbytes
            if self.backend.host and self.copy.nbytes:
                host_pool.give(self.copy.reshape(-1).view("uint8"))
            self.copy = None
        self.state = _DONE
        self.storage = None
