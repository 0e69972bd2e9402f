"""MultiWorkerMirroredStrategy: MirroredStrategy over the devices of every process.

Each process holds the components of its own replicas (its local devices) and runs them
with ``MirroredStrategy.run``; what crosses processes is the combine step of a
collective. The local replicas' values are summed on this process first (one value per
process), then exchanged with one JAX collective over host arrays (gloo on CPU) and summed
in process order, so every process computes bit-identical results. Every process must
make the same collectives in the same order with values of the same shape and dtype, as
in TF. Without ``gv.distributed.initialize`` it is a one-process MirroredStrategy.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import numpy as np

from gpuvars._transfer import copy_to, locate, to_host
from gpuvars.distribute import PerReplica, ReduceOp
from gpuvars.distribute.strategy import MirroredStrategy, ValueContext
from gpuvars.distribute.values import DistributedVariable, reduce_values
from gpuvars.distributed import _runtime
from gpuvars.errors import DistributedError, InvalidArgumentError
from gpuvars.variable import Variable

__all__ = ["MultiWorkerMirroredStrategy"]


def _host(value: Any) -> np.ndarray[Any, Any]:
    array, backend, _ = locate(value)
    return to_host(array, backend)


class MultiWorkerMirroredStrategy(MirroredStrategy):
    """Synchronous data parallelism over the devices of every process
    (tf.distribute.MultiWorkerMirroredStrategy).

    Create it on every process after ``gv.distributed.initialize()``; each process passes
    its own local devices (the same number everywhere). Replica ids count the replicas of
    lower processes first; ``num_replicas_in_sync`` counts every process's replicas. A
    variable created in ``scope()`` starts with process 0's initial value everywhere (an
    eager initial value is broadcast; a deferred one, run by an init op on each process,
    must be seeded identically, e.g. ``gv.set_random_seed``).

    Args:
        devices: this process's devices; default every local GPU, else ``["/cpu:0"]``.

    Raises:
        DistributedError: the processes have different numbers of replicas, or a
            collective failed.

    Example:
        >>> import gpuvars as gv
        >>> strategy = gv.MultiWorkerMirroredStrategy(["/cpu:0"])  # one process: no group
        >>> with gv.Registry(), strategy.scope():
        ...     w = gv.Variable(1.0, name="w", aggregation=gv.VariableAggregation.SUM)
        ...     _ = strategy.run(lambda: w.assign_add(1.0))
        ...     float(w.numpy()), strategy.num_replicas_in_sync
        (2.0, 1)
    """

    def __init__(self, devices: Sequence[str] | None = None) -> None:
        super().__init__(devices)
        self._process = _runtime.process_id()
        self._processes = _runtime.num_processes()
        local = self._local_replicas
        if self._processes > 1:
            counts = self._gather(np.array([local], np.int64), "MultiWorkerMirroredStrategy()")[:, 0]
            odd = tuple(k for k, c in enumerate(counts) if int(c) != int(counts[0]))
            if odd:
                raise DistributedError(
                    "MultiWorkerMirroredStrategy needs the same number of replicas on every process; "
                    f"replicas per process: {[int(c) for c in counts]}",
                    odd,
                )
        self._replica_offset = self._process * local

    @property
    def num_replicas_in_sync(self) -> int:
        """Every process's replicas."""
        return self._local_replicas * self._processes

    @property
    def process_id(self) -> int:
        return self._process

    @property
    def num_processes(self) -> int:
        return self._processes

    # --- the collectives: local replicas first, then one exchange across processes ----------------

    def _gather(self, host: np.ndarray[Any, Any], what: str) -> np.ndarray[Any, Any]:
        if self._processes == 1:
            return host[None]
        return _runtime.allgather(host, f"{what} on process {self._process}")

    def _sum_processes(self, local: Any, what: str) -> Any:
        """``local`` summed over every process in process order (a host array; ``local``
        itself with one process)."""
        if self._processes == 1:
            return local
        host = _host(local)
        gathered = self._gather(host, what)
        acc = gathered[0].copy()
        for part in gathered[1:]:
            acc = acc + part
        return np.asarray(acc, host.dtype).reshape(host.shape)  # a 0-d sum is an ndarray, not a numpy scalar

    def _reduce_to(self, op: ReduceOp, values: Sequence[Any], replica: int) -> Any:
        dest = self._devices[replica]
        total = self._sum_processes(reduce_values(ReduceOp.SUM, values, dest), f"an all-reduce ({op.name})")
        if op is ReduceOp.MEAN:
            total = total / self.num_replicas_in_sync
        return total if self._processes == 1 else copy_to(total, dest)

    def _first_replica(self, values: Sequence[Any]) -> Any:
        first = values[0]
        if self._processes == 1:
            return first
        what = "an ONLY_FIRST_REPLICA update"
        if isinstance(first, tuple):
            return tuple(_runtime.broadcast_from_first(_host(a), what) for a in first)
        return _runtime.broadcast_from_first(_host(first), what)

    def reduce(self, reduce_op: Any, value: Any, axis: int | None = None) -> Any:
        """Combine a ``PerReplica`` (or a plain value, as if every replica had it) across the
        replicas of every process, onto replica 0's device (every process gets the result)."""
        op = ReduceOp.from_obj(reduce_op)
        values = list(value.values) if isinstance(value, PerReplica) else [value] * self._local_replicas
        if axis is not None:
            count = sum(int(v.shape[axis]) for v in values)
            values = [v.sum(axis=axis) for v in values]
        else:
            count = len(values)
        dest = self._devices[0]
        total = self._sum_processes(reduce_values(ReduceOp.SUM, values, dest), f"strategy.reduce({op.name})")
        if op is ReduceOp.MEAN:
            total = total / int(self._gather(np.array([count], np.int64), "strategy.reduce counts")[:, 0].sum())
        return total if self._processes == 1 else copy_to(total, dest)

    def experimental_distribute_values_from_function(self, fn: Callable[[ValueContext], Any]) -> PerReplica:
        """``PerReplica`` of ``fn(ValueContext(replica_id, n))`` for this process's replicas
        (``replica_id`` in the sync group of every process, ``n`` all replicas)."""
        n = self.num_replicas_in_sync
        return PerReplica([fn(ValueContext(self._replica_offset + i, n)) for i in range(self._local_replicas)])

    # --- variables start equal everywhere -----------------------------------------------------------

    def _create_variable(self, *args: Any, **kwargs: Any) -> Variable:
        var = super()._create_variable(*args, **kwargs)
        if self._processes > 1 and isinstance(var, DistributedVariable) and var.initialized:
            self._broadcast_initial(var)
        return var

    def _broadcast_initial(self, var: DistributedVariable) -> None:
        """Process 0's value of ``var`` into every component of every process (after checking
        that every process made the same variable)."""
        first = var.values[0].numpy()
        what = f"creating variable '{var.name}'"
        signature = f"{var.name}|{first.shape}|{first.dtype.str}".encode()
        digest = np.frombuffer(hashlib.sha256(signature).digest()[:8], np.int64)
        everyone = self._gather(digest, what)[:, 0]
        odd = tuple(k for k, d in enumerate(everyone) if d != everyone[0])
        if odd:
            raise InvalidArgumentError(
                f"{what}: process(es) {', '.join(map(str, odd))} created a different variable (name, shape "
                f"or dtype) than process 0; every process creates the same variables in the same order "
                f"(this one: shape {first.shape}, dtype {first.dtype})"
            )
        value = _runtime.broadcast_from_first(first, what)
        for c in var.values:
            c.assign(copy_to(value, c.physical_device))

    def __repr__(self) -> str:
        return (
            f"MultiWorkerMirroredStrategy(process {self._process} of {self._processes}, "
            f"devices={list(self.devices)})"
        )
