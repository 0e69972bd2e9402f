"""Distributed variables: one plain component Variable per replica behind one logical name.

``isinstance(mirrored, gv.Variable)`` holds (TF's variable-creator pattern). Components
are named ``name/replica_K`` and are not registered on their own; the logical variable
registers once. Every mutation of a component runs on that component's device. A
distributed variable reaches its components only through their public surface and the
engine functions of :mod:`gpuvars.variable`.

- MirroredVariable: cross-replica writes update every component; replica-context writes
  follow the aggregation (NONE: the local copy; SUM/MEAN: all-reduced, then every replica
  updates its own copy; ONLY_FIRST_REPLICA: replica 0's value everywhere). Reads give the
  local component in a replica, the primary across replicas.
- SyncOnReadVariable: replicas read and write their own component; a cross-replica read
  reduces (SUM, MEAN, or the first replica's); a cross-replica assign with SUM divides by
  the number of replicas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from gpuvars import _shapes, variable
from gpuvars._backend_errors import backend_errors
from gpuvars._surface import VariableSurface
from gpuvars._transfer import admit, copy_to, on_device, to_host
from gpuvars.distribute._context import ReduceOp, get_replica_context
from gpuvars.errors import InvalidArgumentError
from gpuvars.init_ops import InitPlan
from gpuvars.placement import PhysicalDevice
from gpuvars.registry import current_registry
from gpuvars.variable import Variable, VariableAggregation, VariableSynchronization

if TYPE_CHECKING:
    from gpuvars.distribute.strategy import MirroredStrategy

__all__ = ["DistributedVariable", "MirroredVariable", "SyncOnReadVariable", "reduce_values"]


def reduce_values(op: ReduceOp, values: Sequence[Any], dest: PhysicalDevice) -> Any:
    """Sum (or average) arrays living on any devices into a new array on ``dest``.

    One private copy for the accumulator; every other value is added where it already is
    when it lives on ``dest`` (or in host memory for a host ``dest``), copied over otherwise.
    Collectives are explicit copies, never implicit transfers.
    """
    if not values:
        raise InvalidArgumentError("cannot reduce an empty list of values")
    backend = dest.backend
    acc = copy_to(values[0], dest)
    with backend_errors(dest, f"reducing {len(values)} values on {dest.name}"):
        for v in values[1:]:
            acc = backend.apply("add", acc, on_device(v, dest), dest.backend_index)
        if op is ReduceOp.MEAN:
            acc = acc / len(values)
    return acc


class DistributedVariable(Variable):
    """Base of mirrored and sync-on-read variables: a logical name over per-replica components.

    Made by a strategy (``gv.Variable(...)`` inside ``strategy.scope()``) or by
    ``gv.load_checkpoint``; not constructed directly.
    """

    __slots__ = ("_logical", "_components", "_strategy", "_flags", "_deferred")
    kind = "distributed"
    _logical: str
    _components: tuple[Variable, ...]
    _strategy: MirroredStrategy | None
    _flags: tuple[bool, VariableSynchronization, VariableAggregation]
    _deferred: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise InvalidArgumentError(
            f"gv.{type(self).__name__} is not constructed directly: create gv.Variable(...) inside "
            "a strategy's scope() (e.g. with gv.MirroredStrategy([...]).scope(): ...), or load one "
            "with gv.load_checkpoint"
        )

    @classmethod
    def _build(
        cls,
        name: str,
        components: Sequence[Variable],
        *,
        strategy: MirroredStrategy | None,
        trainable: bool,
        synchronization: VariableSynchronization,
        aggregation: VariableAggregation,
    ) -> DistributedVariable:
        """The logical variable over ``components`` (plain, unregistered), registered as ``name``."""
        self = object.__new__(cls)
        self._components = tuple(components)
        self._strategy = strategy
        self._flags = (trainable, synchronization, aggregation)
        self._deferred = not components[0].initialized
        self._logical = current_registry().add(self, name)
        return self

    # --- identity: the logical name, the local (or primary) component's device -------------------

    @property
    def name(self) -> str:
        return self._logical

    @property
    def physical_device(self) -> PhysicalDevice:
        return self._here().physical_device

    @property
    def device(self) -> str:
        return self._here().device

    def _known_dtype(self) -> np.dtype[Any] | None:
        return self._components[0]._known_dtype()

    def _known_shape(self) -> tuple[int, ...] | None:
        return self._components[0]._known_shape()

    @property
    def declared_shape(self) -> _shapes.Declared:
        return self._components[0].declared_shape

    @property
    def trainable(self) -> bool:
        return self._flags[0]

    @property
    def synchronization(self) -> VariableSynchronization:
        return self._flags[1]

    @property
    def aggregation(self) -> VariableAggregation:
        return self._flags[2]

    @property
    def values(self) -> tuple[Variable, ...]:
        """The per-replica component variables, replica 0 first."""
        return self._components

    @property
    def primary(self) -> Variable:
        """Replica 0's component."""
        return self._components[0]

    @property
    def devices(self) -> tuple[str, ...]:
        """Each component's device."""
        return tuple(c.device for c in self._components)

    @property
    def initialized(self) -> bool:
        return all(c.initialized for c in self._components)

    def _targets(self) -> list[PhysicalDevice]:
        return [c.physical_device for c in self._components]

    def _here(self) -> Variable:
        """The component to read here: this replica's inside strategy.run, else the primary."""
        local = self._local()
        return self._components[0] if local is None else local

    @property
    def replicas_in_sync(self) -> int:
        """How many replicas hold a component: every process's (the strategy's
        ``num_replicas_in_sync``), or this variable's components without a strategy."""
        strategy = self._strategy
        return len(self._components) if strategy is None else int(strategy.num_replicas_in_sync)

    def _local(self) -> Variable | None:
        """This replica's component inside strategy.run, else None."""
        ctx = get_replica_context()
        if ctx is None:
            return None
        rid = ctx._local_id  # this process's replica (a multi-process strategy's are numbered per process)
        if rid >= len(self._components):
            raise InvalidArgumentError(
                f"variable '{self.name}' has {len(self._components)} components but runs in replica {rid}"
            )
        return self._components[rid]

    def _gpuvars_locate(self) -> tuple[Any, PhysicalDevice]:
        return self.value(), self._here().physical_device

    # --- init ops and restores: materialize once on the primary, then copy to every component ----

    def _init_plans(self) -> list[InitPlan]:
        if not self._deferred:
            return []
        primary = self._components[0]._init_plans()
        if not primary:
            return []
        return [InitPlan(self, self.name, primary[0].deps, primary[0].materialize, lambda arr: variable.install(self, arr))]

    def _install(self, arr: Any) -> None:
        for c in self._components:
            variable.install(c, copy_to(arr, c.physical_device))

    def _mark_uninitialized(self) -> None:
        for c in self._components:
            variable.invalidate(c)

    def _restore_buffer(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        raise InvalidArgumentError(f"'{self.name}' is distributed: restore its components, not the logical variable")

    def _set_storage(self, storage: Any) -> None:
        raise InvalidArgumentError(f"'{self.name}' is distributed: its storage lives in its components")

    def __repr__(self) -> str:
        return (
            f"<gpuvars.{type(self).__name__} '{self.name}' shape={self._known_shape()} dtype={self._known_dtype()} "
            f"devices={list(self.devices)}>"
        )

    # --- writes: one dispatch per kind; the generic methods below only name the operation -------

    def _update(self, method: str, *args: Any) -> Variable:
        raise NotImplementedError

    def _write(self, op: str, value: Any) -> None:
        self._update("assign" if op == "assign" else f"assign_{op}", value)

    # the surface's writes (gv.Variable's host fast paths read a plain variable's storage)
    assign = VariableSurface.assign
    assign_add = VariableSurface.assign_add
    assign_sub = VariableSurface.assign_sub

    def _scatter(self, op: str, indices: Any, updates: Any) -> Variable:
        return self._update(f"scatter_{op}", indices, updates)

    def _broadcast(self, method: str, args: tuple[Any, ...], what: str, admitted: bool = False) -> None:
        """Cross-replica: the value is admitted once (the transfer guard judges it against
        every component's device), then copied explicitly to each component."""
        if not admitted:
            admit(args[-1], self._targets(), what)
        for c in self._components:
            dev = c.physical_device
            getattr(c, method)(*(on_device(a, dev) for a in args))


class MirroredVariable(DistributedVariable):
    """A variable kept identical on every replica's device (tf.distribute MirroredVariable)."""

    __slots__ = ()
    kind = "mirrored"

    def value(self) -> Any:
        return self._here().value()

    def _update(self, method: str, *args: Any) -> Variable:
        what = f"{method} to mirrored variable '{self.name}'"
        ctx = get_replica_context()
        if ctx is None:  # cross-replica: the same update on every component
            self._broadcast(method, args, what)
            return self
        local = self._local()
        assert local is not None
        agg = self.aggregation
        if agg is VariableAggregation.NONE:
            getattr(local, method)(*args)
            return self
        dtype = self._known_dtype()
        if agg is VariableAggregation.MEAN and dtype is not None and dtype.kind not in "fc":
            raise InvalidArgumentError(
                f"Cannot update non-float variables with VariableAggregation.MEAN aggregation in replica "
                f"context: variable '{self.name}' has dtype {dtype}; use SUM or ONLY_FIRST_REPLICA"
            )
        if method.startswith("scatter_") and agg is not VariableAggregation.ONLY_FIRST_REPLICA:
            raise InvalidArgumentError(
                f"{method} on mirrored variable '{self.name}' in replica context supports aggregation "
                f"NONE or ONLY_FIRST_REPLICA, not {agg.name}"
            )
        admit(args[-1], [local.physical_device], what)  # this replica's value, judged where it goes
        dev = local.physical_device
        # the combine steps are the variable's strategy's (a multi-process one reduces across
        # processes); a variable with none (loaded from a checkpoint) combines its own replicas
        strategy = self._strategy
        if agg is VariableAggregation.ONLY_FIRST_REPLICA:
            first = ctx._exchange(args, (lambda everyone: everyone[0]) if strategy is None else strategy._first_replica)
            chosen = tuple(on_device(a, dev) for a in first)
        else:  # reduced once, by one replica, on the primary's device; each replica copies the result
            op = ReduceOp.SUM if agg is VariableAggregation.SUM else ReduceOp.MEAN
            primary = self._components[0].physical_device

            def combine(values: list[Any]) -> Any:
                if strategy is None:
                    return reduce_values(op, values, primary)
                return strategy._reduce_to(op, values, 0)  # replica 0's device: the primary's

            total = ctx._exchange(args[0], combine)
            chosen = (on_device(total, dev),)
        getattr(local, method)(*chosen)
        return self

    def components_agree(self) -> bool:
        """Whether every component holds the primary's value (checked on the host)."""
        first = self._components[0].numpy()
        return all(np.array_equal(first, c.numpy(), equal_nan=True) for c in self._components[1:])


class SyncOnReadVariable(DistributedVariable):
    """Per-replica values reduced when read across replicas (tf.distribute SyncOnReadVariable)."""

    __slots__ = ()
    kind = "sync_on_read"

    def value(self) -> Any:
        local = self._local()
        if local is not None:
            return local.value()
        agg = self.aggregation
        if agg in (VariableAggregation.SUM, VariableAggregation.MEAN):
            op = ReduceOp.SUM if agg is VariableAggregation.SUM else ReduceOp.MEAN
            values = [c.value() for c in self._components]
            if self._strategy is not None:  # every replica's, those of other processes too
                return self._strategy._reduce_to(op, values, 0)
            return reduce_values(op, values, self._components[0].physical_device)
        return self._components[0].value()

    def _update(self, method: str, *args: Any) -> Variable:
        if method.startswith("scatter_"):
            raise InvalidArgumentError(f"{method} is not supported on SyncOnReadVariable '{self.name}'")
        local = self._local()
        if local is not None:
            getattr(local, method)(*args)
            return self
        (value,) = args
        if method != "assign" and self.aggregation is VariableAggregation.SUM:
            raise InvalidArgumentError(
                f"SyncOnReadVariable does not support `{method}` in cross-replica context when aggregation "
                f"is set to `VariableAggregation.SUM` (variable '{self.name}')"
            )
        what = f"{method} to sync-on-read variable '{self.name}'"
        n = self.replicas_in_sync
        if method == "assign" and self.aggregation is VariableAggregation.SUM and n > 1:
            # TF: each replica holds value / n, cast back to the variable's dtype
            located = admit(value, self._targets(), what)
            host = to_host(located[0], located[1])
            self._broadcast(method, ((host / n).astype(self.dtype),), what, admitted=True)
            return self
        self._broadcast(method, (value,), what)
        return self

