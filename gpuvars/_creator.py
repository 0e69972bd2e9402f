"""The variable creator stack (TF's ``variable_creator_scope``), low in the layers.

``gv.Variable(...)`` asks the innermost creator on this stack to make the variable; a
strategy's ``scope()`` pushes one that makes distributed variables. The stack lives in a
ContextVar, so threads and asyncio tasks each see their own. This module imports nothing
from gpuvars, so ``variable.py`` needs nothing from ``distribute/``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

__all__ = ["Creator", "current_creator", "plain_variables", "variable_creator_scope"]

#: ``creator(**kwargs) -> variable``: the keyword arguments of ``gv.Variable``
Creator = Callable[..., Any]

_stack: contextvars.ContextVar[tuple[Creator, ...]] = contextvars.ContextVar("gpuvars_creators", default=())


@contextlib.contextmanager
def variable_creator_scope(creator: Creator) -> Iterator[None]:
    """Inside the block, ``gv.Variable(**kwargs)`` returns ``creator(**kwargs)``.

    The creator receives ``gv.Variable``'s arguments as keywords (``initial_value``,
    ``name``, ``dtype``, ...) and may return any ``gv.Variable``; creators nest, the
    innermost wins.
    """
    if not callable(creator):
        raise TypeError(f"variable_creator_scope needs a callable, got {type(creator).__name__}")
    token = _stack.set(_stack.get() + (creator,))
    try:
        yield
    finally:
        _stack.reset(token)


@contextlib.contextmanager
def plain_variables() -> Iterator[None]:
    """Inside the block ``gv.Variable`` makes plain variables whatever scopes enclose it
    (how a strategy builds the per-replica components of its variables)."""
    token = _stack.set(())
    try:
        yield
    finally:
        _stack.reset(token)


def current_creator() -> Creator | None:
    """The innermost creator, or None (plain variables)."""
    stack = _stack.get()
    return stack[-1] if stack else None
