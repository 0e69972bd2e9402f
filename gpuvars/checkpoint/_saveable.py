"""One small saveable adapter per kind of variable: the only way checkpoint code reaches
variables (DESIGN decision 22, STYLE 18).

Each kind maps to one logical tensor in ``P.safetensors`` plus, under
EXPAND_DISTRIBUTED_VARIABLES, one component tensor per replica file:

- plain: its storage.
- mirrored: the primary's value; restored into the primary, then copied to every component.
- sync_on_read: the cross-replica (reduced) value; a restore sets every component to it,
  divided by the replica count for SUM.
- sharded: the concatenation along axis 0; a restore re-slices it into any shard count.

When an EXPAND checkpoint's components match the target's topology (same count, same
shapes), each component is restored from its own replica file instead: exact
per-replica state, no re-slicing.

Adapters use only the variables' public API, the engine access functions of
``gpuvars.variable`` (``restore_target``, ``adopt``, ``install``, ``invalidate``) and
``gpuvars._transfer.copy_to``; backend calls run inside the one error mapping of
``gpuvars._backend_errors``.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import numpy as np

from gpuvars import devices as _devices
from gpuvars._backend_errors import backend_errors
from gpuvars._transfer import copy_to
from gpuvars.checkpoint import _format, _transfer
from gpuvars.checkpoint import _stformat as st
from gpuvars.distribute import MirroredVariable, ShardedVariable, SyncOnReadVariable
from gpuvars.errors import InvalidArgumentError
from gpuvars.initializers import Zeros
from gpuvars.placement import PhysicalDevice
from gpuvars.registry import Registry
from gpuvars.variable import (
    Variable,
    VariableAggregation,
    VariableSynchronization,
    exclusive,
    install,
    invalidate,
)

if TYPE_CHECKING:
    from gpuvars.distribute.values import DistributedVariable

__all__ = [
    "MirroredSaveable",
    "PlainSaveable",
    "Read",
    "Saveable",
    "ShardedSaveable",
    "SyncOnReadSaveable",
    "adapter_for_kind",
    "is_saveable",
    "saveable_for",
    "unregister",
]


class Read:
    """One tensor a restore reads: ``key`` from ``file`` with the expected shape, dtype and
    checksum; ``fn(reader, read)`` puts it into ``target``."""

    __slots__ = ("file", "key", "shape", "dtype", "checksum", "nbytes", "target", "fn")

    def __init__(
        self,
        file: str,
        key: str,
        shape: tuple[int, ...],
        dtype: str,
        checksum: str | None,
        target: Any,
        fn: Callable[[st.SafetensorsReader, Read], None],
    ) -> None:
        self.file, self.key, self.shape, self.dtype, self.checksum = file, key, shape, dtype, checksum
        self.nbytes = math.prod(shape) * st.np_dtype(dtype).itemsize
        self.target, self.fn = target, fn

    def apply(self, reader: st.SafetensorsReader) -> None:
        self.fn(reader, self)


def _into_variable(reader: st.SafetensorsReader, read: Read) -> None:
    _transfer.restore_into(reader, read.key, read.target, read.checksum)


class Saveable:
    """What a save and a restore need of one variable (the plain kind's behaviour)."""

    kind: ClassVar[str] = "plain"
    __slots__ = ("var",)

    def __init__(self, var: Any) -> None:
        self.var = var

    # --- what the index records -----------------------------------------------------------

    @property
    def name(self) -> str:
        return str(self.var.name)

    @property
    def dtype(self) -> np.dtype[Any] | None:
        """The variable's dtype (None while unknown: a deferred callable that never ran)."""
        return self.var._known_dtype()  # type: ignore[no-any-return]

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The logical tensor's shape (None while unknown)."""
        shape = self.var._known_shape()
        return None if shape is None else tuple(shape)

    @property
    def trainable(self) -> bool:
        return bool(self.var.trainable)

    @property
    def initialized(self) -> bool:
        return bool(self.var.initialized)

    @property
    def device(self) -> str:
        return str(self.var.device)

    def accepts(self, shape: tuple[int, ...]) -> bool:
        """Whether a saved tensor of ``shape`` may be restored into the variable."""
        declared = self.var.declared_shape
        return declared is None or declared == shape or (
            len(declared) == len(shape) and all(d is None or d == s for d, s in zip(declared, shape))
        )

    def describe_accepted(self) -> Any:
        return self.var.declared_shape

    def components(self) -> Sequence[Variable]:
        """The per-replica components or shards written to replica files (none for plain)."""
        return ()

    def device_record(self) -> dict[str, Any]:
        return _format.device_record(self.kind, self.device)

    # --- save and restore -------------------------------------------------------------------

    def parts(self, key: str) -> list[Any]:
        """What the logical tensor is made of, along axis 0: variables (a save pins their
        storage at its call) or arrays computed at the call."""
        return [self.var]

    def reads(self, key: str, entry: _format.VarEntry) -> list[Read]:
        """The reads that restore the variable from ``entry`` of the index."""
        return [Read(entry.file, key, entry.shape, entry.dtype, entry.checksum, self.var, _into_variable)]

    def _component_reads(self, key: str, entry: _format.VarEntry) -> list[Read] | None:
        """One read per component from the replica files, when the saved components match
        this variable's (count and shapes); else None."""
        comps, saved = self.components(), entry.components
        offset, total = _replica_slot(self.var, len(comps))
        if saved and len(saved) == total != len(comps):  # this process's replicas of every process's
            saved = saved[offset:offset + len(comps)]
        if not saved or len(saved) != len(comps) or any(c.shape != s.shape for c, s in zip(comps, saved)):
            return None
        return [Read(s.file, key, s.shape, entry.dtype, s.checksum, c, _into_variable) for c, s in zip(comps, saved)]

    def invalidate(self) -> None:
        """Mark the variable (each of its components) uninitialized: a restore that
        failed half-way does this."""
        for part in self.components() or (self.var,):
            invalidate(part)

    @classmethod
    def build(
        cls,
        name: str,
        entry: _format.VarEntry,
        record: dict[str, Any],
        placed: Sequence[PhysicalDevice],
    ) -> Any:
        """A new, unfilled distributed variable of this kind with its components on ``placed``
        (``gv.load_checkpoint`` builds plain variables itself)."""
        raise InvalidArgumentError(f"checkpoint key {entry.key!r}: a {cls.kind} variable has no components to build")


def _replica_slot(var: Any, count: int) -> tuple[int, int]:
    """(the first replica id of this process's ``count`` components, every process's
    replicas): (0, count) unless ``var`` is mirrored over several processes."""
    strategy = getattr(var, "_strategy", None)
    if strategy is None:
        return 0, count
    return int(getattr(strategy, "_replica_offset", 0)), int(strategy.num_replicas_in_sync)


class PlainSaveable(Saveable):
    """A plain :class:`gpuvars.Variable`."""

    __slots__ = ()


class _ReplicatedSaveable(Saveable):
    """Mirrored and sync-on-read variables: components on several devices, one logical value."""

    __slots__ = ()
    var: DistributedVariable

    def components(self) -> Sequence[Variable]:
        return self.var.values

    def device_record(self) -> dict[str, Any]:
        return _format.device_record(
            self.kind, self.device, [c.device for c in self.var.values],
            aggregation=self.var.aggregation, synchronization=self.var.synchronization,
        )

    def _divide_by(self) -> int:
        return 1

    def reads(self, key: str, entry: _format.VarEntry) -> list[Read]:
        per_component = self._component_reads(key, entry)
        if per_component is not None:
            return per_component
        target = (tuple(self.var.values), self._divide_by())
        return [Read(entry.file, key, entry.shape, entry.dtype, entry.checksum, target, _broadcast)]

    @classmethod
    def build(
        cls,
        name: str,
        entry: _format.VarEntry,
        record: dict[str, Any],
        placed: Sequence[PhysicalDevice],
    ) -> Any:
        """A new, unfilled variable of this kind with its components on ``placed`` (for
        ``gv.load_checkpoint``, without the strategy that made it)."""
        from gpuvars.distribute.strategy import build_components

        dtype = st.np_dtype(entry.dtype)
        parts = build_components(name, placed, Zeros(entry.shape, dtype), trainable=False)
        var_cls = SyncOnReadVariable if cls.kind == "sync_on_read" else MirroredVariable
        return var_cls._build(
            name, parts, strategy=None, trainable=entry.trainable,
            synchronization=VariableSynchronization[record.get("synchronization", "AUTO")],
            aggregation=VariableAggregation[record.get("aggregation", "NONE")],
        )


def _broadcast(reader: st.SafetensorsReader, read: Read) -> None:
    """Restore the logical tensor into the primary, then copy it (divided, for a SUM
    sync-on-read variable) to every component."""
    comps, divide_by = read.target
    primary = comps[0]
    _transfer.restore_into(reader, read.key, primary, read.checksum)
    if divide_by == 1 and len(comps) == 1:
        return
    what = f"restoring {read.key!r} from {reader.path!r} into the components of a distributed variable"
    with backend_errors(primary.physical_device, what):
        host = primary.numpy()
        if divide_by != 1:
            host = (host / divide_by).astype(host.dtype)
    for c in comps:
        if c is not primary or divide_by != 1:
            with backend_errors(c.physical_device, what):
                install(c, copy_to(host, c.physical_device))


class MirroredSaveable(_ReplicatedSaveable):
    """A :class:`gpuvars.MirroredVariable`: the primary's value is the logical tensor."""

    kind = "mirrored"
    __slots__ = ()

    def parts(self, key: str) -> list[Any]:
        return [self.var.primary]


class SyncOnReadSaveable(_ReplicatedSaveable):
    """A :class:`gpuvars.SyncOnReadVariable`: the cross-replica (reduced) value is the logical tensor."""

    kind = "sync_on_read"
    __slots__ = ()

    def parts(self, key: str) -> list[Any]:
        primary = self.var.primary
        with contextlib.ExitStack() as hold:
            for c in self.var.values:  # no component changes while the reduction reads it
                hold.enter_context(exclusive(c))
            with backend_errors(primary.physical_device, f"saving {key!r}: reducing variable {self.name!r}"):
                return [np.array(self.var.numpy(), order="C")]  # the reduced value, at the call, in host memory

    def _divide_by(self) -> int:
        return self.var.replicas_in_sync if self.var.aggregation is VariableAggregation.SUM else 1


class ShardedSaveable(Saveable):
    """A :class:`gpuvars.ShardedVariable`: the concatenation of its shards along axis 0."""

    kind = "sharded"
    __slots__ = ()
    var: ShardedVariable

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return tuple(self.var.shape) == tuple(shape)  # re-slicing keeps the full shape

    def describe_accepted(self) -> Any:
        return tuple(self.var.shape)

    def components(self) -> Sequence[Variable]:
        return self.var.variables

    def device_record(self) -> dict[str, Any]:
        shards = self.var.variables
        return _format.device_record(
            self.kind, self.device,
            [(s.device, o, int(s.shape[0])) for s, o in zip(shards, self.var.offsets)],
        )

    def parts(self, key: str) -> list[Any]:
        return list(self.var.variables)

    def reads(self, key: str, entry: _format.VarEntry) -> list[Read]:
        per_shard = self._component_reads(key, entry)
        if per_shard is not None:
            return per_shard
        return [Read(entry.file, key, entry.shape, entry.dtype, entry.checksum, self.var, _reslice)]

    @classmethod
    def build(
        cls,
        name: str,
        entry: _format.VarEntry,
        record: dict[str, Any],
        placed: Sequence[PhysicalDevice],
    ) -> Any:
        """A new, unfilled sharded variable with the saved shard rows on ``placed``."""
        dtype = st.np_dtype(entry.dtype)
        rows = [int(c["rows"]) for c in record["components"]]
        with Registry(), _devices.device(None):  # shards register nowhere; resolved devices: no scope applies
            shards = [
                Variable(Zeros((r,) + entry.shape[1:], dtype), name=f"{name}/part_{k}", trainable=entry.trainable,
                         device=dev.name)
                for k, (r, dev) in enumerate(zip(rows, placed))
            ]
        return ShardedVariable._from_shards(name, shards, entry.trainable)


def _reslice(reader: st.SafetensorsReader, read: Read) -> None:
    """Read the whole logical tensor once into host memory, then copy each shard's rows."""
    var: ShardedVariable = read.target
    host = _transfer.host_tensor(reader, read.key, read.checksum, None)
    what = f"restoring {read.key!r} from {reader.path!r} into the shards of {var.name!r}"
    for shard, offset in zip(var.variables, var.offsets):
        rows = int(shard.shape[0])
        with backend_errors(shard.physical_device, what):
            install(shard, copy_to(host[offset : offset + rows], shard.physical_device))


# --- choosing an adapter ----------------------------------------------------------------------------


_BY_KIND: dict[str, type[Saveable]] = {
    "plain": PlainSaveable,
    "mirrored": MirroredSaveable,
    "sync_on_read": SyncOnReadSaveable,
    "sharded": ShardedSaveable,
}


def is_saveable(var: Any) -> bool:
    """Whether a Saver can hold ``var``: a Variable (plain or distributed) or a ShardedVariable."""
    return isinstance(var, (Variable, ShardedVariable))


def saveable_for(var: Any) -> Saveable:
    """The adapter of ``var``'s kind.

    Raises:
        InvalidArgumentError: ``var`` is not a variable a checkpoint can hold.
    """
    if isinstance(var, ShardedVariable):
        return ShardedSaveable(var)
    if isinstance(var, SyncOnReadVariable):
        return SyncOnReadSaveable(var)
    if isinstance(var, MirroredVariable):
        return MirroredSaveable(var)
    if isinstance(var, Variable):
        return PlainSaveable(var)
    raise InvalidArgumentError(f"a {type(var).__name__} is not a gv.Variable or gv.ShardedVariable")


def adapter_for_kind(kind: str) -> type[Saveable]:
    """The adapter class of a kind recorded in an index ("plain", "mirrored", ...)."""
    return _BY_KIND[kind]


def unregister(var: Any, registry: Registry) -> None:
    """Take ``var`` (made by a load that then failed) out of ``registry``."""
    registry.remove(var)
