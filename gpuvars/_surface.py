"""The surface every gpuvars variable shares, built on a few primitives.

A class using :class:`VariableSurface` provides ``name``, ``device``, ``physical_device``,
``dtype``, ``initialized``, ``value()``, ``_known_shape()``, ``_scatter(op, indices,
updates)`` and ``_init_plans()``; everything else a user meets (snapshots, host copies,
DLPack, indexing, arithmetic, scatter methods, the init op, copy and pickle rules) is
written once here, so a plain :class:`~gpuvars.Variable` and a distributed one behave alike.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable, Literal, TypeVar, overload

import numpy as np

from gpuvars import _expr
from gpuvars._backend_errors import backend_errors
from gpuvars._operators import ReadOperators
from gpuvars.errors import SerializationError, UninitializedVariableError
from gpuvars.init_ops import InitPlan, Op, run_init

if TYPE_CHECKING:
    from gpuvars.placement import PhysicalDevice

__all__ = ["VariableSurface"]

_S = TypeVar("_S", bound="VariableSurface")


class VariableSurface(ReadOperators):
    """Reads, conversions and Python protocols in terms of a variable's primitives."""

    __slots__ = ()

    # --- the primitives (a subclass provides them) ------------------------------------------

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def device(self) -> str:
        raise NotImplementedError

    @property
    def physical_device(self) -> PhysicalDevice:
        raise NotImplementedError

    def _known_dtype(self) -> np.dtype[Any] | None:
        raise NotImplementedError

    @property
    def initialized(self) -> bool:
        raise NotImplementedError

    def value(self) -> Any:
        raise NotImplementedError

    def _known_shape(self) -> tuple[int, ...] | None:
        raise NotImplementedError

    def _write(self, op: str, value: Any) -> None:
        """``op`` ("assign", "add" or "sub") of ``value`` into the variable, on its device(s)."""
        raise NotImplementedError

    def _scatter(self, op: str, indices: Any, updates: Any) -> Any:
        raise NotImplementedError

    def _init_plans(self) -> list[InitPlan]:
        raise NotImplementedError

    # --- metadata -----------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The array library holding the storage: "numpy", "cupy" or "jax"."""
        return self.physical_device.backend.name

    @property
    def shape(self) -> tuple[int, ...]:
        """The current concrete shape (the pending shape while uninitialized).

        Raises:
            UninitializedVariableError: a deferred callable without ``shape=`` that never ran.
        """
        shape = self._known_shape()
        if shape is None:
            raise UninitializedVariableError(f"variable '{self.name}' has no known shape until it is initialized")
        return shape

    @property
    def dtype(self) -> np.dtype[Any]:
        """The storage dtype.

        Raises:
            UninitializedVariableError: a deferred callable without ``dtype=`` that never ran.
        """
        dtype = self._known_dtype()
        if dtype is None:
            raise UninitializedVariableError(f"variable '{self.name}' has no known dtype until it is initialized")
        return dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    # --- reads ---------------------------------------------------------------------------------

    def _gpuvars_locate(self) -> tuple[Any, PhysicalDevice]:
        """(live value, device): how the transfer boundary sees a variable used as a value."""
        return self.value(), self.physical_device

    def read_value(self) -> Any:
        """A snapshot of the value on the variable's device (a copy; JAX arrays are immutable)."""
        value, device = self._gpuvars_locate()
        backend = device.backend
        if not backend.inplace:
            return value
        with backend_errors(device, f"reading variable '{self.name}'"):
            return backend.asarray(value, value.dtype, device.backend_index)

    def numpy(self) -> np.ndarray[Any, Any]:
        """A host numpy copy of the value."""
        value, device = self._gpuvars_locate()
        with backend_errors(device, f"copying variable '{self.name}' to the host"):
            return device.backend.to_numpy(value)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray[Any, Any]:
        out: np.ndarray[Any, Any]
        host = self.physical_device.backend.host
        if host and not copy:
            out = self.value()
        elif copy is False:
            raise ValueError(f"variable '{self.name}' lives on {self.device}; a host array needs a copy")
        else:
            out = self.numpy()
        return out if dtype is None else out.astype(dtype, copy=False)

    def __dlpack__(self, **kwargs: Any) -> Any:
        """DLPack export of the value: a snapshot for host variables (a consumer such as
        torch may ignore DLPack's read-only flag, so a live view could be written through),
        the live array on a device (CuPy: do not mutate it; JAX: immutable)."""
        value, device = self._gpuvars_locate()
        if device.backend.host:
            return np.array(value).__dlpack__(**kwargs)
        return value.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> Any:
        return self.value().__dlpack_device__()

    def initialized_value(self) -> _expr.Expression:
        """A deferred expression for this variable's initialized value.

        Use it (or arithmetic on it) as another variable's initial value:
        ``gv.Variable(weights.initialized_value() * 2.0)`` equals ``2 * weights`` after every
        run of an init op. When the init op runs it uses this variable's fresh initial value
        if it is initialized in the same run, else its current value.
        """
        return _expr.leaf(self)

    # --- writes ----------------------------------------------------------------------------------
    # Declared once, with the overloads a type checker needs (``v.assign(x).numpy()``);
    # gv.Variable replaces them at run time with host fast paths of the same behaviour.

    @overload
    def assign(self: _S, value: Any, *, read_value: Literal[True] = ...) -> _S: ...
    @overload
    def assign(self, value: Any, *, read_value: Literal[False]) -> None: ...
    @overload
    def assign(self: _S, value: Any, *, read_value: bool) -> _S | None: ...

    def assign(self: _S, value: Any, *, read_value: bool = True) -> _S | None:
        """Write ``value`` into the variable, on its device; returns the variable.

        Same-shape assigns write numpy/CuPy storage in place (same buffer); a dynamic-shape
        variable (``shape=(None, ...)`` or ``validate_shape=False``) reallocates when the
        shape changes. Assigning an uninitialized variable initializes it.

        Raises:
            InvalidArgumentError: shape or dtype mismatch (names the variable and both).
            TransferGuardError: an implicit copy from another device under "disallow".
        """
        self._write("assign", value)
        return self if read_value else None

    @overload
    def assign_add(self: _S, delta: Any, *, read_value: Literal[True] = ...) -> _S: ...
    @overload
    def assign_add(self, delta: Any, *, read_value: Literal[False]) -> None: ...
    @overload
    def assign_add(self: _S, delta: Any, *, read_value: bool) -> _S | None: ...

    def assign_add(self: _S, delta: Any, *, read_value: bool = True) -> _S | None:
        """Add ``delta`` (same shape) to the variable, on its device; returns the variable."""
        self._write("add", delta)
        return self if read_value else None

    @overload
    def assign_sub(self: _S, delta: Any, *, read_value: Literal[True] = ...) -> _S: ...
    @overload
    def assign_sub(self, delta: Any, *, read_value: Literal[False]) -> None: ...
    @overload
    def assign_sub(self: _S, delta: Any, *, read_value: bool) -> _S | None: ...

    def assign_sub(self: _S, delta: Any, *, read_value: bool = True) -> _S | None:
        """Subtract ``delta`` (same shape) from the variable, on its device; returns the variable."""
        self._write("sub", delta)
        return self if read_value else None

    # --- scatter -------------------------------------------------------------------------------

    def scatter_update(self, indices: Any, updates: Any) -> Any:
        """Set rows ``indices`` (along axis 0) to ``updates`` (shape ``indices.shape + shape[1:]``).

        A repeated index gets one of its updates: the last on numpy (and JAX on the CPU); on a
        GPU (CuPy, JAX) which one is undefined, as in TensorFlow."""
        return self._scatter("update", indices, updates)

    def scatter_add(self, indices: Any, updates: Any) -> Any:
        """Add ``updates`` to rows ``indices``; repeated indices accumulate."""
        return self._scatter("add", indices, updates)

    def scatter_sub(self, indices: Any, updates: Any) -> Any:
        """Subtract ``updates`` from rows ``indices``; repeated indices accumulate."""
        return self._scatter("sub", indices, updates)

    def scatter_mul(self, indices: Any, updates: Any) -> Any:
        """Multiply rows ``indices`` by ``updates``; repeated indices multiply in turn."""
        return self._scatter("mul", indices, updates)

    def scatter_div(self, indices: Any, updates: Any) -> Any:
        """Divide rows ``indices`` by ``updates`` (by zero: inf or nan, quietly, as in TF)."""
        return self._scatter("div", indices, updates)

    def scatter_min(self, indices: Any, updates: Any) -> Any:
        """Rows ``indices`` become the minimum of themselves and ``updates``."""
        return self._scatter("min", indices, updates)

    def scatter_max(self, indices: Any, updates: Any) -> Any:
        """Rows ``indices`` become the maximum of themselves and ``updates``."""
        return self._scatter("max", indices, updates)

    # --- initialization ------------------------------------------------------------------------

    @property
    def initializer(self) -> Op:
        """An op that (re)initializes this variable from its initial value (a no-op for a
        variable made from a concrete value, as in TF2 eager)."""
        ref = weakref.ref(self)

        def run() -> None:
            var = ref()
            if var is not None:
                run_init([var])

        return Op(f"{self.name}/Assign", run)

    # --- Python protocols -------------------------------------------------------------------

    def __repr__(self) -> str:
        head = f"<gpuvars.{type(self).__name__} '{self.name}' shape={self._known_shape()} dtype={self._known_dtype()} device={self.device}"
        if not self.initialized:
            return head + " uninitialized>"
        return head + f", value={np.array2string(self.numpy(), threshold=6, edgeitems=2)}>"

    def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(value, *args)`` with the variable's device current (CuPy computes there)."""
        value, device = self._gpuvars_locate()
        with device.backend.scope(device.backend_index):
            return fn(value, *args)

    def __getitem__(self, key: Any) -> Any:
        """A snapshot of ``value()[key]`` (as TF's ``v[0]``; not a live view)."""
        out = self._read(lambda value: value[key])
        return out.copy() if self.physical_device.backend.inplace and hasattr(out, "copy") else out

    def __len__(self) -> int:
        shape = self.shape
        if not shape:
            raise TypeError(f"len() of a scalar variable '{self.name}'")
        return shape[0]

    def __float__(self) -> float:
        return float(self._read(float))

    def __int__(self) -> int:
        return int(self._read(int))

    def __bool__(self) -> bool:
        return bool(self._read(bool))

    def __index__(self) -> int:
        return int(self._read(lambda value: value.__index__()))

    __hash__ = object.__hash__

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        from gpuvars.errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"copy.deepcopy of the {type(self).__name__} '{self.name}' is not supported; "
            "create a new variable from its value (v.numpy())"
        )

    def __copy__(self) -> Any:
        """The variable itself: a variable is a handle (TF's ``copy.copy(v) is v``)."""
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise SerializationError(
            f"variable '{self.name}' cannot be pickled: gpuvars never uses pickle (loading a pickle "
            "can run arbitrary code). Save variables with gv.Saver(...).save(prefix), copy a value "
            "with v.numpy(), or make an independent copy with copy.deepcopy(v)"
        )
