"""The process group: start, identity, barriers, a JSON key-value store, collectives.

The engine side of :mod:`gpuvars_backends.jax_distributed` (which alone touches JAX):
arguments are checked and defaulted here, the backend's builtin errors become
:class:`~gpuvars.errors.DistributedError` here, at one boundary. JAX is imported by the
first call that needs it, never by ``import gpuvars``. Every wait has a timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from gpuvars.errors import DistributedError, InvalidArgumentError

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "allgather",
    "barrier",
    "broadcast_from_first",
    "device_counts",
    "initialize",
    "is_initialized",
    "kv_delete",
    "kv_get",
    "kv_put",
    "num_processes",
    "process_id",
    "shutdown",
]

DEFAULT_TIMEOUT_S = 300.0
ENV_COORDINATOR = "GPUVARS_COORDINATOR"
ENV_NUM_PROCESSES = "GPUVARS_NUM_PROCESSES"
ENV_PROCESS_ID = "GPUVARS_PROCESS_ID"

_lock = threading.Lock()
_barrier_counts: dict[str, int] = {}  # name -> how many barriers of that name this process entered
_started = False
_uncaught: list[BaseException] = []  # an exception that ended the main program of this process
_hooked: list[bool] = []  # the exit hooks are installed (once per process)


def _note_uncaught(previous: Any) -> Any:
    def hook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        _uncaught.append(exc)
        previous(kind, exc, tb)

    return hook


def _leave_at_once_on_failure() -> None:
    """At exit after an uncaught exception: end now, with status 1. JAX's client shuts down
    at interpreter teardown (after this atexit handler) and would wait at its shutdown
    barrier for every other process, up to the whole timeout; the others learn of the
    failure from the launcher, or from the service when its heartbeats stop."""
    if _uncaught and _started:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(1)


def _backend() -> ModuleType:
    try:
        from gpuvars_backends import jax_distributed
    except ImportError as exc:
        raise DistributedError(f"gpuvars.distributed runs on JAX's distributed runtime: {exc}") from exc
    return jax_distributed


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    """The backend's builtin errors as DistributedError naming ``what`` failed."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, TimeoutError, OSError) as exc:
        raise DistributedError(f"process {process_id()}: {what} failed: {exc}") from exc


def _env_int(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidArgumentError(f"environment variable {name}={text!r}; expected an integer") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Join a group of ``num_processes`` processes through JAX's distributed runtime.

    Call it first, before any variable lives on a JAX device (JAX fixes its devices when
    it starts). Each argument left out comes from the launcher's environment
    (``GPUVARS_COORDINATOR``, ``GPUVARS_NUM_PROCESSES``, ``GPUVARS_PROCESS_ID``; what
    ``python -m gpuvars launch`` sets).

    Args:
        coordinator_address: ``host:port`` of process 0, which runs the coordination service.
        num_processes: how many processes join.
        process_id: this process's id, ``0 <= process_id < num_processes``.
        timeout: seconds to wait for every process to join (and, at exit, to shut down).

    Raises:
        InvalidArgumentError: a missing or out-of-range argument.
        DistributedError: already initialized, JAX already started, or the group did not
            form within ``timeout``.

    Example:
        >>> import gpuvars as gv
        >>> gv.distributed.is_initialized(), gv.distributed.process_id(), gv.distributed.num_processes()
        (False, 0, 1)
    """
    global _started
    address = coordinator_address if coordinator_address is not None else os.environ.get(ENV_COORDINATOR) or None
    count = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    missing = [
        f"{arg} (or {env})"
        for arg, env, value in (
            ("coordinator_address", ENV_COORDINATOR, address),
            ("num_processes", ENV_NUM_PROCESSES, count),
            ("process_id", ENV_PROCESS_ID, pid),
        )
        if value is None
    ]
    if missing:
        raise InvalidArgumentError(f"gv.distributed.initialize needs {', '.join(missing)}")
    assert address is not None and count is not None and pid is not None
    if not isinstance(address, str) or ":" not in address:
        raise InvalidArgumentError(f"coordinator_address must be 'host:port', got {address!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidArgumentError(f"num_processes must be an int >= 1, got {count!r}")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < count:
        raise InvalidArgumentError(f"process_id must be an int in [0, {count}), got {pid!r}")
    if not timeout > 0:
        raise InvalidArgumentError(f"timeout must be > 0 seconds, got {timeout!r}")
    backend = _backend()
    with _lock:
        if _started or backend.is_initialized():
            raise DistributedError("gv.distributed.initialize was already called in this process")
        try:
            backend.initialize(address, count, pid, float(timeout))
        except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
            raise DistributedError(
                f"process {pid} of {count}: joining the group at {address} failed within {timeout:g}s "
                f"(call gv.distributed.initialize before anything uses JAX): {exc}"
            ) from exc
        _started = True
        _barrier_counts.clear()
        if not _hooked:
            _hooked.append(True)
            sys.excepthook = _note_uncaught(sys.excepthook)
            atexit.register(_leave_at_once_on_failure)


def is_initialized() -> bool:
    """Whether this process has joined a group (:func:`initialize`)."""
    return _started


def process_id() -> int:
    """This process's id in the group; 0 when it has joined none."""
    return int(_backend().process_index()) if _started else 0


def num_processes() -> int:
    """How many processes the group has; 1 when this process has joined none."""
    return int(_backend().process_count()) if _started else 1


def _require(what: str) -> ModuleType:
    if not _started:
        raise DistributedError(f"{what} needs gv.distributed.initialize(...) first")
    return _backend()


def _check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidArgumentError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    return float(timeout)


def barrier(name: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Wait until every process reached the barrier ``name`` (the coordination service's).

    Every process must pass the same barriers in the same order: the k-th barrier called
    ``name`` of one process meets the k-th of the others (its id is ``name`` and k).

    Raises:
        DistributedError: ``timeout`` seconds passed; ``processes`` (and the message) name
            the processes that did not arrive, as far as the service reports them.
    """
    backend = _require(f"barrier {name!r}")
    timeout = _check_timeout(timeout)
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"a barrier's name must be a non-empty string, got {name!r}")
    with _lock:
        k = _barrier_counts.get(name, 0)
        _barrier_counts[name] = k + 1
    me = process_id()
    try:
        backend.barrier(f"gpuvars/{name}/{k}", timeout)
    except backend.BarrierTimeout as exc:
        late = tuple(exc.missing)
        who = f"process(es) {', '.join(map(str, late))} did not arrive" if late else "some process did not arrive"
        raise DistributedError(
            f"process {me}: barrier {name!r} (#{k}) timed out after {timeout:g}s: {who}", late
        ) from exc
    except RuntimeError as exc:
        raise DistributedError(f"process {me}: barrier {name!r} (#{k}) failed: {exc}") from exc


def kv_put(key: str, value: Any) -> None:
    """Publish the JSON-serializable ``value`` under ``key`` for every process (write once)."""
    backend = _require(f"kv_put({key!r})")
    if not isinstance(key, str) or not key:
        raise InvalidArgumentError(f"a key must be a non-empty string, got {key!r}")
    try:
        text = json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"kv_put({key!r}): the value is not JSON-serializable: {exc}") from None
    with _mapped(f"kv_put({key!r})"):
        backend.kv_set(f"gpuvars/kv/{key}", text)


def kv_delete(key: str) -> None:
    """Remove what :func:`kv_put` published under ``key`` and under ``key/...`` (no error if
    nothing was). Only the publisher's own protocol knows when every reader is done."""
    backend = _require(f"kv_delete({key!r})")
    if not isinstance(key, str) or not key:
        raise InvalidArgumentError(f"a key must be a non-empty string, got {key!r}")
    with _mapped(f"kv_delete({key!r})"):
        backend.kv_delete(f"gpuvars/kv/{key}")


def kv_get(key: str, timeout: float = DEFAULT_TIMEOUT_S) -> Any:
    """The value some process published under ``key``, waiting up to ``timeout`` seconds.

    Raises:
        DistributedError: nothing was published under ``key`` within ``timeout``.
    """
    backend = _require(f"kv_get({key!r})")
    timeout = _check_timeout(timeout)
    try:
        text = backend.kv_get(f"gpuvars/kv/{key}", timeout)
    except TimeoutError as exc:
        raise DistributedError(
            f"process {process_id()}: kv_get({key!r}): no process published it within {timeout:g}s"
        ) from exc
    except RuntimeError as exc:
        raise DistributedError(f"process {process_id()}: kv_get({key!r}) failed: {exc}") from exc
    return json.loads(text)


def shutdown() -> None:
    """Leave the group (JAX also does this at exit); :func:`initialize` may be called again."""
    global _started
    with _lock:
        if not _started:
            return
        with _mapped("shutdown"):
            _backend().shutdown()
        _started = False
        _barrier_counts.clear()


def allgather(value: np.ndarray[Any, Any], what: str) -> np.ndarray[Any, Any]:
    """Every process's host array ``value`` (same shape and dtype everywhere), stacked in
    process order; ``what`` names the operation in errors."""
    backend = _require(what)
    with _mapped(what):
        out: np.ndarray[Any, Any] = backend.allgather(value)
    return out


def broadcast_from_first(value: np.ndarray[Any, Any], what: str) -> np.ndarray[Any, Any]:
    """Process 0's host array ``value`` on every process (same shape and dtype everywhere)."""
    backend = _require(what)
    with _mapped(what):
        out: np.ndarray[Any, Any] = backend.broadcast_from_first(value)
    return out


def device_counts(platform: str) -> list[int]:
    """How many ``platform`` ("cpu"/"gpu") devices JAX sees on each process, in process order;
    ``[]`` when this process has joined no group (nothing is imported then)."""
    if not _started:
        return []
    with _mapped(f"listing every process's {platform} devices"):
        counts: list[int] = _backend().process_device_counts(platform)
    return counts
