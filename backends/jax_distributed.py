"""JAX's distributed runtime: the one module that touches ``jax.distributed``, its
coordination service and its cross-process collectives; raises builtins only.

Every wait here is bounded: barriers and key-value reads take a timeout and a deadline
becomes :class:`BarrierTimeout` / :class:`TimeoutError`. ``multihost_utils.sync_global_devices``
(no timeout) is never used. Collectives run over JAX CPU arrays made from host numpy
arrays (gloo on CPU), so numpy, CuPy and JAX variables all reduce the same way; they are
built on the CPU devices by name, not with ``multihost_utils.process_allgather`` /
``broadcast_one_to_all``, which use the default backend's devices: with JAX's CUDA plugin
installed those are the GPUs (NCCL, a copy on every local GPU, a JAX GPU client started beside
CuPy's).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Sequence

import numpy as np

try:
    import jax
    from jax._src import distributed as _distributed
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("multi-process runs need jax: pip install 'gpuvars[jax]'") from err

__all__ = [
    "BarrierTimeout",
    "allgather",
    "barrier",
    "broadcast_from_first",
    "initialize",
    "is_initialized",
    "kv_delete",
    "kv_get",
    "kv_set",
    "process_count",
    "process_device_counts",
    "process_index",
    "shutdown",
]


class BarrierTimeout(TimeoutError):
    """A barrier's deadline passed; ``missing`` holds the process ids the service named
    (empty when it named none)."""

    def __init__(self, message: str, missing: tuple[int, ...]) -> None:
        super().__init__(message)
        self.missing = missing


def _client() -> Any:
    client = _distributed.global_state.client
    if client is None:
        raise RuntimeError("the distributed runtime is not initialized")
    return client


def initialize(address: str, num_processes: int, process_id: int, timeout_s: float) -> None:
    """``jax.distributed.initialize`` with gloo CPU collectives and bounded start and shutdown."""
    config: Any = jax.config  # jax.config.update is untyped
    config.update("jax_cpu_collectives_implementation", "gloo")
    seconds = max(1, int(round(timeout_s)))
    start: Any = jax.distributed.initialize  # its keyword set depends on the JAX version
    bounds: dict[str, int] = {"initialization_timeout": seconds}
    if "shutdown_timeout_seconds" in inspect.signature(start).parameters:
        bounds["shutdown_timeout_seconds"] = seconds  # JAX >= 0.8.1; older ones wait their default
    start(
        coordinator_address=address,
        num_processes=num_processes,
        process_id=process_id,
        **bounds,
    )


def is_initialized() -> bool:
    return _distributed.global_state.client is not None


def shutdown() -> None:
    jax.distributed.shutdown()  # type: ignore[no-untyped-call]


def process_index() -> int:
    return int(jax.process_index())


def process_count() -> int:
    return int(jax.process_count())


def process_device_counts(platform: str) -> list[int]:
    """How many ``platform`` ("cpu"/"gpu") devices each process has, in process order, from
    JAX's global device list (0 for every process when JAX has no such platform)."""
    counts = [0] * int(jax.process_count())
    try:
        devices = jax.devices(platform)
    except RuntimeError:  # "Unknown backend: 'gpu' requested, but no platforms ..."
        return counts
    for d in devices:
        counts[int(d.process_index)] += 1
    return counts


def _deadline(exc: BaseException) -> bool:
    return "DEADLINE_EXCEEDED" in str(exc)


def _missing(message: str) -> tuple[int, ...]:
    """The task ids after "timed out task names:" in the service's barrier message."""
    _, found, rest = message.partition("timed out task names:")
    if not found:
        return ()
    ids: list[int] = []
    for line in rest.strip().splitlines():
        line = line.strip()
        if not line:
            break
        m = re.fullmatch(r"(?:.*task:)?(\d+)", line)
        if m is None:
            break
        ids.append(int(m.group(1)))
    return tuple(sorted(set(ids)))


def barrier(barrier_id: str, timeout_s: float, process_ids: Sequence[int] | None = None) -> None:
    """Wait until every process (or ``process_ids``) reached ``barrier_id``; ids are single use."""
    ms = max(1, int(timeout_s * 1000))
    try:
        if process_ids is None:
            _client().wait_at_barrier(barrier_id, ms)
        else:
            _client().wait_at_barrier(barrier_id, ms, list(process_ids))
    except jax.errors.JaxRuntimeError as exc:
        if _deadline(exc):
            raise BarrierTimeout(str(exc), _missing(str(exc))) from exc
        raise RuntimeError(str(exc)) from exc


def kv_set(key: str, value: str, overwrite: bool = False) -> None:
    try:
        _client().key_value_set(key, value, allow_overwrite=overwrite)
    except jax.errors.JaxRuntimeError as exc:
        raise RuntimeError(str(exc)) from exc


def kv_delete(key: str) -> None:
    """Remove ``key`` and every key under ``key/`` (the service's directory semantics)."""
    try:
        _client().key_value_delete(key)
    except jax.errors.JaxRuntimeError as exc:
        raise RuntimeError(str(exc)) from exc


def kv_get(key: str, timeout_s: float) -> str:
    """The value of ``key``, waiting up to ``timeout_s`` for some process to set it."""
    try:
        return str(_client().blocking_key_value_get(key, max(1, int(timeout_s * 1000))))
    except jax.errors.JaxRuntimeError as exc:
        if _deadline(exc):
            raise TimeoutError(str(exc)) from exc
        raise RuntimeError(str(exc)) from exc


# Collectives move raw bytes (uint8), so every dtype crosses exactly: JAX with x64 off
# would narrow float64/int64, and has no object or string dtypes to refuse silently.


def _as_bytes(value: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.ascontiguousarray(value).reshape(-1).view(np.uint8)


# module-level functions, so each jit below finds its compiled executable again
def _identity(x: Any) -> Any:
    return x


def _first_axis_sum(x: Any) -> Any:
    return x.sum(axis=0, dtype=x.dtype)


_Spec: Any = PartitionSpec  # its constructor is untyped


def _across_processes(rows: np.ndarray[Any, Any], fn: Any) -> np.ndarray[Any, Any]:
    """``fn`` over the global ``(process_count, n)`` uint8 array whose row K is process K's
    ``rows`` (shape ``(1, n)``), replicated back to every process, on the CPU devices."""
    devices = np.array(jax.devices("cpu")).reshape(jax.process_count(), -1)
    mesh = Mesh(devices, ("processes", "local"))
    by_process = NamedSharding(mesh, _Spec("processes"))
    local = [d for d in devices.flat if d.process_index == jax.process_index()]
    shards = [jax.device_put(rows, d) for d in local]
    whole = jax.make_array_from_single_device_arrays((devices.shape[0], rows.shape[1]), by_process, shards)
    out = jax.jit(fn, out_shardings=NamedSharding(mesh, _Spec()))(whole)
    return np.asarray(out.addressable_data(0))


def allgather(value: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Every process's ``value`` (same shape and dtype everywhere), stacked in process order."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value[None].copy()
    try:
        out = _across_processes(_as_bytes(value)[None], _identity)
    except jax.errors.JaxRuntimeError as exc:
        raise RuntimeError(str(exc)) from exc
    return np.ascontiguousarray(out).view(value.dtype).reshape((out.shape[0],) + value.shape)


def broadcast_from_first(value: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Process 0's ``value`` on every process (same shape and dtype everywhere)."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value.copy()
    mine = _as_bytes(value)[None]
    if jax.process_index() != 0:
        mine = np.zeros_like(mine)  # the others add nothing to the sum
    try:
        out = _across_processes(mine, _first_axis_sum)
    except jax.errors.JaxRuntimeError as exc:
        raise RuntimeError(str(exc)) from exc
    return np.ascontiguousarray(out).view(value.dtype).reshape(value.shape)
