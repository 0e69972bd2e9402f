"""Init ops: what is a deferred initial value, and running initializers in dependency order.

An initial value is *deferred* when it is an :class:`~gpuvars.initializers.Initializer`,
an initializer object called as ``init(shape, dtype)`` (Keras), a zero-argument callable
(TF) or an ``initialized_value()`` expression; anything else (arrays, lists, scalars,
variables) is a concrete value, used at once. This module holds that rule, once.

Every member of a registry (plain, mirrored, sync-on-read or sharded variable) offers
its pending initializations as :class:`InitPlan` objects; an init op orders the plans of
its members by the variables their initial values read and runs them.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

from gpuvars import _expr
from gpuvars.errors import InvalidArgumentError, UninitializedVariableError
from gpuvars.initializers import Initializer
from gpuvars.registry import current_registry

__all__ = [
    "InitPlan",
    "Initializable",
    "Op",
    "global_variables_initializer",
    "is_deferred",
    "is_variable_initialized",
    "keras_style",
    "report_uninitialized_variables",
    "run_init",
    "variables_initializer",
]


class Op:
    """A runnable operation (TF's init ops): call it, or call ``.run()``.

    Example:
        >>> import gpuvars as gv
        >>> with gv.Registry():
        ...     v = gv.Variable(gv.zeros([2]), name="v")
        ...     gv.global_variables_initializer()()
        ...     v.numpy()
        array([0., 0.], dtype=float32)
    """

    __slots__ = ("name", "_fn")

    def __init__(self, name: str, fn: Callable[[], None]) -> None:
        self.name = name
        self._fn = fn

    def run(self) -> None:
        """Run the operation."""
        self._fn()

    __call__ = run

    def __repr__(self) -> str:
        return f"<gpuvars.Op {self.name!r}>"


def keras_style(value: Any) -> bool:
    """Whether ``value`` is an initializer object called as ``init(shape, dtype)`` (Keras),
    as opposed to a zero-argument callable (TF): it needs arguments and takes two."""
    if not callable(value) or hasattr(value, "__array__") or isinstance(value, _expr.Expression):
        return False
    try:
        sig = inspect.signature(value)
    except (TypeError, ValueError):  # some builtins have no signature: call them with none
        return False
    try:
        sig.bind()
        return False
    except TypeError:
        pass
    try:
        sig.bind((), None)
    except TypeError:
        return False
    return True


def is_deferred(initial_value: Any) -> bool:
    """Whether ``initial_value`` is computed later, by an init op (or never, if restored)."""
    if isinstance(initial_value, (Initializer, _expr.Expression)):
        return True
    return (
        callable(initial_value)
        and not hasattr(initial_value, "__array__")
        and not hasattr(initial_value, "_gpuvars_locate")  # a Variable is a value
    )


@dataclasses.dataclass(frozen=True)
class InitPlan:
    """One pending initialization: ``install(materialize(resolve))``.

    ``deps`` are the variables the initial value reads (via ``initialized_value()``);
    ``resolve(dep)`` gives a dependency's value for ``materialize``: its fresh initial
    value when the same run initializes it, else its current value.
    """

    target: Any
    name: str
    deps: tuple[Any, ...]
    materialize: Callable[[Callable[[Any], Any]], Any]
    install: Callable[[Any], None]


@runtime_checkable
class Initializable(Protocol):
    """What an init op needs of a registry member: its pending initializations."""

    @property
    def name(self) -> str: ...

    @property
    def initialized(self) -> bool: ...

    def _init_plans(self) -> list[InitPlan]: ...


def _order(plans: list[InitPlan]) -> list[InitPlan]:
    """``plans`` in dependency order; a cycle is an InvalidArgumentError naming it."""
    by_target = {id(p.target): p for p in plans}
    order: list[InitPlan] = []
    state: dict[int, int] = {}  # 1 = visiting, 2 = done

    def visit(p: InitPlan, path: list[str]) -> None:
        mark = state.get(id(p))
        if mark == 2:
            return
        if mark == 1:
            cycle = path[path.index(p.name):] + [p.name]
            raise InvalidArgumentError(f"initial values form a dependency cycle: {' -> '.join(cycle)}")
        state[id(p)] = 1
        for dep in p.deps:
            if id(dep) in by_target:
                visit(by_target[id(dep)], path + [p.name])
        state[id(p)] = 2
        order.append(p)

    for p in plans:
        visit(p, [])
    return order


def _unready(plan: InitPlan, dep: Any) -> UninitializedVariableError:
    return UninitializedVariableError(
        f"variable '{plan.name}' is initialized from '{dep.name}' (via initialized_value()), "
        f"but '{dep.name}' is not initialized and is not part of this init op"
    )


def run_init(members: Iterable[Initializable]) -> None:
    """Initialize the deferred initial values of ``members`` in dependency order.

    Fails before any work when a dependency outside the op is uninitialized, or the
    dependencies form a cycle.
    """
    order = _order([p for m in members for p in m._init_plans()])
    in_run = {id(p.target) for p in order}
    for p in order:
        for dep in p.deps:
            if id(dep) not in in_run and not dep.initialized:
                raise _unready(p, dep)
    fresh: dict[int, Any] = {}

    for p in order:

        def resolve(dep: Any, plan: InitPlan = p) -> Any:
            if id(dep) in fresh:
                return fresh[id(dep)]
            if not dep.initialized:
                raise _unready(plan, dep)
            return dep.value()

        arr = p.materialize(resolve)
        fresh[id(p.target)] = arr
        p.install(arr)


def _check_members(items: Iterable[Any], what: str) -> list[Any]:
    out = list(items)
    for m in out:
        if not isinstance(m, Initializable):
            raise InvalidArgumentError(f"{what} expects Variables, got {type(m).__name__}")
    return out


def variables_initializer(var_list: Iterable[Any], name: str = "init") -> Op:
    """An op that initializes ``var_list`` in dependency order (TF's variables_initializer).

    The list is taken now; the op holds the variables weakly.

    Raises:
        InvalidArgumentError: an item is not a gpuvars variable.
    """
    refs = [weakref.ref(m) for m in _check_members(var_list, "variables_initializer")]

    def run() -> None:
        run_init([m for m in (r() for r in refs) if m is not None])

    return Op(name, run)


def global_variables_initializer() -> Op:
    """An op that initializes every variable alive now in the current registry
    (sharded variables included).

    Example:
        >>> import gpuvars as gv
        >>> with gv.Registry():
        ...     w = gv.Variable(gv.ones([2]), name="w")
        ...     w2 = gv.Variable(w.initialized_value() * 2.0, name="w2")
        ...     gv.global_variables_initializer().run()
        ...     w2.numpy()
        array([2., 2.], dtype=float32)
    """
    return variables_initializer(current_registry().variables())


def report_uninitialized_variables(var_list: Iterable[Any] | None = None) -> list[str]:
    """Names of the uninitialized variables among ``var_list`` (default: the current registry)."""
    members = current_registry().variables() if var_list is None else _check_members(
        var_list, "report_uninitialized_variables"
    )
    return [m.name for m in members if not m.initialized]


def is_variable_initialized(variable: Any) -> bool:
    """Whether ``variable`` holds a value."""
    if not isinstance(variable, Initializable):
        raise InvalidArgumentError(f"is_variable_initialized expects a Variable, got {type(variable).__name__}")
    return bool(variable.initialized)
