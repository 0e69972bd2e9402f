"""Where code runs: cross-replica (the default) or inside ``strategy.run`` as one replica.

The current strategy and replica context live in ContextVars; ``strategy.run`` runs
each replica in a copy of the caller's context plus its replica context (replica 0 on
the caller's thread, the others on the strategy's persistent threads, :mod:`._pool`),
and a rendezvous gives every collective (aggregated updates, all_reduce) the values of
all replicas, as TF's merge_call does.
"""

from __future__ import annotations

import contextvars
import enum
import threading
from typing import TYPE_CHECKING, Any, Callable, Sequence

from gpuvars.errors import GpuvarsError, InvalidArgumentError

if TYPE_CHECKING:
    from gpuvars.distribute.strategy import MirroredStrategy

__all__ = ["PerReplica", "ReduceOp", "ReplicaContext", "get_replica_context", "get_strategy"]

_strategy: contextvars.ContextVar[MirroredStrategy | None] = contextvars.ContextVar("gpuvars_strategy", default=None)
_replica: contextvars.ContextVar[ReplicaContext | None] = contextvars.ContextVar("gpuvars_replica", default=None)

RENDEZVOUS_TIMEOUT_S = 600.0


class ReduceOp(enum.Enum):
    """How per-replica values combine (tf.distribute.ReduceOp)."""

    SUM = "SUM"
    MEAN = "MEAN"

    @classmethod
    def from_obj(cls, obj: Any) -> ReduceOp:
        """From a ReduceOp, its name (any case) or a VariableAggregation SUM/MEAN."""
        if isinstance(obj, cls):
            return obj
        name = getattr(obj, "name", obj)
        if isinstance(name, str) and name.upper() in cls.__members__:
            return cls[name.upper()]
        raise InvalidArgumentError(f"reduce op must be SUM or MEAN, got {obj!r}")


class PerReplica:
    """One value per replica (what ``strategy.run`` returns and takes as distributed input)."""

    __slots__ = ("values",)

    def __init__(self, values: Sequence[Any]) -> None:
        self.values = tuple(values)

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        return f"PerReplica({', '.join(f'{i}: {v!r}' for i, v in enumerate(self.values))})"


class _Rendezvous:
    """All replicas deposit a value; the last to arrive combines the list once, inside the
    barrier, and every replica leaves with that result: one barrier wait per collective.

    One set of slots is enough: the combine runs before the barrier releases anyone, and
    the next collective's combine cannot run before every replica has reached it, so no
    replica can overwrite a slot or the result while another still needs it.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._slots: list[Any] = [None] * n
        self._combine: list[Callable[[list[Any]], Any]] = [list] * n
        self._result: Any = None
        self._barrier = threading.Barrier(max(n, 1), action=self._reduce)

    @property
    def broken(self) -> bool:
        """Whether a replica aborted it (or a wait timed out): a later call needs a new one."""
        return self._barrier.broken

    def _reduce(self) -> None:
        # run by exactly one replica, after all n arrived; it must not raise (a raising
        # action breaks the barrier): a failure becomes the result every replica re-raises
        try:
            self._result = self._combine[0](list(self._slots))
        except BaseException as exc:
            self._result = _Failed(exc)

    def exchange(self, replica: int, value: Any, combine: Callable[[list[Any]], Any] = list) -> Any:
        """``combine([value of replica 0, ..., value of replica n-1])``, computed by one replica
        (with replica 0's ``combine``)."""
        if self.n == 1:
            return combine([value])
        self._slots[replica] = value
        self._combine[replica] = combine
        try:
            self._barrier.wait(RENDEZVOUS_TIMEOUT_S)
        except threading.BrokenBarrierError:
            raise _ReplicaAborted(
                f"replica {replica}: another replica failed or did not reach the same collective "
                f"within {RENDEZVOUS_TIMEOUT_S:.0f}s (every replica must make the same aggregated "
                "updates in the same order)"
            ) from None
        out = self._result
        if isinstance(out, _Failed):
            raise out.exc
        return out

    def abort(self) -> None:
        self._barrier.abort()

    def clear(self) -> None:
        """Drop the last collective's values and functions (between calls that share it)."""
        n = self.n
        self._slots = [None] * n
        self._combine = [list] * n
        self._result = None


class _Failed:
    """The combine step raised: every replica re-raises it."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _ReplicaAborted(GpuvarsError, RuntimeError):
    """A replica gave up on a collective because another one failed (internal)."""


class ReplicaContext:
    """The replica a function runs as inside ``strategy.run`` (tf.distribute.ReplicaContext)."""

    def __init__(self, strategy: MirroredStrategy, replica_id: int, rendezvous: _Rendezvous) -> None:
        self.strategy = strategy
        # replica_id: among this process's replicas (its components, its rendezvous slot);
        # the id in the sync group counts the replicas of lower processes first
        self._local_id = replica_id
        self.replica_id_in_sync_group = strategy._replica_offset + replica_id
        self._rendezvous = rendezvous

    @property
    def num_replicas_in_sync(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def device(self) -> str:
        """This replica's device."""
        return self.strategy.devices[self._local_id]

    def _exchange(self, value: Any, combine: Callable[[list[Any]], Any] = list) -> Any:
        return self._rendezvous.exchange(self._local_id, value, combine)

    def all_reduce(self, reduce_op: Any, value: Any) -> Any:
        """Combine ``value`` across replicas; every replica gets the result on its own device.

        The reduction runs once (on replica 0's device); each replica then copies the result.
        """
        op = ReduceOp.from_obj(reduce_op)
        total = self._exchange(value, lambda values: self.strategy._reduce_to(op, values, 0))
        return self.strategy._to_replica(total, self._local_id)

    def __repr__(self) -> str:
        return f"<ReplicaContext replica {self.replica_id_in_sync_group} of {self.num_replicas_in_sync}>"


def get_replica_context() -> ReplicaContext | None:
    """The replica context inside ``strategy.run``, else None (cross-replica context)."""
    return _replica.get()


def get_strategy() -> MirroredStrategy | None:
    """The strategy whose ``scope()`` (or ``run``) encloses this code, or None."""
    return _strategy.get()
