"""Distributed variables: one plain component Variable per replica behind one logical name.

``isinstance(mirrored, gv.Variable)`` holds (TF's variable-creator pattern). Components
are named ``name/replica_K`` and are not registered on their own; the logical variable
registers once. Every mutation of a component runs on that component's device.

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

from gpuvars.distribute._context import ReduceOp, get_replica_context
from gpuvars.errors import InvalidArgumentError
from gpuvars.placement import PhysicalDevice, copy_to, device_of_array
from gpuvars.registry import current_registry
from gpuvars.variable import Op, Variable, VariableAggregation, VariableSynchronization

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
    for v in values[1:]:
        acc = backend.apply("add", acc, on_device(v, dest), dest.backend_index)
    if op is ReduceOp.MEAN:
        acc = acc / len(values)
    return acc


def on_device(value: Any, dest: PhysicalDevice, where: tuple[Any, Any] | None = None) -> Any:
    """``value`` usable on ``dest`` without an implicit transfer: itself when it is already
    there (or is host data for a host device), else an explicit copy. ``where`` is
    ``device_of_array(value)`` when the caller already knows it."""
    if isinstance(value, Variable):
        value = value.value()
        where = None
    backend, device = device_of_array(value) if where is None else where
    if device is dest or (dest.kind == "cpu" and dest.backend.name == "numpy" and (backend is None or backend.name == "numpy")):
        return value
    return copy_to(value, dest)


class DistributedVariable(Variable):
    """Base of mirrored and sync-on-read variables: a logical name over per-replica components."""

    kind = "distributed"
    _components: tuple[Variable, ...]
    _strategy: MirroredStrategy | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Built by _build (via gv.Variable inside strategy.scope()); Python calls __init__ again
        # on the object gv.Variable.__new__ returned, which must not rebuild it.
        pass

    @classmethod
    def _build(
        cls,
        name: str,
        components: Sequence[Variable],
        *,
        strategy: MirroredStrategy | None,
        initial: Any,
        trainable: bool,
        synchronization: VariableSynchronization,
        aggregation: VariableAggregation,
    ) -> DistributedVariable:
        self = object.__new__(cls)
        primary = components[0]
        self._components = tuple(components)
        self._strategy = strategy
        self._trainable = trainable
        self._synchronization = synchronization
        self._aggregation = aggregation
        self._device = primary._device
        self._backend = primary._backend
        self._host = primary._host
        self._dtype = primary._dtype
        self._declared = primary._declared
        self._fix_on_init = primary._fix_on_init
        self._pending_shape = primary._pending_shape
        self._init = initial
        self._deps = tuple(initial.variables()) if hasattr(initial, "variables") else ()
        self._ro = None
        registry = current_registry()
        self._name = registry._claim(name, self)
        self._registry = registry
        return self

    # the primary component's storage stands for the logical variable's (reads, init deps)
    @property
    def _storage(self) -> Any:
        return self._components[0]._storage

    @_storage.setter
    def _storage(self, value: Any) -> None:
        raise AttributeError("a distributed variable's storage lives in its components")

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

    @property
    def shape(self) -> tuple[int, ...] | None:
        return self._components[0].shape

    def _here(self) -> Variable:
        """The component to read here: this replica's inside strategy.run, else the primary."""
        local = self._local()
        return self._components[0] if local is None else local

    def _local(self) -> Variable | None:
        """This replica's component inside strategy.run, else None."""
        ctx = get_replica_context()
        if ctx is None:
            return None
        rid = ctx.replica_id_in_sync_group
        if rid >= len(self._components):
            raise InvalidArgumentError(
                f"variable '{self._name}' has {len(self._components)} components but runs in replica {rid}"
            )
        return self._components[rid]

    def _dtype_for_values(self) -> np.dtype[Any]:
        assert self._dtype is not None
        return self._dtype

    # --- init ops: materialize once on the primary, then copy to every component ---------------

    def _materialize(self, resolve_dep: Any) -> Any:
        return self._components[0]._materialize(resolve_dep)

    def _install(self, arr: Any) -> None:
        for c in self._components:
            c._install(copy_to(arr, c._device))
        self._pending_shape = self._components[0]._pending_shape

    @property
    def initializer(self) -> Op:
        from gpuvars.variable import _run_init

        return Op(f"{self._name}/Assign", lambda: _run_init([self]))

    def _mark_uninitialized(self) -> None:
        for c in self._components:
            c._mark_uninitialized()

    # --- reads -----------------------------------------------------------------------------------

    def read_value(self) -> Any:
        value = self.value()
        local = self._here()
        return local._backend.asarray(value, value.dtype, local._device.backend_index) if local._backend.inplace else value

    def numpy(self) -> np.ndarray[Any, Any]:
        value = self.value()
        backend = self._here()._backend
        return np.array(value, copy=True) if backend.name == "numpy" else backend.to_numpy(value)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray[Any, Any]:
        out = self.numpy()
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self) -> str:
        kind = type(self).__name__
        return f"<gpuvars.{kind} '{self._name}' shape={self.shape} dtype={self._dtype} devices={list(self.devices)}>"


class MirroredVariable(DistributedVariable):
    """A variable kept identical on every replica's device (tf.distribute MirroredVariable)."""

    kind = "mirrored"

    def value(self) -> Any:
        return self._here().value()

    def _update(self, method: str, *args: Any) -> Variable:
        ctx = get_replica_context()
        if ctx is None:  # cross-replica: the same update on every component (an explicit broadcast)
            where = [None if isinstance(a, Variable) else device_of_array(a) for a in args]
            for c in self._components:
                getattr(c, method)(*(on_device(a, c._device, w) for a, w in zip(args, where)))
            return self
        local = self._local()
        assert local is not None
        agg = self._aggregation
        if agg is VariableAggregation.NONE:
            getattr(local, method)(*args)
            return self
        if agg is VariableAggregation.MEAN and self._dtype is not None and self._dtype.kind not in "fc":
            raise InvalidArgumentError(
                f"Cannot update non-float variables with VariableAggregation.MEAN aggregation in replica "
                f"context: variable '{self._name}' has dtype {self._dtype}; use SUM or ONLY_FIRST_REPLICA"
            )
        if method.startswith("scatter_") and agg is not VariableAggregation.ONLY_FIRST_REPLICA:
            raise InvalidArgumentError(
                f"{method} on mirrored variable '{self._name}' in replica context supports aggregation "
                f"NONE or ONLY_FIRST_REPLICA, not {agg.name}"
            )
        if agg is VariableAggregation.ONLY_FIRST_REPLICA:
            first = ctx._exchange(args, lambda everyone: everyone[0])
            chosen = tuple(on_device(a, local._device) for a in first)
        else:  # reduced once, by one replica, on the primary's device; each replica copies the result
            op = ReduceOp.SUM if agg is VariableAggregation.SUM else ReduceOp.MEAN
            primary = self._components[0]._device
            total = ctx._exchange(args[0], lambda values: reduce_values(op, values, primary))
            chosen = (on_device(total, local._device),)
        getattr(local, method)(*chosen)
        return self

    def assign(self, value: Any, read_value: bool = True) -> Variable | None:
        self._update("assign", value)
        return self if read_value else None

    def assign_add(self, delta: Any, read_value: bool = True) -> Variable | None:
        self._update("assign_add", delta)
        return self if read_value else None

    def assign_sub(self, delta: Any, read_value: bool = True) -> Variable | None:
        self._update("assign_sub", delta)
        return self if read_value else None

    def scatter_update(self, indices: Any, updates: Any) -> Variable:
        return self._update("scatter_update", indices, updates)

    def scatter_add(self, indices: Any, updates: Any) -> Variable:
        return self._update("scatter_add", indices, updates)

    def scatter_sub(self, indices: Any, updates: Any) -> Variable:
        return self._update("scatter_sub", indices, updates)

    def scatter_mul(self, indices: Any, updates: Any) -> Variable:
        return self._update("scatter_mul", indices, updates)

    def scatter_div(self, indices: Any, updates: Any) -> Variable:
        return self._update("scatter_div", indices, updates)

    def scatter_min(self, indices: Any, updates: Any) -> Variable:
        return self._update("scatter_min", indices, updates)

    def scatter_max(self, indices: Any, updates: Any) -> Variable:
        return self._update("scatter_max", indices, updates)

    def components_agree(self) -> bool:
        """Whether every component holds the primary's value (checked on the host)."""
        first = self._components[0].numpy()
        return all(np.array_equal(first, c.numpy(), equal_nan=True) for c in self._components[1:])


class SyncOnReadVariable(DistributedVariable):
    """Per-replica values reduced when read across replicas (tf.distribute SyncOnReadVariable)."""

    kind = "sync_on_read"

    def value(self) -> Any:
        local = self._local()
        if local is not None:
            return local.value()
        agg = self._aggregation
        if agg in (VariableAggregation.SUM, VariableAggregation.MEAN):
            op = ReduceOp.SUM if agg is VariableAggregation.SUM else ReduceOp.MEAN
            return reduce_values(op, [c.value() for c in self._components], self._components[0]._device)
        return self._components[0].value()

    def _cross(self, method: str, value: Any) -> Variable:
        if method != "assign" and self._aggregation is VariableAggregation.SUM:
            raise InvalidArgumentError(
                f"SyncOnReadVariable does not support `{method}` in cross-replica context when aggregation "
                f"is set to `VariableAggregation.SUM` (variable '{self._name}')"
            )
        n = len(self._components)
        divide = method == "assign" and self._aggregation is VariableAggregation.SUM and n > 1
        if divide:  # TF: each replica holds value / n, cast back to the variable's dtype
            arr = value.numpy() if isinstance(value, Variable) else value
            backend, _ = device_of_array(arr)
            host = np.asarray(arr) if backend is None or backend.name == "numpy" else backend.to_numpy(arr)
            value = (host / n).astype(self._dtype_for_values())
        where = None if isinstance(value, Variable) else device_of_array(value)
        for c in self._components:
            getattr(c, method)(on_device(value, c._device, where))
        return self

    def _dispatch(self, method: str, value: Any) -> Variable:
        local = self._local()
        if local is not None:
            getattr(local, method)(value)
            return self
        return self._cross(method, value)

    def assign(self, value: Any, read_value: bool = True) -> Variable | None:
        self._dispatch("assign", value)
        return self if read_value else None

    def assign_add(self, delta: Any, read_value: bool = True) -> Variable | None:
        self._dispatch("assign_add", delta)
        return self if read_value else None

    def assign_sub(self, delta: Any, read_value: bool = True) -> Variable | None:
        self._dispatch("assign_sub", delta)
        return self if read_value else None

    def _scatter(self, op: str, indices: Any, updates: Any) -> Variable:
        raise InvalidArgumentError(f"scatter_{op} is not supported on SyncOnReadVariable '{self._name}'")
