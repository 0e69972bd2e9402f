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


def _binary(fn: Callable[[Any, Any], Any], reflected: bool = False) -> Callable[[Any, Any], Any]:
    def method(self: Expression, other: Any) -> Any:
        return _Apply(fn, (other, self) if reflected else (self, other))

    return method


def _unary(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda self: _Apply(fn, (self,))


#: the elementwise operators expressions and variables both support (Variable adds matmul)
BINARY_OPS: list[tuple[str, Callable[[Any, Any], Any]]] = [
    ("add", operator.add),
    ("sub", operator.sub),
    ("mul", operator.mul),
    ("truediv", operator.truediv),
    ("floordiv", operator.floordiv),
    ("mod", operator.mod),
    ("pow", operator.pow),
]
COMPARISONS: list[tuple[str, Callable[[Any, Any], Any]]] = [
    ("lt", operator.lt), ("le", operator.le), ("gt", operator.gt), ("ge", operator.ge)
]
UNARY_OPS: list[tuple[str, Callable[[Any], Any]]] = [("neg", operator.neg), ("pos", operator.pos), ("abs", operator.abs)]

for _name, _fn in BINARY_OPS:
    setattr(Expression, f"__{_name}__", _binary(_fn))
    setattr(Expression, f"__r{_name}__", _binary(_fn, reflected=True))
for _name, _fn in COMPARISONS:
    setattr(Expression, f"__{_name}__", _binary(_fn))
for _name, _fn1 in UNARY_OPS:
    setattr(Expression, f"__{_name}__", _unary(_fn1))


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
