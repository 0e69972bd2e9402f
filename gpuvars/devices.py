"""Device strings are parsed once, here, into frozen DeviceSpec values; scopes live in a ContextVar.

TensorFlow's device vocabulary (``DeviceSpecV2``, ``tf.device`` with graph-style
nesting, ``replica_device_setter``) with no notion of which devices exist: mapping a
spec to a physical device is ``placement.py``'s job. The scope stack is an immutable
tuple in a ContextVar, so a scope is seen only by its own thread or asyncio task and
leaving it, also by an exception, restores exactly the stack it replaced.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import TypeAlias

from gpuvars.errors import InvalidArgumentError

__all__ = [
    "DeviceFunction",
    "DeviceOp",
    "DeviceSpec",
    "current_device_spec",
    "device",
    "replica_device_setter",
]

# Types TF accepts in the short ``<TYPE>[:<i>]`` form; stored upper-cased.
_KNOWN_TYPES = frozenset({"CPU", "GPU", "TPU", "CUSTOM", "EPU"})


def _describe(value: object) -> str:
    return f"{type(value).__name__}({value!r})"


_SPEC_FIELDS = ("job", "replica", "task", "device_type", "device_index")  # DeviceSpec's fields, in order


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceSpec:
    """An immutable, possibly partial device specification (TF's ``DeviceSpecV2``).

    Unset fields are ``None`` ("any"). ``device_type`` is upper-cased when it is CPU,
    GPU, TPU, CUSTOM or EPU in any case, kept verbatim otherwise. Specs are equal when
    their fields are, which for anything a string can express is TF's rule of equal
    :meth:`to_string`.

    Args:
        job: Job name, e.g. ``"ps"``.
        replica: Replica index.
        task: Task index.
        device_type: E.g. ``"GPU"`` (``"gpu"`` is normalised).
        device_index: Index within the type; ``None`` is ``*``.

    Raises:
        InvalidArgumentError: A field of the wrong type, a negative index, or a name
            that is empty or holds ``/`` or ``:`` (it could not be parsed back).

    Example:
        >>> DeviceSpec(job="ps", task=1, device_type="gpu", device_index=0).to_string()
        '/job:ps/task:1/device:GPU:0'
    """

    job: str | None = None
    replica: int | None = None
    task: int | None = None
    device_type: str | None = None
    device_index: int | None = None

    def __post_init__(self) -> None:
        if self.job is None and self.replica is None and self.task is None and self.device_type is None \
                and self.device_index is None:
            return  # the empty spec every scope walk starts from: nothing to check
        for field, value in self._fields().items():
            if value is None:
                continue
            if field in ("job", "device_type"):
                expected = "a non-empty str without '/' or ':'"
                ok = isinstance(value, str) and value != "" and not {"/", ":"} & set(value)
            else:
                expected = "a non-negative int"
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            if not ok:
                raise InvalidArgumentError(
                    f"DeviceSpec {field} must be {expected} or None, got {_describe(value)}"
                )
        if self.device_type is not None and self.device_type.upper() in _KNOWN_TYPES:
            object.__setattr__(self, "device_type", self.device_type.upper())

    @classmethod
    def from_string(cls, spec: str) -> DeviceSpec:
        """Parse a TF device string giving any subset of the fields.

        Args:
            spec: E.g. ``"/job:ps/task:7/device:CPU:0"``, ``"/gpu:1"``, ``"GPU:1"``,
                ``"cpu"``, or ``""`` for the empty spec. ``*`` or no index means any.

        Returns:
            The parsed spec.

        Raises:
            InvalidArgumentError: Not a str, a non-numeric index, two device types,
                or a piece outside TF's grammar.

        Example:
            >>> DeviceSpec.from_string("/job:ps/gpu:1").to_string()
            '/job:ps/device:GPU:1'
        """
        if not isinstance(spec, str):
            raise InvalidArgumentError(f"A device string must be a str, got {_describe(spec)}")
        fields: dict[str, str | int | None] = {}

        def index(text: str, star: bool = False) -> int | None:
            if star and text == "*":
                return None
            if not (text.isascii() and text.isdigit()):
                raise InvalidArgumentError(f"invalid literal for int: '{text}' in '{spec}'")
            return int(text)

        def set_type(device_type: str, text: str) -> None:
            if "device_type" in fields:
                raise InvalidArgumentError(f"Cannot specify multiple device types: {spec}")
            fields["device_type"], fields["device_index"] = device_type, index(text, star=True)

        for piece in spec.split("/"):
            parts = piece.split(":")
            if parts == [""]:
                continue
            if len(parts) == 2 and parts[0] == "job":
                fields["job"] = parts[1]
            elif len(parts) == 2 and parts[0] in ("replica", "task"):
                fields[parts[0]] = index(parts[1])
            elif len(parts) <= 2 and parts[0].upper() in _KNOWN_TYPES:
                set_type(parts[0], parts[1] if len(parts) == 2 else "*")
            elif len(parts) == 3 and parts[0] == "device":
                set_type(parts[1], parts[2])
            else:
                raise InvalidArgumentError(f"Unknown attribute: '{parts[0]}' in '{spec}'")
        try:
            return cls(**fields)  # type: ignore[arg-type]
        except InvalidArgumentError as err:  # "/job:" or "/device::0"
            raise InvalidArgumentError(f"{err} in '{spec}'") from err

    @classmethod
    def coerce(cls, value: str | DeviceSpec) -> DeviceSpec:
        """Return ``value`` itself if it is a spec, else ``from_string(value)``.

        Args:
            value: A device string or a spec.

        Returns:
            The spec.

        Raises:
            InvalidArgumentError: Neither a str nor a spec, or a malformed string.

        Example:
            >>> DeviceSpec.coerce("/gpu:0") == DeviceSpec(device_type="GPU", device_index=0)
            True
        """
        if isinstance(value, DeviceSpec):
            return value
        if isinstance(value, str):
            return cls.from_string(value)
        raise InvalidArgumentError(
            f"Expecting a device string or a DeviceSpec, got {_describe(value)}"
        )

    def to_string(self) -> str:
        """Return TF's full form ``/job:J/replica:R/task:T/device:TYPE:I``, unset parts left out.

        Returns:
            The string: a type with no index prints ``*``, an index with no type
            prints nothing (as in TF), the empty spec gives ``""``.

        Example:
            >>> DeviceSpec(device_type="gpu").to_string()
            '/device:GPU:*'
        """
        out = []
        if self.job is not None:
            out.append(f"/job:{self.job}")
        if self.replica is not None:
            out.append(f"/replica:{self.replica}")
        if self.task is not None:
            out.append(f"/task:{self.task}")
        if self.device_type is not None:
            index = "*" if self.device_index is None else self.device_index
            out.append(f"/device:{self.device_type}:{index}")
        return "".join(out)

    def short_string(self) -> str:
        """Return the short form users see, e.g. ``/cpu:0`` or ``/gpu:1``.

        With a known type and an index the type is lower-cased and ``device:``
        dropped; job, replica and task stay if set, so the result parses back to
        this spec. Any other spec gives :meth:`to_string`.

        Returns:
            The short string.

        Example:
            >>> DeviceSpec.from_string("/device:GPU:1").short_string()
            '/gpu:1'
        """
        if self.device_type not in _KNOWN_TYPES or self.device_index is None:
            return self.to_string()
        assert self.device_type is not None  # for mypy; _KNOWN_TYPES holds only str
        prefix = dataclasses.replace(self, device_type=None, device_index=None).to_string()
        return f"{prefix}/{self.device_type.lower()}:{self.device_index}"

    def make_merged_spec(self, other: DeviceSpec) -> DeviceSpec:
        """Return a copy of this spec with every field that ``other`` sets copied over.

        Args:
            other: The spec whose set (non-``None``) fields win.

        Returns:
            The merged spec.

        Raises:
            InvalidArgumentError: ``other`` is not a DeviceSpec.

        Example:
            >>> DeviceSpec.from_string("/job:ps/gpu:0").make_merged_spec(
            ...     DeviceSpec(device_index=1)).to_string()
            '/job:ps/device:GPU:1'
        """
        if not isinstance(other, DeviceSpec):
            raise InvalidArgumentError(
                f"make_merged_spec expects a DeviceSpec, got {_describe(other)}"
            )
        overrides = {k: v for k, v in other._fields().items() if v is not None}
        return dataclasses.replace(self, **overrides)  # type: ignore[arg-type]

    def replace(self, **fields: str | int | None) -> DeviceSpec:
        """Return a validated copy with the given fields replaced (``None`` unsets one).

        Args:
            **fields: Any of job, replica, task, device_type, device_index.

        Returns:
            The new spec.

        Raises:
            InvalidArgumentError: An unknown field name or an invalid value.

        Example:
            >>> DeviceSpec.from_string("/job:ps/task:0").replace(task=3).to_string()
            '/job:ps/task:3'
        """
        unknown = sorted(set(fields) - set(self._fields()))
        if unknown:
            raise InvalidArgumentError(
                f"DeviceSpec has no field {', '.join(unknown)}; "
                f"expected some of {', '.join(self._fields())}"
            )
        return dataclasses.replace(self, **fields)  # type: ignore[arg-type]

    def _fields(self) -> dict[str, str | int | None]:
        # the field names once, not dataclasses.fields() per call (a variable's creation asks
        # several times: 25 us of 44 per variable before)
        return dict(zip(_SPEC_FIELDS, (self.job, self.replica, self.task, self.device_type, self.device_index)))

    def _values(self) -> tuple[str | int | None, ...]:
        return (self.job, self.replica, self.task, self.device_type, self.device_index)

    def __str__(self) -> str:
        return self.to_string()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DeviceSpec):
            return NotImplemented
        # The fields are normalised, so this is to_string() equality, except that an
        # index without a type (which to_string cannot show) is not silently dropped.
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())


@dataclasses.dataclass(frozen=True)
class DeviceOp:
    """What a device function receives: the op being placed.

    Args:
        type: ``"Variable"`` for a variable creation, ``"Op"`` (or another name) otherwise.
        name: The op's (variable's) name.
        device: The device set so far by the scopes inside the function's own, as a
            TF full string; ``""`` if none.

    Example:
        >>> DeviceOp(type="Variable", name="w", device="/device:GPU:0").device
        '/device:GPU:0'
    """

    type: str
    name: str
    device: str


DeviceFunction: TypeAlias = Callable[[DeviceOp], "str | DeviceSpec | None"]


class _Reset(enum.Enum):
    RESET = "RESET"  # the entry of a device(None) scope: outer scopes stop applying


_Entry: TypeAlias = "DeviceSpec | DeviceFunction | _Reset"
_STACK: contextvars.ContextVar[tuple[_Entry, ...]] = contextvars.ContextVar(
    "gpuvars_device_stack", default=()
)


def device(
    spec: str | DeviceSpec | DeviceFunction | None,
) -> contextlib.AbstractContextManager[None]:
    """Return a scope that places what is created inside it (``tf.device``, graph-style).

    Nested scopes merge: inner fields win, outer scopes fill the unset ones. The
    argument is checked, and a string parsed, when ``device`` is called.

    Args:
        spec: A device string or DeviceSpec; a device function, called with a
            :class:`DeviceOp`, whose str or DeviceSpec result replaces the device
            (``None``: leave it); ``None`` to stop outer scopes from applying; or
            ``""``, which changes nothing.

    Returns:
        A single-use context manager restoring the previous scopes on exit, also
        when the block raises.

    Raises:
        InvalidArgumentError: Another type, or a malformed string.

    Example:
        >>> with device("/job:ps"), device("/gpu:1"):
        ...     str(current_device_spec())
        '/job:ps/device:GPU:1'
    """
    entry: _Entry | None
    if spec is None:
        entry = _Reset.RESET
    elif isinstance(spec, str):
        entry = DeviceSpec.from_string(spec) if spec else None
    elif isinstance(spec, DeviceSpec) or callable(spec):
        entry = spec
    else:
        raise InvalidArgumentError(
            "Expecting a string device name, a DeviceSpec, a device function or None. "
            f"Got {_describe(spec)}"
        )
    return _pushed(entry)


@contextlib.contextmanager
def _pushed(entry: _Entry | None) -> Iterator[None]:
    if entry is None:
        yield
        return
    token = _STACK.set((*_STACK.get(), entry))
    try:
        yield
    finally:
        _STACK.reset(token)


def current_device_spec(op_type: str = "Variable", name: str = "") -> DeviceSpec | None:
    """Resolve the active ``device`` scopes for an op about to be created.

    Walks from the innermost scope outwards: a spec fills the fields still unset, a
    device function's result replaces the spec so far, a ``None`` scope ends the walk.

    Args:
        op_type: ``DeviceOp.type`` for device functions.
        name: ``DeviceOp.name`` for device functions.

    Returns:
        The merged spec, or ``None`` if no scope sets any field.

    Raises:
        InvalidArgumentError: A device function returned something other than a
            str, DeviceSpec or None, or a malformed string.

    Example:
        >>> current_device_spec() is None
        True
    """
    spec = DeviceSpec()
    for entry in reversed(_STACK.get()):
        if entry is _Reset.RESET:
            break
        if isinstance(entry, DeviceSpec):
            spec = entry.make_merged_spec(spec)
            continue
        result = entry(DeviceOp(type=op_type, name=name, device=spec.to_string()))
        if result is None:
            continue
        if not isinstance(result, (str, DeviceSpec)):
            raise InvalidArgumentError(
                f"Device function {entry!r} must return a str, DeviceSpec or None, "
                f"got {_describe(result)}"
            )
        spec = DeviceSpec.coerce(result)
    return None if spec == DeviceSpec() else spec


class _RoundRobin:
    """TF's default ps strategy: tasks 0, 1, ..., n-1, 0, ..., one per variable."""

    def __init__(self, num_tasks: int) -> None:
        self._tasks = itertools.cycle(range(num_tasks))
        self._lock = threading.Lock()

    def __call__(self, op: DeviceOp) -> int:
        with self._lock:
            return next(self._tasks)


def replica_device_setter(
    ps_tasks: int = 0,
    ps_device: str | DeviceSpec = "/job:ps",
    worker_device: str | DeviceSpec = "/job:worker",
    merge_devices: bool = True,
    ps_strategy: Callable[[DeviceOp], int] | None = None,
) -> Callable[[DeviceOp], DeviceSpec] | None:
    """Return a device function putting variables on ps tasks and other ops on workers.

    A ``"Variable"`` op gets ``ps_device`` with ``task = ps_strategy(op)`` (unless
    the op names another job), then its own device fields override that. Other ops
    get ``worker_device`` under their own device. With ``merge_devices=False`` an op
    that already has a device keeps it.

    Args:
        ps_tasks: Number of parameter-server tasks; 0 gives ``None`` (no-op).
        ps_device: The ps job's device, e.g. ``"/job:ps"`` or ``"/job:ps/cpu:0"``.
        worker_device: The device of non-variable ops.
        merge_devices: Whether the op's own device merges into the chosen one.
        ps_strategy: ``op -> task``; default a thread-safe round robin per setter.

    Returns:
        The device function, or ``None`` if ``ps_tasks`` is 0.

    Raises:
        InvalidArgumentError: ``ps_tasks`` not a non-negative int, ``ps_strategy``
            not callable, or a malformed device string.

    Example:
        >>> setter = replica_device_setter(ps_tasks=2)
        >>> [str(setter(DeviceOp("Variable", f"v{i}", ""))) for i in range(3)]
        ['/job:ps/task:0', '/job:ps/task:1', '/job:ps/task:0']
    """
    if not isinstance(ps_tasks, int) or isinstance(ps_tasks, bool) or ps_tasks < 0:
        raise InvalidArgumentError(
            f"ps_tasks must be a non-negative int, got {_describe(ps_tasks)}"
        )
    if ps_strategy is not None and not callable(ps_strategy):
        raise InvalidArgumentError("ps_strategy must be callable")
    ps_spec, worker_spec = DeviceSpec.coerce(ps_device), DeviceSpec.coerce(worker_device)
    if ps_tasks == 0:
        return None
    strategy = ps_strategy if ps_strategy is not None else _RoundRobin(ps_tasks)

    def device_function(op: DeviceOp) -> DeviceSpec:
        current = DeviceSpec.from_string(op.device)
        if not merge_devices and op.device:
            return current
        if op.type == "Variable" and ps_spec != DeviceSpec():
            chosen = ps_spec
            # As TF: a task is drawn only if it would be a task of the ps job, so an
            # op pinned to another job neither gets one nor advances the round robin.
            if ps_spec.job is not None and current.job in (None, ps_spec.job):
                chosen = ps_spec.replace(task=strategy(op))
            return chosen.make_merged_spec(current)
        return worker_spec.make_merged_spec(current)

    return device_function
