"""What a save records besides values: VariablePolicy and SaveOptions (TF's names)."""

from __future__ import annotations

import dataclasses
import enum

from gpuvars.errors import InvalidArgumentError

__all__ = ["SaveOptions", "VariablePolicy"]


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

    Example:
        >>> import gpuvars as gv
        >>> gv.SaveOptions(experimental_variable_policy="save_variable_devices").experimental_variable_policy
        <VariablePolicy.SAVE_VARIABLE_DEVICES: 'save_variable_devices'>
    """

    experimental_variable_policy: VariablePolicy | str | None = VariablePolicy.NONE
    progress: bool | None = None
    copy_on_write_bytes: int | None = 1 << 30

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "experimental_variable_policy", VariablePolicy.from_obj(self.experimental_variable_policy)
        )
        if self.progress is not None and not isinstance(self.progress, bool):
            raise InvalidArgumentError(f"SaveOptions.progress must be a bool or None, got {self.progress!r}")
        cow = self.copy_on_write_bytes
        if cow is not None and (isinstance(cow, bool) or not isinstance(cow, int) or cow < 0):
            raise InvalidArgumentError(f"SaveOptions.copy_on_write_bytes must be None or an int >= 0, got {cow!r}")

    @property
    def policy(self) -> VariablePolicy:
        """The policy as an enum member."""
        assert isinstance(self.experimental_variable_policy, VariablePolicy)
        return self.experimental_variable_policy
