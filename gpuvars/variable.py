"""Variable: a named, typed buffer that lives on one device and is updated there.

One concrete class holds a backend and a device; backend differences sit behind the
backend protocol. Every mutation runs on the variable's device whatever ``gv.device``
scope encloses it; values from elsewhere are copied over (or refused by the transfer
guard). numpy and CuPy storage is updated in place (same buffer); JAX storage is
rebound to a new array on the same device.

Aliasing (DESIGN decision 1): ``value()`` and ``np.asarray(v)`` give the live storage
without a copy: a read-only numpy view for host variables, the CuPy array itself (do not
mutate it), the current immutable array on JAX. ``read_value()`` and ``numpy()`` are
snapshots. A dynamic-shape assign that changes the shape reallocates.
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import operator
import threading
import weakref
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from gpuvars_backends import Backend
from gpuvars import _expr, config, devices
from gpuvars.errors import (
    BackendError,
    GpuvarsError,
    InvalidArgumentError,
    ResourceExhaustedError,
    TransferGuardError,
    UninitializedVariableError,
)
from gpuvars.initializers import Initializer
from gpuvars.placement import PhysicalDevice, device_of_array, host_array, resolve
from gpuvars.registry import Registry, current_registry

__all__ = [
    "Op",
    "Variable",
    "VariableAggregation",
    "VariableSynchronization",
    "global_variables_initializer",
    "is_variable_initialized",
    "report_uninitialized_variables",
    "variables_initializer",
]

_log = logging.getLogger("gpuvars")


class VariableSynchronization(enum.Enum):
    """When a distributed variable's components are brought in sync (tf.VariableSynchronization)."""

    AUTO = 0
    NONE = 1
    ON_WRITE = 2
    ON_READ = 3


class VariableAggregation(enum.Enum):
    """How replica-context updates of a distributed variable combine (tf.VariableAggregation)."""

    NONE = 0
    SUM = 1
    MEAN = 2
    ONLY_FIRST_REPLICA = 3


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


# --- value conversion ------------------------------------------------------------------

def _check_cast(src: np.dtype[Any], dst: np.dtype[Any], what: str) -> None:
    if src != dst and not np.can_cast(src, dst, casting="same_kind"):
        raise InvalidArgumentError(
            f"{what}: cannot cast a value of dtype {src} to the variable's dtype {dst} "
            "(only same-kind casts, e.g. float64 -> float32, happen implicitly)"
        )


def _fits(shape: tuple[int, ...], declared: tuple[int | None, ...] | None) -> bool:
    if declared is None:
        return True
    return len(shape) == len(declared) and all(d is None or d == s for s, d in zip(shape, declared))


def _fmt_declared(declared: tuple[int | None, ...] | None) -> str:
    return "<any>" if declared is None else str(declared)


def _keras_style(value: Any) -> bool:
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


def _raise_mapped(exc: BaseException, device: PhysicalDevice, what: str) -> None:
    """Map a backend library's failure to gpuvars' hierarchy (the one boundary); else return."""
    if isinstance(exc, GpuvarsError):
        return
    backend = device.backend
    text = str(exc)
    if isinstance(exc, backend.oom_errors + (MemoryError,)) or "RESOURCE_EXHAUSTED" in text:
        raise ResourceExhaustedError(f"{what} ran out of memory on {device.name}: {text}") from exc
    if isinstance(exc, backend.errors):
        raise BackendError(f"{what} failed in {backend.name} on {device.name}: {text}") from exc


class Variable:
    """A named, typed buffer on one device, updated in place by ops that run on that device.

    Args:
        initial_value: an array-like (numpy, CuPy, JAX, list, scalar, another Variable):
            initialized now; an :class:`~gpuvars.initializers.Initializer` (``gv.zeros([3])``,
            ``gv.initializers.GlorotUniform()`` with ``shape=``), a zero-argument callable or
            ``other.initialized_value()`` (an expression): deferred until an init op or a restore.
        name: the checkpoint key; made unique case-insensitively in the current registry
            (``w``, ``w_1``, ...). Default "Variable".
        dtype: the storage dtype; values are cast under numpy's ``same_kind`` rule. Default:
            the initial value's (Python floats -> float32, ints -> int32), float32 for initializers.
        shape: None fixes the initial value's shape; a tuple with ``None`` dims leaves those
            free; must be fully defined for an initializer without a shape of its own.
        validate_shape: False leaves the whole shape free (any assign may reshape).
        trainable: default True (False for ``synchronization=ON_READ``).
        device: a device string or DeviceSpec; beats the enclosing ``gv.device`` scopes.
        synchronization, aggregation: used by distribution strategies.

    Raises:
        InvalidArgumentError: a bad argument, shape or dtype.
        DevicePlacementError: the device does not exist and soft placement is off.

    Example:
        >>> import gpuvars as gv, numpy as np
        >>> with gv.Registry():
        ...     w = gv.Variable(np.zeros((2, 3), np.float32), name="w", device="/cpu:0")
        ...     _ = w.assign_add(np.ones((2, 3)))
        ...     float(w.numpy().sum()), w.device
        (6.0, '/cpu:0')
    """

    __slots__ = (
        "_name",
        "_device",
        "_backend",
        "_host",
        "_dtype",
        "_declared",
        "_pending_shape",
        "_fix_on_init",
        "_storage",
        "_ro",
        "_init",
        "_init_shape",
        "_deps",
        "_trainable",
        "_synchronization",
        "_aggregation",
        "_registry",
        "_lock",
        "__weakref__",
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> Variable:
        # TF's variable-creator scope: inside strategy.scope(), gv.Variable(...) makes the
        # strategy's distributed variable (a Variable subclass) instead.
        if cls is Variable:
            from gpuvars.distribute._context import _strategy

            strategy = _strategy.get()
            if strategy is not None:
                return strategy._create_variable(*args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        initial_value: Any = None,
        name: str | None = None,
        dtype: Any = None,
        shape: Sequence[int | None] | None = None,
        validate_shape: bool = True,
        trainable: bool | None = None,
        device: str | devices.DeviceSpec | None = None,
        synchronization: VariableSynchronization = VariableSynchronization.AUTO,
        aggregation: VariableAggregation = VariableAggregation.NONE,
    ) -> None:
        registry = current_registry()
        requested = "Variable" if name is None else name
        self._storage: Any = None
        self._dtype: np.dtype[Any] | None = None
        self._pending_shape: tuple[int, ...] | None = None
        self._name = registry._claim(requested, self)
        self._registry: Registry | None = registry
        try:
            self._setup(initial_value, dtype, shape, validate_shape, trainable, device, synchronization, aggregation)
        except BaseException:
            registry._release(self._name, self)
            self._registry = None
            raise

    # --- construction --------------------------------------------------------------

    def _setup(
        self,
        initial_value: Any,
        dtype: Any,
        shape: Sequence[int | None] | None,
        validate_shape: bool,
        trainable: bool | None,
        device: str | devices.DeviceSpec | None,
        synchronization: VariableSynchronization,
        aggregation: VariableAggregation,
    ) -> None:
        what = f"variable '{self._name}'"
        if not isinstance(synchronization, VariableSynchronization):
            raise InvalidArgumentError(f"{what}: synchronization must be a gv.VariableSynchronization, got {synchronization!r}")
        if not isinstance(aggregation, VariableAggregation):
            raise InvalidArgumentError(f"{what}: aggregation must be a gv.VariableAggregation, got {aggregation!r}")
        if trainable is None:
            trainable = synchronization is not VariableSynchronization.ON_READ
        elif not isinstance(trainable, bool):
            raise InvalidArgumentError(f"{what}: trainable must be a bool, got {trainable!r}")
        if trainable and synchronization is VariableSynchronization.ON_READ:
            raise InvalidArgumentError(
                f"{what}: synchronization=ON_READ can only be set for non-trainable variables"
            )
        if not isinstance(validate_shape, bool):
            raise InvalidArgumentError(f"{what}: validate_shape must be a bool, got {validate_shape!r}")
        if initial_value is None:
            raise InvalidArgumentError(
                f"{what}: initial_value must be given (an array-like, an initializer, a callable or "
                "another variable's initialized_value())"
            )
        self._trainable = trainable
        self._synchronization = synchronization
        self._aggregation = aggregation
        self._lock = threading.Lock()
        self._deps: tuple[Variable, ...] = ()
        self._init: Any = None
        self._init_shape: tuple[int, ...] | None = None
        self._ro: Any = None
        try:
            requested_dtype = None if dtype is None else np.dtype(dtype)
        except TypeError:
            raise InvalidArgumentError(f"{what}: {dtype!r} is not a dtype") from None
        declared = None if shape is None else self._parse_shape(shape, what)

        # Placement: explicit device= is the innermost scope; the enclosing scopes fill the gaps.
        with devices.device(device if device is not None else ""):
            spec = devices.current_device_spec("Variable", self._name)
        self._device: PhysicalDevice = resolve(spec, what, stacklevel=3)  # warn at the user's line
        self._backend = self._device.backend
        self._host = self._backend.name == "numpy"
        if requested_dtype is not None:
            self._set_dtype(requested_dtype, what)

        if isinstance(initial_value, _expr.Expression):
            self._init = initial_value
            self._deps = tuple(initial_value.variables())
            if self._dtype is None and initial_value.dtype is not None:
                self._set_dtype(initial_value.dtype, what)
            self._declare(declared, validate_shape, initial_value.shape, what)
        elif isinstance(initial_value, Initializer) or _keras_style(initial_value):
            # an initializer object drawn as init(shape, dtype): its own shape, else shape=
            own = initial_value.shape if isinstance(initial_value, Initializer) else None
            shp = own if own is not None else declared
            if shp is None or any(d is None for d in shp):
                raise InvalidArgumentError(
                    f"{what}: the initializer {type(initial_value).__name__} needs a fully defined "
                    f"shape= (got {_fmt_declared(declared)})"
                )
            if own is not None and declared is not None and not _fits(own, declared):
                raise InvalidArgumentError(
                    f"{what}: the initializer's shape {own} is not compatible with the supplied shape {declared}"
                )
            self._init = initial_value
            self._init_shape = tuple(d for d in shp if d is not None)
            if self._dtype is None:
                own_dtype = initial_value.dtype if isinstance(initial_value, Initializer) else None
                self._set_dtype(np.dtype(np.float32) if own_dtype is None else own_dtype, what)
            if isinstance(initial_value, Initializer):
                try:
                    initial_value.check_dtype(self._dtype)  # type: ignore[arg-type]  # set just above
                except InvalidArgumentError as exc:
                    raise InvalidArgumentError(f"{what}: {exc}") from None
            self._declare(declared, validate_shape, self._init_shape, what)
        elif callable(initial_value) and not hasattr(initial_value, "__array__"):
            self._init = initial_value  # a zero-argument callable, called by the init op
            self._declare(declared, validate_shape, None, what)
        else:
            arr = self._convert(initial_value, what, explicit=True)
            self._declare(declared, validate_shape, tuple(arr.shape), what)
            self._install(arr)

    def _set_dtype(self, dtype: np.dtype[Any], what: str) -> None:
        """Fix the storage dtype, once, after asking the backend whether it can hold it."""
        try:
            self._backend.check_dtype(dtype)
        except TypeError as exc:
            raise InvalidArgumentError(f"{what} on {self._device.name}: {exc}") from None
        self._dtype = dtype

    @staticmethod
    def _parse_shape(shape: Any, what: str) -> tuple[int | None, ...]:
        try:
            dims = tuple(shape)
            out = tuple(None if d is None else int(d) for d in dims)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"{what}: shape must be a sequence of ints or None, got {shape!r}") from None
        if any(d is not None and d < 0 for d in out):
            raise InvalidArgumentError(f"{what}: shape dims must be >= 0 or None, got {shape!r}")
        return out

    def _declare(
        self,
        declared: tuple[int | None, ...] | None,
        validate_shape: bool,
        actual: tuple[int, ...] | None,
        what: str,
    ) -> None:
        """Record the shape constraint: declared, or the initial value's, or none at all.

        A deferred callable with no ``shape=`` fixes its shape at its first initialization.
        """
        self._pending_shape = actual
        self._fix_on_init = False
        if not validate_shape:
            self._declared: tuple[int | None, ...] | None = None
            return
        if declared is not None and actual is not None and not _fits(actual, declared):
            raise InvalidArgumentError(
                f"In {what} creation, the initial value's shape {actual} is not compatible with the "
                f"explicitly supplied shape {declared}"
            )
        self._declared = declared if declared is not None else actual
        self._fix_on_init = self._declared is None

    # storage helpers ------------------------------------------------------------------

    def _install(self, arr: Any) -> None:
        """Make ``arr`` (a private array on our device, our dtype) the value: written into the
        existing buffer when the shape is unchanged, else adopted as the new storage."""
        storage = self._storage
        if storage is not None and self._backend.inplace and storage.shape == arr.shape:
            self._backend.apply("assign", storage, arr, self._device.backend_index)
            return
        if self._host and not (arr.flags.c_contiguous and arr.flags.writeable):
            arr = np.array(arr, order="C", copy=True)
        self._set_storage(arr)

    # --- identity and metadata ------------------------------------------------------------

    @property
    def name(self) -> str:
        """The variable's unique name; also its checkpoint key."""
        return self._name

    @property
    def device(self) -> str:
        """The device holding the storage, short canonical form (``/cpu:0``, ``/gpu:1``)."""
        return self._device.name

    @property
    def physical_device(self) -> PhysicalDevice:
        """The device object (kind, index, backend)."""
        return self._device

    @property
    def backend(self) -> str:
        """The array library holding the storage: "numpy", "cupy" or "jax"."""
        return self._backend.name

    @property
    def dtype(self) -> np.dtype[Any] | None:
        """The storage dtype (None only for a deferred callable whose dtype is not known yet)."""
        return self._dtype

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The current concrete shape (the pending shape while uninitialized; None if unknown)."""
        if self._storage is not None:
            return tuple(self._storage.shape)
        return self._pending_shape

    @property
    def declared_shape(self) -> tuple[int | None, ...] | None:
        """The declared shape constraint: ``None`` dims are free; None means any shape (validate_shape=False)."""
        return self._declared

    @property
    def ndim(self) -> int:
        shape = self.shape
        if shape is None:
            raise UninitializedVariableError(f"variable '{self._name}' has no known shape until it is initialized")
        return len(shape)

    @property
    def size(self) -> int:
        shape = self.shape
        if shape is None:
            raise UninitializedVariableError(f"variable '{self._name}' has no known shape until it is initialized")
        return int(np.prod(shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * (self._dtype.itemsize if self._dtype is not None else 0)

    @property
    def trainable(self) -> bool:
        return self._trainable

    @property
    def synchronization(self) -> VariableSynchronization:
        return self._synchronization

    @property
    def aggregation(self) -> VariableAggregation:
        return self._aggregation

    @property
    def initialized(self) -> bool:
        """Whether the variable holds a value."""
        return self._storage is not None

    def _known_shape(self) -> tuple[int, ...] | None:
        return self.shape

    def _known_dtype(self) -> np.dtype[Any] | None:
        return self._dtype

    # --- reads ----------------------------------------------------------------------------

    def _uninitialized(self) -> UninitializedVariableError:
        return UninitializedVariableError(
            f"Attempting to use uninitialized value {self._name}: variable '{self._name}' on "
            f"{self._device.name} has not been initialized; run its initializer (v.initializer()), "
            "gv.global_variables_initializer(), or restore it from a checkpoint"
        )

    def value(self) -> Any:
        """The live storage, no copy: a read-only numpy view (host), the CuPy array (do not
        mutate it), or the current immutable JAX array.

        Raises:
            UninitializedVariableError: the variable holds no value yet.
        """
        storage = self._storage
        if storage is None:
            raise self._uninitialized()
        if not self._host:
            return storage
        ro = self._ro
        if ro is None:
            ro = storage.view()
            ro.flags.writeable = False
            self._ro = ro
        return ro

    _gpuvars_value = value

    def read_value(self) -> Any:
        """A snapshot of the value on the variable's device (a copy; JAX arrays are immutable)."""
        storage = self._storage
        if storage is None:
            raise self._uninitialized()
        if not self._backend.inplace:
            return storage
        return self._backend.asarray(storage, storage.dtype, self._device.backend_index)

    def numpy(self) -> np.ndarray[Any, Any]:
        """A host numpy copy of the value."""
        storage = self._storage
        if storage is None:
            raise self._uninitialized()
        return self._backend.to_numpy(storage)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray[Any, Any]:
        out: np.ndarray[Any, Any]
        if self._host and not copy:
            out = self.value()
        elif copy is False:
            raise ValueError(f"variable '{self._name}' lives on {self.device}; a host array needs a copy")
        else:
            out = self.numpy()
        return out if dtype is None else out.astype(dtype, copy=False)

    def __dlpack__(self, **kwargs: Any) -> Any:
        """DLPack export of ``value()``: a read-only live view for host variables.

        A consumer that cannot receive the read-only flag (DLPack < 1.0, e.g. JAX) gets a
        snapshot instead, never a writable alias of the storage.
        """
        value = self.value()
        try:
            return value.__dlpack__(**kwargs)
        except BufferError:
            if not self._host:
                raise
            return np.array(value).__dlpack__(**kwargs)

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

    # --- updates --------------------------------------------------------------------------

    def _convert(self, value: Any, what: str, explicit: bool = False) -> Any:
        """``value`` as an array on our device with our dtype; applies the transfer guard to
        implicit copies. With ``explicit`` (creation, init ops) the result is always a private
        copy that may become the storage; otherwise a same-device array of our dtype is
        returned as it is (the update reads it once)."""
        device = self._device
        src_backend: Backend | None
        src_device: PhysicalDevice | None
        if isinstance(value, Variable):
            src = value.value()
            src_backend, src_device = value._backend, value._device
        else:
            src_backend, src_device = device_of_array(value)
            src = value
        kind: str | None = None
        if src_backend is None or src_backend.name == "numpy":  # host memory
            arr_src: Any = host_array(src) if src_backend is None else np.asarray(src)
            if device.kind == "gpu":
                kind = "host-to-device"
            elif src_device is not None and src_device is not device:
                kind = "device-to-device"  # a variable on another logical CPU device
        else:
            arr_src = src
            if src_device is not device:
                kind = "device-to-device"
        if kind is not None and not explicit:
            self._guard(kind, value, src_device, what)
        src_dtype = np.dtype(arr_src.dtype)
        if self._dtype is None:
            self._set_dtype(src_dtype, what)
        dtype: np.dtype[Any] = self._dtype  # type: ignore[assignment]  # set just above
        _check_cast(src_dtype, dtype, what)
        try:
            if not explicit and src_device is device and src_dtype == dtype:
                return arr_src
            if src_backend is None or src_backend.name == "numpy" or src_backend is self._backend:
                return self._backend.asarray(arr_src, dtype, device.backend_index)
            host = src_backend.to_numpy(arr_src)  # another library: through the host
            return self._backend.asarray(host, dtype, device.backend_index)
        except Exception as exc:
            _raise_mapped(exc, device, what)
            raise

    def _guard(self, kind: str, value: Any, src_device: PhysicalDevice | None, what: str) -> None:
        mode = config.get_transfer_guard()
        if mode == "allow":
            return
        if isinstance(value, Variable):
            src = f"variable '{value._name}' on {value.device}"
        elif src_device is not None:
            src = f"{type(value).__name__} on {src_device.name}"
        else:
            src = f"{type(value).__name__} from {'host memory' if kind == 'host-to-device' else 'another device'}"
        text = f"{what} on {self._device.name}: implicit {kind} copy of {src}"
        if mode == "disallow":
            raise TransferGuardError(
                f"{text} is disallowed by transfer_guard('disallow'); copy it explicitly first "
                f"with gv.copy_to(x, '{self._device.name}')"
            )
        _log.warning("%s", text)

    @staticmethod
    def _host_operand(value: Any) -> Any:
        """``value`` as host memory without a copy (a host variable's operand), or None when
        it lives on a device or is a Variable (those go through :meth:`_convert`)."""
        if type(value) is np.ndarray:
            return value
        if isinstance(value, Variable) or device_of_array(value)[0] is not None:
            return None
        return host_array(value)

    def _operand(self, value: Any, op: str) -> Any:
        """``value`` ready to combine with the storage: on our device, our dtype, our shape."""
        storage = self._storage
        dtype = self._dtype
        src = self._host_operand(value) if self._host and dtype is not None else None
        if src is None:
            src = self._convert(value, f"{op} to variable '{self._name}'")
        elif src.dtype != dtype:
            _check_cast(src.dtype, dtype, f"{op} to variable '{self._name}'")  # type: ignore[arg-type]
        shape = src.shape
        if storage is not None and shape == storage.shape:
            return src
        if storage is None:  # an assign that initializes: the declared shape still binds
            ok, current = _fits(shape, self._declared), self._declared
        else:
            current = storage.shape
            ok = op == "assign" and _fits(shape, self._declared)
        if not ok:
            raise InvalidArgumentError(
                f"Cannot {op} value to variable '{self._name}': shape mismatch. The variable shape "
                f"{_fmt_declared(current)} (declared {_fmt_declared(self._declared)}) and the value "
                f"shape {shape} are incompatible"
            )
        return src

    def assign(self, value: Any, read_value: bool = True) -> Variable | None:
        """Write ``value`` into the variable, on its device; returns the variable.

        Same-shape assigns write numpy/CuPy storage in place (same buffer); a dynamic-shape
        variable (``shape=(None, ...)`` or ``validate_shape=False``) reallocates when the
        shape changes. Assigning an uninitialized variable initializes it.

        Raises:
            InvalidArgumentError: shape or dtype mismatch (names the variable and both).
            TransferGuardError: an implicit copy from another device under "disallow".
        """
        storage = self._storage
        if (
            self._host
            and type(value) is np.ndarray
            and storage is not None
            and value.dtype is storage.dtype  # identity: the common case, and cheap
            and value.shape == storage.shape
        ):
            # The hot path: host to host, nothing to convert. Slice assignment skips
            # np.copyto's dispatch (16 elements: 254 ns vs 509 ns, bench/README.md).
            storage[...] = value
            return self if read_value else None
        self._apply("assign", value)
        return self if read_value else None

    def assign_add(self, delta: Any, read_value: bool = True) -> Variable | None:
        """Add ``delta`` (same shape) to the variable, on its device; returns the variable."""
        storage = self._storage
        if (
            self._host
            and type(delta) is np.ndarray
            and storage is not None
            and delta.dtype is storage.dtype
            and delta.shape == storage.shape
        ):
            # the hot path, as in assign (inlined on purpose: a shared helper costs a call)
            np.add(storage, delta, storage)
            return self if read_value else None
        self._apply("add", delta)
        return self if read_value else None

    def assign_sub(self, delta: Any, read_value: bool = True) -> Variable | None:
        """Subtract ``delta`` (same shape) from the variable, on its device; returns the variable."""
        storage = self._storage
        if (
            self._host
            and type(delta) is np.ndarray
            and storage is not None
            and delta.dtype is storage.dtype
            and delta.shape == storage.shape
        ):
            np.subtract(storage, delta, storage)
            return self if read_value else None
        self._apply("sub", delta)
        return self if read_value else None

    def _apply(self, op: str, value: Any) -> None:
        storage = self._storage
        if storage is None and op != "assign":
            raise self._uninitialized()
        src = self._operand(value, op)
        device = self._device
        try:
            if storage is None or src.shape != storage.shape:
                # first value, or a dynamic-shape reallocation: the storage needs a private copy
                self._install(self._backend.asarray(src, self._dtype, device.backend_index))  # type: ignore[arg-type]
                return
            new = self._backend.apply(op, storage, src, device.backend_index)
        except Exception as exc:
            _raise_mapped(exc, device, f"{op} to variable '{self._name}'")
            raise
        if new is not storage:
            self._storage = new

    # scatter ---------------------------------------------------------------------------------

    def _scatter(self, op: str, indices: Any, updates: Any) -> Variable:
        storage = self._storage
        what = f"scatter_{op} on variable '{self._name}'"
        if storage is None:
            raise self._uninitialized()
        if storage.ndim == 0:
            raise InvalidArgumentError(f"{what}: a scalar variable has no rows to scatter into")
        if type(indices) is np.ndarray:  # the common case: no need to ask which library owns it
            idx_host = indices
        else:
            idx_backend, _ = device_of_array(indices)
            idx_host = np.asarray(indices) if idx_backend is None or idx_backend.name == "numpy" else idx_backend.to_numpy(indices)
        if idx_host.dtype.kind not in "iu":
            raise InvalidArgumentError(f"{what}: indices must be integers, got dtype {idx_host.dtype}")
        rows = storage.shape[0]
        if idx_host.size and (idx_host.min() < 0 or idx_host.max() >= rows):
            bad = idx_host[(idx_host < 0) | (idx_host >= rows)].reshape(-1)[0]
            raise InvalidArgumentError(f"{what}: index {int(bad)} is out of range [0, {rows})")
        upd = self._operand_any_shape(updates, what)
        expected = tuple(idx_host.shape) + tuple(storage.shape[1:])
        if tuple(upd.shape) != expected:
            raise InvalidArgumentError(
                f"{what}: updates must have shape indices.shape + variable.shape[1:] = {expected}, "
                f"got {tuple(upd.shape)}"
            )
        flat_idx = idx_host.reshape(-1).astype(np.int64, copy=False)
        flat_upd = upd.reshape((flat_idx.size,) + tuple(storage.shape[1:]))
        try:
            new = self._backend.scatter(op, storage, flat_idx, flat_upd, self._device.backend_index)
        except Exception as exc:
            _raise_mapped(exc, self._device, what)
            raise
        if new is not storage:
            self._storage = new
        return self

    def _operand_any_shape(self, value: Any, what: str) -> Any:
        src = self._host_operand(value) if self._host else None
        if src is None:
            return self._convert(value, what)
        _check_cast(src.dtype, self._dtype, what)  # type: ignore[arg-type]  # initialized: dtype set
        return src

    def scatter_update(self, indices: Any, updates: Any) -> Variable:
        """Set rows ``indices`` (along axis 0) to ``updates`` (shape ``indices.shape + shape[1:]``)."""
        return self._scatter("update", indices, updates)

    def scatter_add(self, indices: Any, updates: Any) -> Variable:
        """Add ``updates`` to rows ``indices``; repeated indices accumulate."""
        return self._scatter("add", indices, updates)

    def scatter_sub(self, indices: Any, updates: Any) -> Variable:
        """Subtract ``updates`` from rows ``indices``; repeated indices accumulate."""
        return self._scatter("sub", indices, updates)

    def scatter_mul(self, indices: Any, updates: Any) -> Variable:
        """Multiply rows ``indices`` by ``updates``; repeated indices multiply in turn."""
        return self._scatter("mul", indices, updates)

    def scatter_div(self, indices: Any, updates: Any) -> Variable:
        """Divide rows ``indices`` by ``updates``; repeated indices divide in turn."""
        return self._scatter("div", indices, updates)

    def scatter_min(self, indices: Any, updates: Any) -> Variable:
        """Rows ``indices`` become the minimum of themselves and ``updates``."""
        return self._scatter("min", indices, updates)

    def scatter_max(self, indices: Any, updates: Any) -> Variable:
        """Rows ``indices`` become the maximum of themselves and ``updates``."""
        return self._scatter("max", indices, updates)

    # --- initialization -------------------------------------------------------------------

    @property
    def initializer(self) -> Op:
        """An op that (re)initializes this variable from its initial value (a no-op for a
        variable made from a concrete value, as in TF2 eager)."""
        ref = weakref.ref(self)

        def run() -> None:
            var = ref()
            if var is not None:
                _run_init([var])

        return Op(f"{self._name}/Assign", run)

    def _materialize(self, resolve_dep: Callable[[Variable], Any]) -> Any:
        """A fresh private array of the initial value on our device (the init op calls this)."""
        what = f"initializing variable '{self._name}'"
        init = self._init
        device = self._device
        try:
            if isinstance(init, Initializer):
                assert self._init_shape is not None and self._dtype is not None
                arr = init.materialize(device, self._init_shape, self._dtype)
                if self._host and not arr.flags.writeable:
                    arr = np.array(arr)
                return arr
            if isinstance(init, _expr.Expression):
                with self._backend.scope(device.backend_index):  # CuPy computes on the current GPU
                    value = init.evaluate(resolve_dep)
            elif self._init_shape is not None:  # Keras-style initializer object
                value = init(self._init_shape, self._dtype)
            else:
                value = init()
            arr = self._convert(value, what, explicit=True)
        except Exception as exc:
            _raise_mapped(exc, device, what)
            raise
        shape = tuple(arr.shape)
        if not _fits(shape, self._declared):
            raise InvalidArgumentError(
                f"{what}: the initial value's shape {shape} is not compatible with the declared shape "
                f"{_fmt_declared(self._declared)}"
            )
        return arr

    def _resolve_for(self, dep: Variable, fresh: dict[int, Any]) -> Any:
        """``dep``'s value for an expression of ours: fresh from this run, else current; on our device."""
        if id(dep) in fresh:
            value = fresh[id(dep)]
        elif dep._storage is not None:
            value = dep._storage
        else:
            raise UninitializedVariableError(
                f"variable '{self._name}' is initialized from '{dep._name}' (via initialized_value()), "
                f"but '{dep._name}' is not initialized and is not part of this init op"
            )
        if dep._device is self._device:
            return value
        backend = dep._backend
        host = value if backend.name == "numpy" else backend.to_numpy(value)
        if self._device.kind == "cpu" and self._host:
            return host
        return self._backend.asarray(host, host.dtype, self._device.backend_index)

    def _restore_buffer_check(self, shape: tuple[int, ...]) -> None:
        """Raise unless a checkpoint tensor of ``shape`` may be restored into this variable."""
        if not _fits(tuple(shape), self._declared):
            raise InvalidArgumentError(
                f"variable '{self._name}': checkpoint shape {tuple(shape)} is not compatible with the "
                f"declared shape {_fmt_declared(self._declared)}"
            )

    def _restore_buffer(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        """Storage to restore into, allocated without running the initializer (Saver uses this)."""
        self._restore_buffer_check(shape)
        storage = self._storage
        if storage is None or tuple(storage.shape) != shape:
            storage = self._backend.empty(shape, dtype, self._device.backend_index)
        return storage

    def _set_storage(self, storage: Any) -> None:
        """Adopt ``storage`` (already on our device, our dtype) as the value.

        The first value of a deferred callable with no ``shape=`` fixes the shape.
        """
        self._storage = storage
        self._pending_shape = tuple(storage.shape)
        self._ro = None
        if self._dtype is None:  # a deferred callable restored before it ever ran
            self._dtype = np.dtype(storage.dtype)
        if self._fix_on_init:
            self._declared, self._fix_on_init = self._pending_shape, False

    def _mark_uninitialized(self) -> None:
        """Drop the value (a failed restore does this to what it had already written)."""
        self._storage = None
        self._ro = None

    # --- Python protocols -------------------------------------------------------------------

    def __repr__(self) -> str:
        device = getattr(self, "_device", None)  # unset while a failing constructor runs
        where = device.name if device is not None else "<unplaced>"
        head = f"<gpuvars.Variable '{self._name}' shape={self.shape} dtype={self._dtype} device={where}"
        if self._storage is None:
            return head + " uninitialized>"
        return head + f", value={np.array2string(self.numpy(), threshold=6, edgeitems=2)}>"

    def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(value, *args)`` with the variable's device current (CuPy computes there)."""
        with self._backend.scope(self._device.backend_index):
            return fn(self.value(), *args)

    def __getitem__(self, key: Any) -> Any:
        return self._read(operator.getitem, key)

    def __len__(self) -> int:
        shape = self.shape
        if not shape:
            raise TypeError(f"len() of a scalar variable '{self._name}'")
        return shape[0]

    def __float__(self) -> float:
        return float(self._read(float))

    def __int__(self) -> int:
        return int(self._read(int))

    def __bool__(self) -> bool:
        return bool(self._read(bool))

    def __index__(self) -> int:
        return int(self._read(operator.index))


def _read_operator(fn: Callable[[Any, Any], Any], reflected: bool = False) -> Callable[[Variable, Any], Any]:
    """An operator that reads the value (TF: ``v + 1`` reads ``v``); an expression operand
    defers to the expression's reflected operator."""

    def method(self: Variable, other: Any) -> Any:
        if isinstance(other, _expr.Expression):
            return NotImplemented
        if isinstance(other, Variable):
            other = other.value()
        if reflected:
            return self._read(lambda value: fn(other, value))
        return self._read(fn, other)

    return method


for _name, _fn in [*_expr.BINARY_OPS, ("matmul", operator.matmul)]:
    setattr(Variable, f"__{_name}__", _read_operator(_fn))
    setattr(Variable, f"__r{_name}__", _read_operator(_fn, reflected=True))
for _name, _fn in _expr.COMPARISONS:
    setattr(Variable, f"__{_name}__", _read_operator(_fn))
for _name, _un in _expr.UNARY_OPS:
    setattr(Variable, f"__{_name}__", lambda self, _f=_un: self._read(_f))


# --- init ops --------------------------------------------------------------------------------


def _init_order(targets: list[Variable]) -> list[Variable]:
    """``targets`` in dependency order; a cycle is an InvalidArgumentError naming it."""
    members = {id(v) for v in targets}
    order: list[Variable] = []
    state: dict[int, int] = {}  # 1 = visiting, 2 = done

    def visit(v: Variable, path: list[str]) -> None:
        mark = state.get(id(v))
        if mark == 2:
            return
        if mark == 1:
            cycle = path[path.index(v._name):] + [v._name]
            raise InvalidArgumentError(f"initial values form a dependency cycle: {' -> '.join(cycle)}")
        state[id(v)] = 1
        for dep in v._deps:
            if id(dep) in members:
                visit(dep, path + [v._name])
        state[id(v)] = 2
        order.append(v)

    for v in targets:
        visit(v, [])
    return order


def _run_init(variables: Iterable[Variable]) -> None:
    """Initialize ``variables`` (those with a deferred initial value) in dependency order."""
    targets = [v for v in variables if v._init is not None]
    order = _init_order(targets)
    members = {id(v) for v in order}
    for v in order:  # fail before any work if a dependency outside the op is uninitialized
        for dep in v._deps:
            if id(dep) not in members and dep._storage is None:
                raise UninitializedVariableError(
                    f"variable '{v._name}' is initialized from '{dep._name}' (via initialized_value()), "
                    f"but '{dep._name}' is not initialized and is not part of this init op"
                )
    fresh: dict[int, Any] = {}
    for v in order:
        arr = v._materialize(functools.partial(v._resolve_for, fresh=fresh))
        fresh[id(v)] = arr
        v._install(arr)


def variables_initializer(var_list: Iterable[Variable], name: str = "init") -> Op:
    """An op that initializes ``var_list`` in dependency order (TF's variables_initializer).

    The list is taken now; the op holds the variables weakly.

    Raises:
        InvalidArgumentError: an item is not a Variable.
    """
    refs = []
    for v in var_list:
        if not isinstance(v, Variable):
            raise InvalidArgumentError(f"variables_initializer expects Variables, got {type(v).__name__}")
        refs.append(weakref.ref(v))

    def run() -> None:
        _run_init([v for v in (r() for r in refs) if v is not None])

    return Op(name, run)


def global_variables_initializer() -> Op:
    """An op that initializes every variable alive now in the current registry.

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


def report_uninitialized_variables(var_list: Iterable[Variable] | None = None) -> list[str]:
    """Names of the uninitialized variables among ``var_list`` (default: the current registry)."""
    vs = current_registry().variables() if var_list is None else list(var_list)
    return [v.name for v in vs if not v.initialized]


def is_variable_initialized(variable: Variable) -> bool:
    """Whether ``variable`` holds a value."""
    if not isinstance(variable, Variable):
        raise InvalidArgumentError(f"is_variable_initialized expects a Variable, got {type(variable).__name__}")
    return variable.initialized
