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
from typing import TYPE_CHECKING, Iterator

from gpuvars.errors import InvalidArgumentError

if TYPE_CHECKING:
    from gpuvars.variable import Variable

__all__ = ["Registry", "current_registry", "global_variables", "trainable_variables"]

# TF's op-name rule, plus "/" for scoped names: a checkpoint key must be a plain string.
_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-/]*$")


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
        self._by_key: weakref.WeakValueDictionary[str, Variable] = weakref.WeakValueDictionary()
        self._order = itertools.count()
        self._seq: weakref.WeakKeyDictionary[Variable, int] = weakref.WeakKeyDictionary()
        self._token: list[contextvars.Token[Registry]] = []

    def _claim(self, name: str, var: Variable) -> str:
        """Register ``var`` under ``name`` made unique; returns the name used."""
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
            self._by_key[unique.lower()] = var
            self._seq[var] = next(self._order)
            return unique

    def _release(self, name: str, var: Variable) -> None:
        with self._lock:
            if self._by_key.get(name.lower()) is var:
                del self._by_key[name.lower()]
            self._seq.pop(var, None)

    def variables(self) -> list[Variable]:
        """The live variables, in creation order."""
        with self._lock:
            live = list(self._seq.items())
        return [v for v, _ in sorted(live, key=lambda item: item[1])]

    def trainable_variables(self) -> list[Variable]:
        """The live variables with ``trainable=True``, in creation order."""
        return [v for v in self.variables() if v.trainable]

    def get(self, name: str) -> Variable | None:
        """The live variable named ``name`` (case-insensitive), or None."""
        return self._by_key.get(name.lower())

    def __len__(self) -> int:
        return len(self._seq)

    def __iter__(self) -> Iterator[Variable]:
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


def global_variables() -> list[Variable]:
    """The live variables of the current registry, in creation order (TF's GLOBAL_VARIABLES)."""
    return current_registry().variables()


def trainable_variables() -> list[Variable]:
    """The live trainable variables of the current registry (TF's TRAINABLE_VARIABLES)."""
    return current_registry().trainable_variables()
