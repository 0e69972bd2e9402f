"""Deferred elementwise expressions over variables' initial values (``initialized_value()``).

An expression holds its dependencies strongly and is evaluated only when an init op
runs: each leaf then resolves to its variable's fresh initial value (if initialized in
the same run) or its current value, already copied to the target device.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    from gpuvars._surface import VariableSurface as Variable

__all__ = ["Expression"]

Resolver = Callable[["Variable"], Any]


class Expression:
    """A deferred elementwise computation; operators and numpy ufuncs build more of it."""

    __array_priority__ = 10_000  # numpy defers to our reflected operators

    def variables(self) -> list[Variable]:
        """The variables this expression reads, each once, in first-use order."""
        raise NotImplementedError

    def evaluate(self, resolve: Resolver) -> Any:
        """Compute the value; ``resolve(var)`` gives each leaf's array."""
        raise NotImplementedError

    def _abstract(self) -> Any:
        """A size-1-per-axis stand-in with the right dtype, or None if a leaf's dtype is unknown."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The broadcast shape of the leaves and constants, or None while a leaf's shape is unknown."""
        shapes: list[tuple[int, ...]] = []
        for leaf in _walk(self):
            if isinstance(leaf, _Leaf):
                known = leaf.var._known_shape()
                if known is None:
                    return None
                shapes.append(known)
            elif isinstance(leaf, _Const):
                shapes.append(np.shape(leaf.value))
        return tuple(np.broadcast_shapes(*shapes)) if shapes else ()

    @property
    def dtype(self) -> np.dtype[Any] | None:
        """The result dtype under numpy's promotion rules, or None while a leaf's dtype is unknown."""
        probe = self._abstract()
        return None if probe is None else np.asarray(probe).dtype

    # numpy protocol: ufunc calls on an expression build a new node
    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if method != "__call__" or kwargs or ufunc.nout != 1:
            return NotImplemented
        return _Apply(ufunc, inputs)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray[Any, Any]:
        raise TypeError(
            "an initialized_value() expression is deferred: it has no value until an init op runs; "
            "use it as another variable's initial value"
        )

    def __bool__(self) -> bool:
        raise TypeError("an initialized_value() expression has no truth value until an init op runs")

    def __repr__(self) -> str:
        return f"<gpuvars deferred expression over {[v.name for v in self.variables()]}>"

    # elementwise operators build more expression (written out so type checkers see them)

    def __add__(self, other: Any) -> Expression:
        return _Apply(operator.add, (self, other))

    def __radd__(self, other: Any) -> Expression:
        return _Apply(operator.add, (other, self))

    def __sub__(self, other: Any) -> Expression:
        return _Apply(operator.sub, (self, other))

    def __rsub__(self, other: Any) -> Expression:
        return _Apply(operator.sub, (other, self))

    def __mul__(self, other: Any) -> Expression:
        return _Apply(operator.mul, (self, other))

    def __rmul__(self, other: Any) -> Expression:
        return _Apply(operator.mul, (other, self))

    def __truediv__(self, other: Any) -> Expression:
        return _Apply(operator.truediv, (self, other))

    def __rtruediv__(self, other: Any) -> Expression:
        return _Apply(operator.truediv, (other, self))

    def __floordiv__(self, other: Any) -> Expression:
        return _Apply(operator.floordiv, (self, other))

    def __rfloordiv__(self, other: Any) -> Expression:
        return _Apply(operator.floordiv, (other, self))

    def __mod__(self, other: Any) -> Expression:
        return _Apply(operator.mod, (self, other))

    def __rmod__(self, other: Any) -> Expression:
        return _Apply(operator.mod, (other, self))

    def __pow__(self, other: Any) -> Expression:
        return _Apply(operator.pow, (self, other))

    def __rpow__(self, other: Any) -> Expression:
        return _Apply(operator.pow, (other, self))

    def __lt__(self, other: Any) -> Expression:
        return _Apply(operator.lt, (self, other))

    def __le__(self, other: Any) -> Expression:
        return _Apply(operator.le, (self, other))

    def __gt__(self, other: Any) -> Expression:
        return _Apply(operator.gt, (self, other))

    def __ge__(self, other: Any) -> Expression:
        return _Apply(operator.ge, (self, other))

    def __neg__(self) -> Expression:
        return _Apply(operator.neg, (self,))

    def __pos__(self) -> Expression:
        return _Apply(operator.pos, (self,))

    def __abs__(self) -> Expression:
        return _Apply(operator.abs, (self,))


class _Leaf(Expression):
    def __init__(self, var: Variable) -> None:
        self.var = var

    def variables(self) -> list[Variable]:
        return [self.var]

    def evaluate(self, resolve: Resolver) -> Any:
        return resolve(self.var)

    def _abstract(self) -> Any:
        shape, dtype = self.var._known_shape(), self.var._known_dtype()
        if shape is None or dtype is None:
            return None
        return np.ones((1,) * len(shape), dtype=dtype)


class _Const(Expression):
    def __init__(self, value: Any) -> None:
        self.value = value


class _Apply(Expression):
    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = tuple(a if isinstance(a, Expression) else _Const(a) for a in args)

    def variables(self) -> list[Variable]:
        seen: dict[int, Variable] = {}
        for leaf in _walk(self):
            if isinstance(leaf, _Leaf):
                seen.setdefault(id(leaf.var), leaf.var)
        return list(seen.values())

    def evaluate(self, resolve: Resolver) -> Any:
        return self.fn(*(a.value if isinstance(a, _Const) else a.evaluate(resolve) for a in self.args))

    def _abstract(self) -> Any:
        args = []
        for a in self.args:
            if isinstance(a, _Const):
                v = a.value
                args.append(np.ones((1,) * v.ndim, v.dtype) if isinstance(v, np.ndarray) else v)
            else:
                probe = a._abstract()
                if probe is None:
                    return None
                args.append(probe)
        with np.errstate(all="ignore"):
            return self.fn(*args)


def _walk(expr: Expression) -> list[Expression]:
    """Every leaf and constant under ``expr``."""
    if isinstance(expr, _Apply):
        return [node for a in expr.args for node in _walk(a)]
    return [expr]


def leaf(var: Variable) -> Expression:
    """The expression that stands for ``var``'s initialized value."""
    return _Leaf(var)
