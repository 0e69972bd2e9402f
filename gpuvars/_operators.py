"""The arithmetic of variables, written out so type checkers see every operator.

TF's rule: ``v + 1`` reads ``v`` and computes on its device; the result is an array of
the variable's library (numpy, CuPy or JAX), never a variable. An ``initialized_value()``
expression on the other side builds a deferred expression instead. ``==`` and ``!=`` stay
identity comparisons (variables are hashable handles, as in TF2's ``Variable.ref()``
world), so ``v == w`` compares handles; compare values with ``v.numpy() == w.numpy()``.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

from gpuvars import _expr

__all__ = ["ReadOperators"]


class ReadOperators:
    """Operators that read the value; a class using it provides :meth:`_read` and ``value()``."""

    __slots__ = ()

    def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def _binary(self, fn: Callable[[Any, Any], Any], other: Any, reflected: bool) -> Any:
        if isinstance(other, _expr.Expression):
            return NotImplemented
        if hasattr(other, "_gpuvars_locate"):  # another variable: its live value
            other = other.value()
        if reflected:
            return self._read(lambda value: fn(other, value))
        return self._read(fn, other)

    def __add__(self, other: Any) -> Any:
        return self._binary(operator.add, other, False)

    def __radd__(self, other: Any) -> Any:
        return self._binary(operator.add, other, True)

    def __sub__(self, other: Any) -> Any:
        return self._binary(operator.sub, other, False)

    def __rsub__(self, other: Any) -> Any:
        return self._binary(operator.sub, other, True)

    def __mul__(self, other: Any) -> Any:
        return self._binary(operator.mul, other, False)

    def __rmul__(self, other: Any) -> Any:
        return self._binary(operator.mul, other, True)

    def __truediv__(self, other: Any) -> Any:
        return self._binary(operator.truediv, other, False)

    def __rtruediv__(self, other: Any) -> Any:
        return self._binary(operator.truediv, other, True)

    def __floordiv__(self, other: Any) -> Any:
        return self._binary(operator.floordiv, other, False)

    def __rfloordiv__(self, other: Any) -> Any:
        return self._binary(operator.floordiv, other, True)

    def __mod__(self, other: Any) -> Any:
        return self._binary(operator.mod, other, False)

    def __rmod__(self, other: Any) -> Any:
        return self._binary(operator.mod, other, True)

    def __pow__(self, other: Any) -> Any:
        return self._binary(operator.pow, other, False)

    def __rpow__(self, other: Any) -> Any:
        return self._binary(operator.pow, other, True)

    def __matmul__(self, other: Any) -> Any:
        return self._binary(operator.matmul, other, False)

    def __rmatmul__(self, other: Any) -> Any:
        return self._binary(operator.matmul, other, True)

    def __lt__(self, other: Any) -> Any:
        return self._binary(operator.lt, other, False)

    def __le__(self, other: Any) -> Any:
        return self._binary(operator.le, other, False)

    def __gt__(self, other: Any) -> Any:
        return self._binary(operator.gt, other, False)

    def __ge__(self, other: Any) -> Any:
        return self._binary(operator.ge, other, False)

    def __neg__(self) -> Any:
        return self._read(operator.neg)

    def __pos__(self) -> Any:
        return self._read(operator.pos)

    def __abs__(self) -> Any:
        return self._read(operator.abs)
