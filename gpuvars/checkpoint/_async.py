"""Asynchronous saves: the future a ``Saver.save(..., blocking=False)`` returns, the writer
threads, and the wait at interpreter exit.

The call pins every variable (``_write.prepare_save``) and returns; a daemon thread writes
and commits. Threads, not processes: pwrite, memcpy and xxh3 release the GIL, and a fork
would copy the model (DESIGN "Asynchronous saves"). At exit, saves still in flight are
waited for, with a warning, so a script that ends right after ``save(blocking=False)``
still leaves its checkpoint (Python runs ``atexit`` hooks while daemon threads still run).
"""

from __future__ import annotations

import atexit
import threading
import warnings
import weakref
from typing import Any, Callable

from gpuvars.checkpoint._write import SavePlan
from gpuvars.errors import InvalidArgumentError

__all__ = ["SaveFuture", "start"]

_in_flight: weakref.WeakSet[SaveFuture] = weakref.WeakSet()


def _check_timeout(timeout: float | None, what: str) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
        raise InvalidArgumentError(f"{what}: timeout must be None or a number >= 0, got {timeout!r}")


class SaveFuture:
    """A save in flight (``gv.Saver.save(..., blocking=False)``); every variable's value is
    already fixed: the one it had at the call.

    Example:
        >>> import gpuvars as gv, numpy as np, tempfile, os
        >>> with gv.Registry():
        ...     w = gv.Variable(np.zeros(3), name="w")
        ...     saver = gv.Saver()
        ...     fut = saver.save(os.path.join(tempfile.mkdtemp(), "m"), global_step=1, blocking=False)
        ...     _ = w.assign(np.ones(3))  # training goes on; the checkpoint holds the zeros
        ...     prefix = fut.result()
        ...     _ = saver.restore(prefix)
        ...     os.path.basename(prefix), w.numpy().tolist(), fut.done(), fut.progress == fut.total_bytes
        ('m-1', [0.0, 0.0, 0.0], True, True)
    """

    def __init__(self, plan: SavePlan) -> None:
        self._plan = plan
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[SaveFuture], Any]] = []
        self._lock = threading.Lock()
        self._reported = False  # the error reached the user (result() raised it)

    def __repr__(self) -> str:
        state = "failed" if self._error is not None else "done" if self.done() else "running"
        return f"<gpuvars.SaveFuture {self.prefix!r} {state} {self.progress}/{self.total_bytes} bytes>"

    @property
    def prefix(self) -> str:
        """The prefix being written (what :meth:`result` returns)."""
        return self._plan.prefix

    @property
    def progress(self) -> int:
        """Bytes of tensors written so far."""
        return self._plan.written

    @property
    def total_bytes(self) -> int:
        """Bytes of tensors this save writes."""
        return self._plan.total

    def done(self) -> bool:
        """Whether the save has ended (committed or failed)."""
        return self._finished.is_set()

    def wait_snapshot(self, timeout: float | None = None) -> bool:
        """Wait until every variable's bytes are captured (written, or copied by a mutation):
        from then on no mutation waits on this save. False if ``timeout`` seconds passed first."""
        _check_timeout(timeout, "SaveFuture.wait_snapshot")
        return self._plan.snapshot.wait_captured(timeout)

    def result(self, timeout: float | None = None) -> str:
        """The committed prefix, once the index, the state file and retention are done.

        Raises:
            TimeoutError: not done after ``timeout`` seconds (the save goes on).
            CheckpointError: the save failed (e.g. CheckpointWriteError: the disk is full);
                nothing of it is visible and earlier checkpoints are untouched.
        """
        _check_timeout(timeout, "SaveFuture.result")
        if not self._finished.wait(timeout):
            raise TimeoutError(
                f"checkpoint {self.prefix!r} is still being written after {timeout} s "
                f"({self.progress} of {self.total_bytes} bytes)"
            )
        if self._error is not None:
            self._reported = True
            raise self._error
        return self.prefix

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The save's error (None when it committed); waits like :meth:`result`."""
        _check_timeout(timeout, "SaveFuture.exception")
        if not self._finished.wait(timeout):
            raise TimeoutError(f"checkpoint {self.prefix!r} is still being written after {timeout} s")
        return self._error

    def add_done_callback(self, fn: Callable[[SaveFuture], Any]) -> None:
        """Call ``fn(future)`` when the save ends, from the writer thread (at once if it has
        ended). An exception of ``fn`` is logged as a warning, never raised into the save."""
        if not callable(fn):
            raise InvalidArgumentError(f"add_done_callback needs a callable, got {fn!r}")
        with self._lock:
            if not self._finished.is_set():
                self._callbacks.append(fn)
                return
        _call(fn, self)

    def _finish(self, error: BaseException | None) -> None:
        self._error = error
        with self._lock:
            self._finished.set()
            callbacks, self._callbacks = self._callbacks, []
        _in_flight.discard(self)
        for fn in callbacks:
            _call(fn, self)


def _call(fn: Callable[[SaveFuture], Any], fut: SaveFuture) -> None:
    try:
        fn(fut)
    except Exception as exc:  # a user's callback must not break the writer thread
        warnings.warn(f"a done-callback of the save of {fut.prefix!r} raised {type(exc).__name__}: {exc}",
                      RuntimeWarning, stacklevel=2)


def start(plan: SavePlan, run: Callable[[], None]) -> SaveFuture:
    """Run ``run`` (write, commit, update the state file) in a writer thread; its future."""
    fut = SaveFuture(plan)

    def body() -> None:
        error: BaseException | None = None
        try:
            run()
        except BaseException as exc:  # kept, raised from result(), the next save(), close()
            error = exc
        finally:
            plan.snapshot.release()
        fut._finish(error)

    _in_flight.add(fut)
    threading.Thread(target=body, name=f"gpuvars-save-{plan.prefix}", daemon=True).start()
    return fut


@atexit.register
def _wait_at_exit() -> None:
    pending = [f for f in list(_in_flight) if not f.done()]
    if not pending:
        return
    warnings.warn(
        f"gpuvars: waiting at exit for {len(pending)} checkpoint save(s) in flight "
        f"({', '.join(repr(f.prefix) for f in pending)}); call saver.wait_until_finished() or saver.close() "
        "before the end of the program",
        RuntimeWarning, stacklevel=1,
    )
    for fut in pending:
        fut._finished.wait()
