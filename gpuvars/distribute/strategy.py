"""MirroredStrategy: one replica per device, variables mirrored across them, run() in replica context."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
import weakref
from typing import Any, Callable, Iterator, Sequence

from gpuvars import placement
from gpuvars.distribute._context import (
    PerReplica,
    ReduceOp,
    ReplicaContext,
    _ReplicaAborted,
    _Rendezvous,
    _replica,
    _strategy,
    get_replica_context,
)
from gpuvars.distribute._pool import ReplicaPool, run_on_fresh_threads
from gpuvars._creator import plain_variables, variable_creator_scope
from gpuvars._transfer import on_device
from gpuvars.distribute.values import MirroredVariable, SyncOnReadVariable, reduce_values
from gpuvars.errors import InvalidArgumentError
from gpuvars.init_ops import is_deferred
from gpuvars.initializers import Initializer
from gpuvars.placement import PhysicalDevice
from gpuvars.registry import Registry
from gpuvars.variable import Variable, VariableAggregation, VariableSynchronization, check_variable_args

__all__ = ["MirroredStrategy", "ValueContext"]


class ValueContext:
    """What ``experimental_distribute_values_from_function`` passes to its function."""

    def __init__(self, replica_id: int, num_replicas: int) -> None:
        self.replica_id_in_sync_group = replica_id
        self.num_replicas_in_sync = num_replicas


class MirroredStrategy:
    """Synchronous data parallelism over devices of this process (tf.distribute.MirroredStrategy).

    Args:
        devices: device strings; default every usable GPU, else ``["/cpu:0"]``. Soft
            placement applies to each; two replicas may not share a device.

    Example:
        >>> import gpuvars as gv
        >>> strategy = gv.MirroredStrategy(["/cpu:0"])
        >>> with gv.Registry(), strategy.scope():
        ...     w = gv.Variable(1.0, name="w", aggregation=gv.VariableAggregation.SUM)
        ...     _ = strategy.run(lambda: w.assign_add(1.0))
        ...     float(w.numpy())
        2.0
    """

    def __init__(self, devices: Sequence[str] | None = None) -> None:
        if devices is None:
            placement.default_device()  # builds the device table (GPU probe)
            gpus = [d for d in placement.list_devices() if d.startswith("/gpu:")]
            devices = gpus or ["/cpu:0"]
        if isinstance(devices, str) or not isinstance(devices, Sequence) or not devices:
            raise InvalidArgumentError(f"MirroredStrategy needs a non-empty list of devices, got {devices!r}")
        resolved = [placement.resolve(d, "a MirroredStrategy replica") for d in devices]
        seen: dict[int, str] = {}
        for spec, dev in zip(devices, resolved):
            if id(dev) in seen:
                raise InvalidArgumentError(
                    f"MirroredStrategy: {spec!r} and {seen[id(dev)]!r} resolve to the same device {dev.name}; "
                    "each replica needs its own device (set_logical_devices('cpu', N) splits the host)"
                )
            seen[id(dev)] = spec
        self._devices: tuple[PhysicalDevice, ...] = tuple(resolved)
        self._lock = threading.Lock()
        self._pool: ReplicaPool | None = None  # replicas 1..n-1 of run(), started on first use
        self._rendezvous: _Rendezvous | None = None  # shared by the calls that run on the pool

    #: replicas of lower-numbered processes (a multi-process strategy's replica ids start here)
    _replica_offset = 0

    @property
    def devices(self) -> tuple[str, ...]:
        """The replicas' devices, replica 0 first."""
        return tuple(d.name for d in self._devices)

    @property
    def num_replicas_in_sync(self) -> int:
        return len(self._devices)

    @property
    def _local_replicas(self) -> int:
        """The replicas of this process (``run`` runs one thread each)."""
        return len(self._devices)

    @contextlib.contextmanager
    def scope(self) -> Iterator[MirroredStrategy]:
        """Inside, ``gv.Variable(...)`` creates a MirroredVariable (SyncOnReadVariable for
        ``synchronization=ON_READ``) with one component per replica device."""
        token = _strategy.set(self)
        try:
            with variable_creator_scope(self._create_variable):
                yield self
        finally:
            _strategy.reset(token)

    # --- variable creation (the creator scope() pushes) -------------------------------------------

    def _create_variable(
        self,
        initial_value: Any = None,
        name: str | None = None,
        dtype: Any = None,
        shape: Any = None,
        validate_shape: bool = True,
        trainable: bool | None = None,
        device: Any = None,
        synchronization: VariableSynchronization = VariableSynchronization.AUTO,
        aggregation: VariableAggregation = VariableAggregation.NONE,
    ) -> Variable:
        if get_replica_context() is not None:
            raise InvalidArgumentError(
                "create variables in strategy.scope() (cross-replica context), not inside strategy.run"
            )
        logical = "Variable" if name is None else name
        trainable = check_variable_args(f"variable {logical!r}", synchronization, aggregation, trainable, validate_shape)
        components = build_components(
            logical, self._devices, initial_value, dtype=dtype, shape=shape, validate_shape=validate_shape
        )
        cls = SyncOnReadVariable if synchronization is VariableSynchronization.ON_READ else MirroredVariable
        return cls._build(
            logical,
            components,
            strategy=self,
            trainable=trainable,
            synchronization=synchronization,
            aggregation=aggregation,
        )

    # --- running replicas --------------------------------------------------------------------------

    def run(self, fn: Callable[..., Any], args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> Any:
        """Call ``fn`` once per replica, each in a thread with its replica context.

        Replica 0 runs on the calling thread, the others on the strategy's persistent replica
        threads (started by the first call, ended with the strategy); a call made while
        another is running (from another thread, or nested in a replica) gets fresh threads.
        Each replica sees a copy of the caller's context. An exception of a replica is
        re-raised here once every replica has ended.

        ``PerReplica`` arguments give each replica its own value. Aggregated updates of
        mirrored variables meet at a rendezvous (TF's merge_call), so every replica must make
        the same aggregated updates in the same order. Returns a ``PerReplica`` of the
        results (the result itself with one replica).
        """
        kwargs = dict(kwargs or {})
        n = self._local_replicas
        split = False  # any PerReplica argument: each replica picks its own value
        for a in (*args, *kwargs.values()):
            if isinstance(a, PerReplica):
                if len(a) != n:
                    raise InvalidArgumentError(f"a PerReplica argument has {len(a)} values for {n} replicas")
                split = True
        pool = self._replica_pool() if n > 1 else None
        held = pool is not None and pool.acquire()  # False: busy (another call, or nested in a replica)
        # the pool's calls run one at a time, so they share one rendezvous until one breaks
        # it (a failed replica aborts it); one replica never waits on it
        shared = held or n == 1
        try:
            rendezvous = self._rendezvous if shared else None
            if rendezvous is None or rendezvous.broken:
                rendezvous = _Rendezvous(n)
                if shared:
                    self._rendezvous = rendezvous
            results: list[Any] = [None] * n
            errors: list[BaseException | None] = [None] * n

            def pick(a: Any, i: int) -> Any:
                return a.values[i] if isinstance(a, PerReplica) else a

            def one(i: int) -> None:
                _replica.set(ReplicaContext(self, i, rendezvous))
                _strategy.set(self)
                try:
                    if split:
                        results[i] = fn(*[pick(a, i) for a in args], **{k: pick(v, i) for k, v in kwargs.items()})
                    else:
                        results[i] = fn(*args, **kwargs)
                except BaseException as exc:
                    errors[i] = exc
                    rendezvous.abort()

            # each replica runs in its own copy of the caller's context, taken now (gv.device
            # scopes, registries and other ContextVars as the caller sees them)
            tasks = [functools.partial(_run_in, contextvars.copy_context(), one, i) for i in range(n)]
            if n == 1:
                tasks[0]()
            elif held:
                assert pool is not None
                pool.run(tasks[0], tasks[1:])
            else:
                run_on_fresh_threads(tasks[0], tasks[1:], "gpuvars-replica")
        finally:
            kept = self._rendezvous
            if shared and kept is not None:
                kept.clear()  # hold no values (nor, through them, this strategy) until the next call
            if held:
                assert pool is not None
                pool.release()
        real = [e for e in errors if e is not None and not isinstance(e, _ReplicaAborted)]
        if real or any(errors):
            raise (real or [e for e in errors if e is not None])[0]
        return results[0] if n == 1 else PerReplica(results)

    def _replica_pool(self) -> ReplicaPool:
        """The persistent threads of replicas 1..n-1 (made on first use; started by the pool)."""
        pool = self._pool
        if pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ReplicaPool(self._local_replicas - 1, "gpuvars-replica")
                    weakref.finalize(self, self._pool.close)  # also at exit; holds the pool, not self
                pool = self._pool
        return pool

    def experimental_local_results(self, value: Any) -> tuple[Any, ...]:
        """The per-replica parts of ``value`` on this process: a distributed variable's
        components, a ``PerReplica``'s values, or ``(value,)`` for anything else (TF's name)."""
        if isinstance(value, (MirroredVariable, SyncOnReadVariable)):
            return value.values
        if isinstance(value, PerReplica):
            return value.values
        return (value,)

    def experimental_distribute_values_from_function(self, fn: Callable[[ValueContext], Any]) -> PerReplica:
        """``PerReplica`` of ``fn(ValueContext(replica_id, n))`` for each replica."""
        n = self.num_replicas_in_sync
        return PerReplica([fn(ValueContext(i, n)) for i in range(n)])

    def reduce(self, reduce_op: Any, value: Any, axis: int | None = None) -> Any:
        """Combine a ``PerReplica`` (or a plain value, as if every replica had it) across replicas,
        onto replica 0's device; ``axis`` also reduces each value along that axis first."""
        op = ReduceOp.from_obj(reduce_op)
        values = list(value.values) if isinstance(value, PerReplica) else [value] * self.num_replicas_in_sync
        if axis is not None:
            values = [v.sum(axis=axis) for v in values]
            if op is ReduceOp.MEAN:
                total = sum(int(v.shape[axis]) for v in (value.values if isinstance(value, PerReplica) else [value]))
                return reduce_values(ReduceOp.SUM, values, self._devices[0]) / total
        return reduce_values(op, values, self._devices[0])

    def _reduce_to(self, op: ReduceOp, values: Sequence[Any], replica: int) -> Any:
        """``values`` (one per local replica) combined onto replica ``replica``'s device."""
        return reduce_values(op, values, self._devices[replica])

    def _first_replica(self, values: Sequence[Any]) -> Any:
        """Replica 0's value out of ``values`` (one per local replica): ONLY_FIRST_REPLICA."""
        return values[0]

    def _to_replica(self, value: Any, replica: int) -> Any:
        """``value`` on replica ``replica``'s device (an explicit copy when it lives elsewhere)."""
        return on_device(value, self._devices[replica])

    def __repr__(self) -> str:
        return f"MirroredStrategy(devices={list(self.devices)})"


def _run_in(context: contextvars.Context, fn: Callable[[int], None], replica: int) -> None:
    context.run(fn, replica)


def build_components(
    name: str,
    devices: Sequence[PhysicalDevice],
    initial_value: Any,
    *,
    dtype: Any = None,
    shape: Any = None,
    validate_shape: bool = True,
    trainable: bool = False,
) -> list[Variable]:
    """One plain Variable per device named ``name/replica_K``, registered nowhere.

    An eager initial value is copied to each device; a deferred one leaves the components
    uninitialized (the logical variable's init op materializes it once and copies it).
    """
    deferred = is_deferred(initial_value)
    components: list[Variable] = []
    with plain_variables(), Registry():  # plain components, in a private registry of their own
        first = Variable(
            initial_value, name=f"{name}/replica_0", dtype=dtype, shape=shape,
            validate_shape=validate_shape, trainable=trainable, device=devices[0].spec,
        )
        components.append(first)
        declared = first.declared_shape
        for k, dev in enumerate(devices[1:], start=1):
            source: Any = first
            if deferred:  # filled by the logical variable's init op (or a restore), never on its own
                source = Placeholder(first) if first._known_shape() is not None else _unfilled
            components.append(
                Variable(
                    source, name=f"{name}/replica_{k}", dtype=first._known_dtype(), shape=declared,
                    validate_shape=validate_shape, trainable=trainable, device=dev.spec,
                )
            )
    return components


def _unfilled() -> Any:
    raise InvalidArgumentError("a replica component is initialized by its distributed variable, not on its own")


class Placeholder(Initializer):
    """The initial value of replica components 1..N-1 of a deferred distributed variable: its
    shape and dtype are the primary's; the logical variable's init op fills every component."""

    def __init__(self, primary: Variable) -> None:
        known = primary._known_shape()
        super().__init__(known, primary._known_dtype())

    def _draw(self, device: Any, shape: tuple[int, ...], dtype: Any) -> Any:
        raise InvalidArgumentError("a replica component is initialized by its distributed variable, not on its own")
