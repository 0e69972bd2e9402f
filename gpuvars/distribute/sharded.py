"""ShardedVariable: one logical variable split along axis 0 into shards on several devices.

Like TF's, it is not a Variable subclass but a container of shard Variables (named
``name/part_K``, not registered on their own); it registers once under its logical name
and is checkpointed as one full tensor, so a checkpoint restores into any shard count.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from gpuvars import _shapes, variable
from gpuvars._creator import plain_variables
from gpuvars._surface import VariableSurface
from gpuvars._transfer import admit, copy_to, on_device, to_host
from gpuvars.errors import InvalidArgumentError
from gpuvars.init_ops import InitPlan, Op, run_init
from gpuvars.placement import PhysicalDevice
from gpuvars.registry import Registry, current_registry
from gpuvars.variable import Variable, scatter_indices

__all__ = ["FixedShardsPartitioner", "MaxSizePartitioner", "MinSizePartitioner", "ShardedVariable", "Partitioner"]


class Partitioner:
    """Decides how many shards a variable of ``shape`` and ``dtype`` gets along axis 0."""

    def __call__(self, shape: Sequence[int], dtype: Any) -> list[int]:
        """TF's contract: a list with the shard count on axis 0 and 1 on every other axis."""
        shape = tuple(int(d) for d in shape)
        if not shape:
            raise InvalidArgumentError(f"{type(self).__name__}: a scalar cannot be partitioned")
        n = max(1, min(self._count(shape, np.dtype(dtype)), shape[0] or 1))
        return [n] + [1] * (len(shape) - 1)

    def _count(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
        raise NotImplementedError


class FixedShardsPartitioner(Partitioner):
    """Exactly ``num_shards`` shards (fewer if axis 0 is shorter)."""

    def __init__(self, num_shards: int) -> None:
        if not isinstance(num_shards, int) or num_shards < 1:
            raise InvalidArgumentError(f"num_shards must be an int >= 1, got {num_shards!r}")
        self.num_shards = num_shards

    def _count(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
        return self.num_shards


class MinSizePartitioner(Partitioner):
    """As many shards as keep each at least ``min_shard_bytes``, at most ``max_shards``."""

    def __init__(self, min_shard_bytes: int = 256 << 10, max_shards: int = 1) -> None:
        if min_shard_bytes < 1 or max_shards < 1:
            raise InvalidArgumentError("min_shard_bytes and max_shards must be >= 1")
        self.min_shard_bytes, self.max_shards = min_shard_bytes, max_shards

    def _count(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
        total = math.prod(shape) * dtype.itemsize
        return min(self.max_shards, max(1, total // self.min_shard_bytes))


class MaxSizePartitioner(Partitioner):
    """As few shards as keep each at most ``max_shard_bytes`` (capped by ``max_shards``)."""

    def __init__(self, max_shard_bytes: int, max_shards: int | None = None) -> None:
        if max_shard_bytes < 1 or (max_shards is not None and max_shards < 1):
            raise InvalidArgumentError("max_shard_bytes and max_shards must be >= 1")
        self.max_shard_bytes, self.max_shards = max_shard_bytes, max_shards

    def _count(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
        total = math.prod(shape) * dtype.itemsize
        n = max(1, math.ceil(total / self.max_shard_bytes))
        return n if self.max_shards is None else min(n, self.max_shards)


def shard_sizes(rows: int, n: int) -> list[int]:
    """TF's split: the first ``rows % n`` shards get one extra row."""
    base, extra = divmod(rows, n)
    return [base + (1 if k < extra else 0) for k in range(n)]


class ShardedVariable(VariableSurface):
    """A variable split along axis 0 across devices; reads as the concatenation.

    Args:
        initial_value: an array-like (the full value) to split.
        partitioner: a Partitioner (or an int: that many fixed shards).
        devices: where shards go, round-robin (default: the current scope's device for all).
        name, dtype, trainable: as for :class:`gpuvars.Variable`.

    Example:
        >>> import gpuvars as gv, numpy as np
        >>> with gv.Registry():
        ...     s = gv.ShardedVariable(np.arange(10.0), gv.FixedShardsPartitioner(3), name="emb")
        ...     [v.shape for v in s.variables], s.numpy()[:4].tolist()
        ([(4,), (3,), (3,)], [0.0, 1.0, 2.0, 3.0])
    """

    kind = "sharded"

    def __init__(
        self,
        initial_value: Any,
        partitioner: Partitioner | int,
        *,
        name: str | None = None,
        devices: Sequence[str] | None = None,
        dtype: Any = None,
        trainable: bool = True,
    ) -> None:
        if isinstance(partitioner, int):
            partitioner = FixedShardsPartitioner(partitioner)
        if not callable(partitioner):
            raise InvalidArgumentError(f"partitioner must be a Partitioner or an int, got {partitioner!r}")
        full = initial_value.numpy() if isinstance(initial_value, Variable) else initial_value
        with plain_variables(), Registry():  # validates the value with Variable's own rules, on the host
            probe = Variable(full, dtype=dtype, name="probe", device="/cpu:0")
            host = probe.numpy()
        if host.ndim == 0:
            raise InvalidArgumentError(f"ShardedVariable {name!r}: a scalar cannot be sharded")
        n = partitioner(host.shape, host.dtype)[0]
        targets = [None] if not devices else list(devices)
        sizes = shard_sizes(host.shape[0], n)
        logical = "Variable" if name is None else name
        shards: list[Variable] = []
        with plain_variables(), Registry():  # plain shards, registered only through the logical variable
            start = 0
            for k, rows in enumerate(sizes):
                shards.append(
                    Variable(
                        host[start : start + rows], name=f"{logical}/part_{k}", trainable=trainable,
                        device=targets[k % len(targets)],
                    )
                )
                start += rows
        self._init_from_shards(logical, shards, trainable)

    @classmethod
    def _from_shards(cls, name: str, shards: Sequence[Variable], trainable: bool = True) -> ShardedVariable:
        self = object.__new__(cls)
        self._init_from_shards(name, list(shards), trainable)
        return self

    def _init_from_shards(self, name: str, shards: list[Variable], trainable: bool) -> None:
        if not shards:
            raise InvalidArgumentError(f"ShardedVariable {name!r} needs at least one shard")
        tail = shards[0].shape[1:]
        for s in shards:
            if s._known_dtype() != shards[0]._known_dtype() or not s.shape or s.shape[1:] != tail:
                raise InvalidArgumentError(f"ShardedVariable {name!r}: shards must share dtype and trailing dims")
        self._shards = shards
        self._trainable = trainable
        self._name = current_registry().add(self, name)

    # --- metadata --------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def variables(self) -> list[Variable]:
        """The shard variables, in order along axis 0."""
        return list(self._shards)

    @property
    def offsets(self) -> list[int]:
        """Each shard's first row in the full variable."""
        out, start = [], 0
        for s in self._shards:
            out.append(start)
            start += s.shape[0]
        return out

    def _known_shape(self) -> tuple[int, ...]:
        """The full (logical) shape: the shards' rows added up."""
        first = self._shards[0].shape
        return (sum(s.shape[0] for s in self._shards),) + tuple(first[1:])

    @property
    def physical_device(self) -> PhysicalDevice:
        """The first shard's device (where ``value()`` concatenates)."""
        return self._shards[0].physical_device

    def _known_dtype(self) -> np.dtype[Any] | None:
        return self._shards[0]._known_dtype()

    @property
    def trainable(self) -> bool:
        return self._trainable

    @property
    def initialized(self) -> bool:
        return all(s.initialized for s in self._shards)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(s.device for s in self._shards)

    @property
    def device(self) -> str:
        return self._shards[0].device

    @property
    def initializer(self) -> Op:
        """An op that initializes every shard whose initial value is deferred."""
        return Op(f"{self._name}/Assign", lambda: run_init([self]))

    def _init_plans(self) -> list[InitPlan]:
        return [p for s in self._shards for p in s._init_plans()]

    def _mark_uninitialized(self) -> None:
        for s in self._shards:
            variable.invalidate(s)

    # --- reads and writes --------------------------------------------------------------------------

    def numpy(self) -> np.ndarray[Any, Any]:
        """The concatenation of the shards, on the host."""
        return np.concatenate([s.numpy() for s in self._shards], axis=0)

    def value(self) -> Any:
        """The concatenation, on the first shard's device."""
        first = self._shards[0].physical_device
        parts = [copy_to(s, first) for s in self._shards]
        return first.backend.xp.concatenate(parts, axis=0)

    def _targets(self) -> list[PhysicalDevice]:
        return [s.physical_device for s in self._shards]

    def _host_value(self, value: Any, shape: tuple[int, ...], what: str) -> np.ndarray[Any, Any]:
        """``value`` admitted (the transfer guard judges it against every shard's device),
        on the host, cast to the variable's dtype, with exactly ``shape``."""
        located = admit(value, self._targets(), what)
        host = to_host(located[0], located[1])
        dtype = self.dtype
        python = located[1] is None and not isinstance(value, (np.ndarray, np.generic))
        _shapes.check_value_dtype(host, dtype, what, python=python)
        if host.shape != shape:
            raise InvalidArgumentError(
                f"{what}: the value has shape {host.shape}, expected {shape}"
            )
        return host.astype(dtype, copy=False)

    def _split(self, value: Any, what: str) -> list[Any]:
        host = self._host_value(value, self.shape, f"Cannot {what} value to sharded variable '{self._name}'")
        return [host[o : o + s.shape[0]] for o, s in zip(self.offsets, self._shards)]

    def _write(self, op: str, value: Any) -> None:
        method = "assign" if op == "assign" else f"assign_{op}"
        for part, s in zip(self._split(value, method), self._shards):
            getattr(s, method)(on_device(part, s.physical_device))

    def _scatter(self, op: str, indices: Any, updates: Any) -> ShardedVariable:
        method = f"scatter_{op}"
        what = f"{method} on sharded variable '{self._name}'"
        rows = self.shape[0]
        idx = scatter_indices(indices, rows, what)
        upd = self._host_value(updates, tuple(np.shape(indices)) + self.shape[1:], what)
        upd = upd.reshape((idx.size,) + self.shape[1:])
        bounds = self.offsets + [rows]
        for k, s in enumerate(self._shards):
            mask = (idx >= bounds[k]) & (idx < bounds[k + 1])
            if mask.any():
                getattr(s, method)(idx[mask] - bounds[k], on_device(upd[mask], s.physical_device))
        return self

    def __repr__(self) -> str:
        return f"<gpuvars.ShardedVariable '{self._name}' shape={self.shape} dtype={self._known_dtype()} shards={len(self._shards)}>"
