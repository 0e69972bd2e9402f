"""How each kind of variable maps to checkpoint tensors: one logical tensor per variable,
plus, under EXPAND_DISTRIBUTED_VARIABLES, one component tensor per replica file.

- plain: its storage.
- mirrored: the primary's value; restored into the primary, then copied to every component.
- sync_on_read: the cross-replica (reduced) value; a restore sets every component to it,
  divided by the replica count for SUM.
- sharded: the concatenation along axis 0; a restore re-slices it into any shard count.

When an EXPAND checkpoint's components match the target's topology (same count, same
shard rows), each component is restored from its own replica file instead: exact
per-replica state, no re-slicing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from gpuvars.checkpoint import _format, _transfer
from gpuvars.checkpoint import _stformat as st
from gpuvars.placement import copy_to
from gpuvars.variable import Variable, VariableAggregation

if TYPE_CHECKING:
    from gpuvars.distribute import ShardedVariable

#: anything a Saver accepts: a Variable (plain or distributed) or a ShardedVariable
Saveable = Any


def kind_of(var: Saveable) -> str:
    return str(getattr(var, "kind", "plain"))


def components(var: Saveable) -> list[Variable]:
    """The per-replica components (mirrored, sync-on-read) or shards (sharded); [] for plain."""
    kind = kind_of(var)
    if kind in ("mirrored", "sync_on_read"):
        return list(var.values)
    if kind == "sharded":
        return list(var.variables)
    return []


def is_saveable(var: Any) -> bool:
    from gpuvars.distribute import ShardedVariable

    return isinstance(var, (Variable, ShardedVariable))


def save_source(var: Saveable) -> Any:
    """What the writer streams for the logical tensor of ``var``."""
    kind = kind_of(var)
    if kind == "mirrored":
        return _transfer.source(var.primary)
    if kind == "sync_on_read":
        return np.ascontiguousarray(var.numpy())  # the reduced value, one tensor in host memory
    if kind == "sharded":
        return _chain(var.variables)
    return _transfer.source(var)


def _chain(shards: list[Variable]) -> Iterator[Any]:
    for shard in shards:
        src = _transfer.source(shard)
        if isinstance(src, np.ndarray):
            yield src
        else:
            yield from src


def device_record(var: Saveable) -> dict[str, Any]:
    """The device-map entry of ``var``: its device, kind and, when distributed, its components."""
    kind = kind_of(var)
    if kind in ("mirrored", "sync_on_read"):
        return _format.device_record(kind, var.device, [c.device for c in var.values],
                                     aggregation=var.aggregation, synchronization=var.synchronization)
    if kind == "sharded":
        return _format.device_record(
            kind, var.device, [(s.device, o, int(s.shape[0])) for s, o in zip(var.variables, var.offsets)])
    return _format.device_record(kind, var.device)


# --- restore plans -------------------------------------------------------------------------------


@dataclasses.dataclass
class Read:
    """One tensor to read: from ``file``, key ``key``, with expected shape/dtype/checksum."""

    file: str
    key: str
    shape: tuple[int, ...]
    dtype: str
    checksum: str | None
    apply: Callable[[st.SafetensorsReader], None]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * st.np_dtype(self.dtype).itemsize


def plan(index: _format.Index, key: str, var: Saveable) -> list[Read]:
    """The reads that restore ``var`` from ``key`` of ``index``."""
    entry = index.variables[key]
    kind = kind_of(var)
    comps = components(var)
    saved = entry.components
    if comps and saved and len(saved) == len(comps) and all(
        tuple(c.shape) == s.shape for c, s in zip(comps, saved)  # type: ignore[arg-type]
    ):
        return [
            Read(s.file, key, s.shape, entry.dtype, s.checksum, _into(key, c, s.checksum))
            for c, s in zip(comps, saved)
        ]
    whole = Read(entry.file, key, entry.shape, entry.dtype, entry.checksum, lambda r: None)
    if kind == "plain":
        whole.apply = _into(key, var, entry.checksum)
    elif kind == "mirrored":
        whole.apply = lambda r: _broadcast(r, key, var.values, entry.checksum, divide_by=1)
    elif kind == "sync_on_read":
        n = len(comps) if var.aggregation is VariableAggregation.SUM else 1
        whole.apply = lambda r: _broadcast(r, key, var.values, entry.checksum, divide_by=n)
    elif kind == "sharded":
        whole.apply = lambda r: _reslice(r, key, var, entry.checksum)
    return [whole]


def _into(key: str, var: Variable, checksum: str | None) -> Callable[[st.SafetensorsReader], None]:
    def apply(reader: st.SafetensorsReader) -> None:
        var._set_storage(_transfer.restore(reader, key, var, checksum))

    return apply


def _broadcast(reader: st.SafetensorsReader, key: str, comps: Any, checksum: str | None, divide_by: int) -> None:
    primary = comps[0]
    primary._set_storage(_transfer.restore(reader, key, primary, checksum))
    if divide_by == 1 and len(comps) == 1:
        return
    host = primary.numpy()
    if divide_by != 1:
        host = (host / divide_by).astype(host.dtype)
    for c in comps:
        if c is not primary or divide_by != 1:
            c._install(copy_to(host, c._device))


def _reslice(reader: st.SafetensorsReader, key: str, var: ShardedVariable, checksum: str | None) -> None:
    info = reader.tensors[key]
    host = np.empty(info.shape, dtype=info.dtype)  # the whole logical tensor, once, on the host
    reader.read_into(key, host, expected_checksum=checksum)
    for shard, offset in zip(var.variables, var.offsets):
        rows = int(shard.shape[0])  # type: ignore[index]
        shard._install(copy_to(host[offset : offset + rows], shard._device))
