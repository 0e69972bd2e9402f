"""The collection of live variables and their unique names; it holds variables weakly.

Names are made unique case-insensitively, as TF graphs do (``w``, ``w_1``, ``W_2``):
checkpoint keys are these names. A variable nobody references leaves the registry and
frees its name. ``with gv.Registry():`` gives an isolated collection.
"""

from __future__ import annotations

import contextvars
import itertools
import re
import threading
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable

import numpy as np

from gpuvars.errors import InvalidArgumentError

if TYPE_CHECKING:
    from gpuvars.init_ops import Op

__all__ = ["Registry", "RegistryMember", "current_registry", "global_variables", "trainable_variables"]

# TF's op-name rule, plus "/" for scoped names: a checkpoint key must be a plain string.
_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-/]*$")


@runtime_checkable
class RegistryMember(Protocol):
    """What every member of a registry offers (DESIGN decision 20): a plain, mirrored or
    sync-on-read ``gv.Variable``, or a ``gv.ShardedVariable``."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype[Any]: ...

    @property
    def trainable(self) -> bool: ...

    @property
    def initialized(self) -> bool: ...

    @property
    def initializer(self) -> Op: ...

    def numpy(self) -> np.ndarray[Any, Any]: ...


class Registry:
    """A weak, ordered, name-uniquing collection of variables.

    Example:
        >>> import gpuvars as gv
        >>> with gv.Registry() as reg:
        ...     a = gv.Variable(1.0, name="w")
        ...     b = gv.Variable(2.0, name="W")
        ...     [v.name for v in reg.variables()]
        ['w', 'W_1']
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self._order = itertools.count()
        self._seq: weakref.WeakKeyDictionary[Any, tuple[int, str]] = weakref.WeakKeyDictionary()
        self._token: list[contextvars.Token[Registry]] = []

    def add(self, member: Any, name: str) -> str:
        """Register ``member`` (a variable or sharded variable) under ``name`` made unique
        case-insensitively; returns the name used.

        Raises:
            InvalidArgumentError: ``name`` is not a valid variable name.
        """
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidArgumentError(
                f"invalid variable name {name!r}: names start with a letter, digit or '.' and "
                "contain only letters, digits and '_.-/'"
            )
        with self._lock:
            unique = name
            if name.lower() in self._by_key:
                for i in itertools.count(1):
                    unique = f"{name}_{i}"
                    if unique.lower() not in self._by_key:
                        break
            self._by_key[unique.lower()] = member
            self._seq[member] = (next(self._order), unique.lower())
            return unique

    def remove(self, member: Any) -> None:
        """Forget ``member`` (a no-op when it is not registered here); its name becomes free."""
        with self._lock:
            entry = self._seq.pop(member, None)
            if entry is not None and self._by_key.get(entry[1]) is member:
                del self._by_key[entry[1]]

    def variables(self) -> list[RegistryMember]:
        """The live members (variables and sharded variables), in creation order."""
        with self._lock:
            live = list(self._seq.items())
        return [v for v, _ in sorted(live, key=lambda item: item[1][0])]

    def trainable_variables(self) -> list[RegistryMember]:
        """The live variables with ``trainable=True``, in creation order."""
        return [v for v in self.variables() if v.trainable]

    def get(self, name: str) -> RegistryMember | None:
        """The live variable named ``name`` (case-insensitive), or None."""
        return self._by_key.get(name.lower())

    def __len__(self) -> int:
        return len(self._seq)

    def __iter__(self) -> Iterator[RegistryMember]:
        return iter(self.variables())

    def __enter__(self) -> Registry:
        self._token.append(_current.set(self))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _current.reset(self._token.pop())


_default = Registry()
_current: contextvars.ContextVar[Registry] = contextvars.ContextVar("gpuvars_registry", default=_default)


def current_registry() -> Registry:
    """The registry new variables join: the innermost ``with gv.Registry()``, else the default."""
    return _current.get()


def global_variables() -> list[RegistryMember]:
    """The live variables of the current registry, in creation order (TF's GLOBAL_VARIABLES)."""
    return current_registry().variables()


def trainable_variables() -> list[RegistryMember]:
    """The live trainable variables of the current registry (TF's TRAINABLE_VARIABLES)."""
    return current_registry().trainable_variables()
