"""What a save records besides values: VariablePolicy and SaveOptions (TF's names)."""

from __future__ import annotations

import dataclasses
import enum
import re

from gpuvars.errors import InvalidArgumentError

__all__ = ["SaveOptions", "VariablePolicy", "parse_size"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]+)\s*([A-Za-z]*)\s*")


def parse_size(size: object, what: str = "max_shard_size") -> int:
    """A byte count from an int or a string as transformers' ``max_shard_size`` takes it:
    ``"5GB"`` (10**9), ``"500MB"``, ``"2GiB"`` (2**30), ``"100KB"``, ``"4096"``; units are
    case-insensitive, except that a trailing lowercase ``b`` after a prefix (``"5Gb"``,
    gigabits to transformers) is refused as ambiguous. Must be positive.

    Raises:
        InvalidArgumentError: anything else (a bool, a float, 0, a negative or an unknown unit).

    Example:
        >>> parse_size("5GB"), parse_size("2MiB"), parse_size(1000)
        (5000000000, 2097152, 1000)
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise InvalidArgumentError(f"{what} must be a positive int (bytes) or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = _SIZE.fullmatch(size)
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise InvalidArgumentError(
                f"{what} {size!r} is not a size: use bytes or a number with KB/MB/GB/TB (powers of 10) or "
                "KiB/MiB/GiB/TiB (powers of 2), e.g. '5GB'")
        if len(m.group(2)) >= 2 and m.group(2).endswith("b") and m.group(2)[-2] != "i":
            raise InvalidArgumentError(
                f"{what} {size!r} is ambiguous (transformers reads a lowercase 'b' as bits): write "
                f"{m.group(1)}{m.group(2)[:-1].upper()}B for bytes")
        n = int(m.group(1)) * _UNITS[unit]
    if n <= 0:
        raise InvalidArgumentError(f"{what} must be positive, got {size!r}")
    return n


class VariablePolicy(enum.Enum):
    """How a checkpoint records devices and distributed variables.

    - ``NONE`` (default): values only; ``gv.load_checkpoint`` places by scope / ``device=``.
    - ``SAVE_VARIABLE_DEVICES``: also ``P.devices.json``, the device of every variable;
      ``gv.load_checkpoint`` puts each variable back on its saved device (soft placement applies).
    - ``EXPAND_DISTRIBUTED_VARIABLES``: devices too, plus one ``P.replica-K-of-N.safetensors``
      per replica holding each distributed variable's K-th component.
    """

    NONE = "none"
    SAVE_VARIABLE_DEVICES = "save_variable_devices"
    EXPAND_DISTRIBUTED_VARIABLES = "expand_distributed_variables"

    @classmethod
    def from_obj(cls, obj: VariablePolicy | str | None) -> VariablePolicy:
        """The policy for an enum member, its name or value (case-insensitive), or None (NONE)."""
        if obj is None:
            return cls.NONE
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, str):
            key = obj.strip().lower()
            for member in cls:
                if key in (member.value, member.name.lower()):
                    return member
        raise InvalidArgumentError(
            f'Invalid VariablePolicy value "{obj}"; expected one of {[m.name for m in cls]}'
        )

    def saves_devices(self) -> bool:
        """Whether this policy writes the device map."""
        return self is not VariablePolicy.NONE


@dataclasses.dataclass(frozen=True)
class SaveOptions:
    """Options for :meth:`gpuvars.Saver.save` (TF's tf.saved_model.SaveOptions subset).

    Args:
        experimental_variable_policy: a :class:`VariablePolicy` or its name (case-insensitive).
        progress: show a progress bar for large saves/restores on a terminal (None: auto,
            blocking saves only; an asynchronous save shows one only with True).
        copy_on_write_bytes: the most memory a save holds in copies of variables mutated
            before it has written them (G3; on each variable's device). When it is spent, a
            mutation waits until the writer has written that variable (the writer takes it
            next). None: no limit. Default 1 GiB.
        max_shard_size: split the data file into shards of at most this many tensor bytes
            (an int, or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"`` as transformers takes
            it): ``P-00001-of-0000N.safetensors`` ..., written in parallel, named by a
            ``weight_map`` in the index (format version 2). A tensor larger than the size
            gets a shard of its own; tensors are never split. None (default): one
            ``P.safetensors`` (format version 1). Stored normalized to an int.
        commit_timeout: a save across processes (after ``gv.distributed.initialize``): the
            most seconds one process waits for the others at each of its two rounds (start,
            commit), which includes how much longer their writing takes. Past it, nothing is
            committed and every process raises :class:`gpuvars.CheckpointCommitError`
            naming the late processes. Default 300.

    Example:
        >>> import gpuvars as gv
        >>> gv.SaveOptions(experimental_variable_policy="save_variable_devices").experimental_variable_policy
        <VariablePolicy.SAVE_VARIABLE_DEVICES: 'save_variable_devices'>
    """

    experimental_variable_policy: VariablePolicy | str | None = VariablePolicy.NONE
    progress: bool | None = None
    copy_on_write_bytes: int | None = 1 << 30
    max_shard_size: int | str | None = None
    commit_timeout: float = 300.0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "experimental_variable_policy", VariablePolicy.from_obj(self.experimental_variable_policy)
        )
        if self.progress is not None and not isinstance(self.progress, bool):
            raise InvalidArgumentError(f"SaveOptions.progress must be a bool or None, got {self.progress!r}")
        cow = self.copy_on_write_bytes
        if cow is not None and (isinstance(cow, bool) or not isinstance(cow, int) or cow < 0):
            raise InvalidArgumentError(f"SaveOptions.copy_on_write_bytes must be None or an int >= 0, got {cow!r}")
        if self.max_shard_size is not None:
            object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size, "SaveOptions.max_shard_size"))
        t = self.commit_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or t == float("inf"):
            raise InvalidArgumentError(f"SaveOptions.commit_timeout must be a finite number of seconds > 0, got {t!r}")

    @property
    def shard_bytes(self) -> int | None:
        """``max_shard_size`` in bytes (None: one data file)."""
        assert self.max_shard_size is None or isinstance(self.max_shard_size, int)
        return self.max_shard_size

    @property
    def policy(self) -> VariablePolicy:
        """The policy as an enum member."""
        assert isinstance(self.experimental_variable_policy, VariablePolicy)
        return self.experimental_variable_policy
