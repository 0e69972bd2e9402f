"""Variable: a named, typed buffer that lives on one device and is updated there.

One concrete class holds a backend and a device; backend differences sit behind the
backend protocol. Every mutation runs on the variable's device whatever ``gv.device``
scope encloses it; values from elsewhere go through the one transfer boundary
(:mod:`gpuvars._transfer`, which the transfer guard judges). numpy and CuPy storage is
updated in place (same buffer); JAX storage is rebound to a new array on the same device.

Aliasing (DESIGN decision 1): ``value()`` and ``np.asarray(v)`` give the live storage
without a copy: a read-only numpy view for host variables, the CuPy array itself (do not
mutate it), the current immutable array on JAX. ``read_value()``, ``numpy()`` and
indexing (``v[0]``) are snapshots. A dynamic-shape assign that changes the shape reallocates.

Only this module touches a Variable's fields; the rest of gpuvars uses the public
surface and the engine functions at the end of this file (:func:`restore_target`,
:func:`adopt`, :func:`install`, :func:`invalidate`).
"""

from __future__ import annotations

import enum
import threading
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

import numpy as np

from gpuvars import _creator, _expr, _shapes, _transfer, devices
from gpuvars._backend_errors import backend_errors, map_backend_error
from gpuvars._snapshot import Pin, Snapshot
from gpuvars._surface import VariableSurface
from gpuvars.errors import InvalidArgumentError, UninitializedVariableError
from gpuvars.init_ops import InitPlan, is_deferred, keras_style
from gpuvars.initializers import Initializer
from gpuvars.placement import PhysicalDevice, resolve
from gpuvars.registry import current_registry

__all__ = [
    "Variable",
    "VariableAggregation",
    "VariableSynchronization",
    "adopt",
    "check_variable_args",
    "exclusive",
    "install",
    "invalidate",
    "make_deferred",
    "pin",
    "restore_target",
    "writable",
]


#: index dtypes the host scatter fast path takes (identity tests on numpy's dtype singletons)
_FAST_SIGNED = frozenset(np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64))
_FAST_UNSIGNED = frozenset(np.dtype(t) for t in (np.uint8, np.uint16, np.uint32))
_U64 = np.dtype(np.uint64)
_I64_LIMIT = 2**63


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


def check_variable_args(
    what: str, synchronization: Any, aggregation: Any, trainable: Any, validate_shape: Any = True
) -> bool:
    """Validate the arguments every kind of variable shares; returns ``trainable`` resolved
    (default True, False for ``synchronization=ON_READ``)."""
    if not isinstance(synchronization, VariableSynchronization):
        raise InvalidArgumentError(f"{what}: synchronization must be a gv.VariableSynchronization, got {synchronization!r}")
    if not isinstance(aggregation, VariableAggregation):
        raise InvalidArgumentError(f"{what}: aggregation must be a gv.VariableAggregation, got {aggregation!r}")
    if not isinstance(validate_shape, bool):
        raise InvalidArgumentError(f"{what}: validate_shape must be a bool, got {validate_shape!r}")
    on_read = synchronization is VariableSynchronization.ON_READ
    if trainable is None:
        return not on_read
    if not isinstance(trainable, bool):
        raise InvalidArgumentError(f"{what}: trainable must be a bool, got {trainable!r}")
    if trainable and on_read:
        raise InvalidArgumentError(f"{what}: synchronization=ON_READ can only be set for non-trainable variables")
    return trainable


class _VariableMeta(type):
    """TF's variable-creator hook: inside ``strategy.scope()``, ``gv.Variable(...)`` is made
    by the innermost creator (a distributed variable, still an instance of gv.Variable)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is Variable:
            creator = _creator.current_creator()
            if creator is not None:
                if len(args) > 1:
                    raise TypeError(f"gv.Variable takes 1 positional argument but {len(args)} were given")
                if args:
                    kwargs["initial_value"] = args[0]
                return creator(**kwargs)
        return super().__call__(*args, **kwargs)


class Variable(VariableSurface, metaclass=_VariableMeta):
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

    Every argument after ``initial_value`` is keyword-only.

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
        "_name", "_device", "_backend", "_host", "_dtype", "_declared", "_pending_shape",
        "_fix_on_init", "_storage", "_ro", "_rows", "_init", "_init_shape", "_deps", "_trainable",
        "_synchronization", "_aggregation", "_lock", "_guard", "__weakref__",
    )

    def __init__(
        self,
        initial_value: Any = None,
        *,
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
        self._lock = threading.RLock()  # held by every mutation (and while a save pins the storage)
        self._guard: list[Pin] | None = None  # the pins of saves that have not read the storage yet
        self._storage: Any = None
        self._dtype: np.dtype[Any] | None = None
        self._pending_shape: tuple[int, ...] | None = None
        self._name = registry.add(self, "Variable" if name is None else name)
        try:
            what = f"variable '{self._name}'"
            self._trainable = check_variable_args(what, synchronization, aggregation, trainable, validate_shape)
            self._synchronization, self._aggregation = synchronization, aggregation
            self._setup(initial_value, dtype, shape, validate_shape, device, what)
        except BaseException:
            registry.remove(self)
            raise

    def _setup(self, initial_value: Any, dtype: Any, shape: Any, validate_shape: bool, device: Any, what: str) -> None:
        if initial_value is None:
            raise InvalidArgumentError(
                f"{what}: initial_value must be given (an array-like, an initializer, a callable or "
                "another variable's initialized_value())"
            )
        self._deps: tuple[VariableSurface, ...] = ()
        self._init: Any = None
        self._init_shape: tuple[int, ...] | None = None
        self._ro: Any = None
        self._rows: tuple[Any, tuple[int, ...]] | None = None
        try:
            requested_dtype = None if dtype is None else np.dtype(dtype)
        except TypeError:
            raise InvalidArgumentError(f"{what}: {dtype!r} is not a dtype") from None
        declared = None if shape is None else _shapes.parse_shape(shape, what)

        # Placement: explicit device= is the innermost scope; the enclosing scopes fill the gaps.
        if device is None:  # no scope of its own: the enclosing ones (no context manager per variable)
            spec = devices.current_device_spec("Variable", self._name)
        else:
            with devices.device(device):
                spec = devices.current_device_spec("Variable", self._name)
        self._device: PhysicalDevice = resolve(spec, what, stacklevel=4)  # warn at the user's line
        self._backend = self._device.backend
        self._host = self._backend.host
        if requested_dtype is not None:
            self._set_dtype(requested_dtype, what)

        if not is_deferred(initial_value):
            arr = self._convert(initial_value, what, explicit=True)
            self._declare(declared, validate_shape, tuple(arr.shape), what)
            self._install(arr)
            return
        self._init = initial_value
        actual: tuple[int, ...] | None = None
        if isinstance(initial_value, _expr.Expression):
            self._deps = tuple(initial_value.variables())
            if self._dtype is None and initial_value.dtype is not None:
                self._set_dtype(initial_value.dtype, what)
            actual = initial_value.shape
        elif isinstance(initial_value, Initializer) or keras_style(initial_value):
            # an initializer object drawn as init(shape, dtype): its own shape, else shape=
            own = initial_value.shape if isinstance(initial_value, Initializer) else None
            shp = own if own is not None else declared
            if shp is None or any(d is None for d in shp):
                raise InvalidArgumentError(
                    f"{what}: the initializer {type(initial_value).__name__} needs a fully defined "
                    f"shape= (got {_shapes.fmt(declared)})"
                )
            if own is not None and declared is not None and not _shapes.fits(own, declared):
                raise InvalidArgumentError(
                    f"{what}: the initializer's shape {own} is not compatible with the supplied shape {declared}"
                )
            actual = self._init_shape = tuple(d for d in shp if d is not None)
            if self._dtype is None:
                own_dtype = initial_value.dtype if isinstance(initial_value, Initializer) else None
                self._set_dtype(np.dtype(np.float32) if own_dtype is None else own_dtype, what)
            if isinstance(initial_value, Initializer):
                try:
                    initial_value.check_dtype(self._dtype)  # type: ignore[arg-type]  # set just above
                except InvalidArgumentError as exc:
                    raise InvalidArgumentError(f"{what}: {exc}") from None
        self._declare(declared, validate_shape, actual, what)

    def _set_dtype(self, dtype: np.dtype[Any], what: str) -> None:
        """Fix the storage dtype, once, after asking the backend whether it can hold it."""
        try:
            self._backend.check_dtype(dtype)
        except TypeError as exc:
            raise InvalidArgumentError(f"{what} on {self._device.name}: {exc}") from None
        self._dtype = dtype

    def _declare(self, declared: _shapes.Declared, validate_shape: bool, actual: tuple[int, ...] | None, what: str) -> None:
        """Record the shape constraint: declared, or the initial value's, or none at all.

        A deferred callable with no ``shape=`` fixes its shape at its first initialization.
        """
        self._pending_shape = actual
        self._fix_on_init = False
        if not validate_shape:
            self._declared: _shapes.Declared = None
            return
        if declared is not None and actual is not None and not _shapes.fits(actual, declared):
            raise InvalidArgumentError(
                f"In {what} creation, the initial value's shape {actual} is not compatible with the "
                f"explicitly supplied shape {declared}"
            )
        self._declared = declared if declared is not None else actual
        self._fix_on_init = self._declared is None

    def _install(self, arr: Any) -> None:
        """Make ``arr`` (a private array on our device, our dtype) the value: written into the
        existing buffer when the shape is unchanged, else adopted as the new storage."""
        with self._lock:
            storage = self._storage
            if storage is not None and self._backend.inplace and storage.shape == arr.shape:
                if self._guard is not None:
                    self._barrier()
                with backend_errors(self._device, f"writing variable '{self._name}'"):
                    self._backend.apply("assign", storage, arr, self._device.backend_index)
                return
            if self._host and not (arr.flags.c_contiguous and arr.flags.writeable):
                arr = np.array(arr, order="C", copy=True)
            self._set_storage(arr)

    def _barrier(self) -> None:
        """Before an in-place write (under the lock): every save that pinned the storage and has
        not read it yet captures it first (a copy, or a wait for the writer)."""
        guard = self._guard
        if guard is not None:
            for p in guard:
                p.capture()
            self._guard = None

    def _set_storage(self, storage: Any) -> None:
        """Adopt ``storage`` (on our device, our dtype); the first value of a deferred callable
        with no ``shape=`` fixes the shape."""
        with self._lock:
            if storage is self._storage and self._dtype is not None and not self._fix_on_init:
                return  # the buffer restored in place: nothing about the value's form changed
            if storage is not self._storage:
                self._guard = None  # the pins keep the old buffer, and nothing writes it any more
            self._storage = storage
            self._pending_shape = tuple(storage.shape)
            self._ro = self._rows = None
            if self._dtype is None:  # a deferred callable restored before it ever ran
                self._dtype = np.dtype(storage.dtype)
            if self._fix_on_init:
                self._declared, self._fix_on_init = self._pending_shape, False

    def _restore_buffer(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        if shape != self._declared and not _shapes.fits(shape, self._declared):  # equal: the common case
            raise InvalidArgumentError(
                f"variable '{self._name}': checkpoint shape {shape} is not compatible with the "
                f"declared shape {_shapes.fmt(self._declared)}"
            )
        with self._lock:
            storage = self._storage
            if storage is None or storage.shape != shape:  # the caller maps failures (it knows the file)
                return self._backend.empty(shape, dtype, self._device.backend_index)
            if self._guard is not None:
                self._barrier()  # the restore writes the live buffer in place (the caller holds the lock: exclusive())
            return storage

    def _mark_uninitialized(self) -> None:
        with self._lock:
            self._guard = None  # the pins keep the buffer
            self._storage = None
            self._ro = self._rows = None

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

    def _known_dtype(self) -> np.dtype[Any] | None:
        return self._dtype

    def _known_shape(self) -> tuple[int, ...] | None:
        if self._storage is not None:
            return tuple(self._storage.shape)
        return self._pending_shape

    @property
    def declared_shape(self) -> _shapes.Declared:
        """The declared shape constraint: ``None`` dims are free; None means any shape (validate_shape=False)."""
        return self._declared

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

    # --- updates --------------------------------------------------------------------------

    def _convert(self, value: Any, what: str, explicit: bool = False) -> Any:
        """``value`` as an array on our device with our dtype. Implicit copies are judged by
        the transfer guard unless ``explicit`` (creation, init ops), whose result is always a
        private copy that may become the storage."""
        located = _transfer.locate(value) if explicit else _transfer.admit(value, (self._device,), what)
        src_dtype = np.dtype(located[0].dtype)
        if self._dtype is None:
            self._set_dtype(src_dtype, what)
        dtype: np.dtype[Any] = self._dtype  # type: ignore[assignment]  # set just above
        python = located[1] is None and not isinstance(value, (np.ndarray, np.generic))
        _shapes.check_value_dtype(located[0], dtype, what, python=python)
        return _transfer.move(located, self._device, dtype, private=explicit, what=what)

    def _operand(self, value: Any, op: str, what: str | None = None) -> Any:
        """``value`` ready to combine with the storage: on our device, our dtype and (for
        ``op`` "assign", "add" or "sub") a shape the update accepts; a scatter passes its
        own ``what`` and checks the shape itself."""
        any_shape = what is not None
        what = what or f"{op} to variable '{self._name}'"
        storage, dtype = self._storage, self._dtype
        if self._host and dtype is not None and type(value) is np.ndarray:
            _shapes.check_cast(value.dtype, dtype, what)
            src = value
        else:
            src = self._convert(value, what)
        shape = src.shape
        if any_shape or (storage is not None and shape == storage.shape):
            return src
        if storage is None:  # an assign that initializes: the declared shape still binds
            ok, current = _shapes.fits(shape, self._declared), self._declared
        else:
            current = storage.shape
            ok = op == "assign" and _shapes.fits(shape, self._declared)
        if not ok:
            raise InvalidArgumentError(
                f"Cannot {op} value to variable '{self._name}': shape mismatch. The variable shape "
                f"{_shapes.fmt(current)} (declared {_shapes.fmt(self._declared)}) and the value "
                f"shape {shape} are incompatible"
            )
        return src

    if not TYPE_CHECKING:  # the surface declares these (typed); here: the same, with host fast paths

        def assign(self, value, *, read_value=True):
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
                lock = self._lock  # the write barrier: a save's pin of this buffer is captured first
                lock.acquire()  # acquire/release: half the cost of a with block (~90 ns vs ~180 ns)
                try:
                    if self._storage is storage:
                        if self._guard is not None:
                            self._barrier()
                        storage[...] = value
                        return self if read_value else None
                finally:
                    lock.release()
            self._write("assign", value)
            return self if read_value else None

        assign.__doc__ = VariableSurface.assign.__doc__

        def assign_add(self, delta, *, read_value=True):
            storage = self._storage
            if self._host and type(delta) is np.ndarray and storage is not None and delta.dtype is storage.dtype and delta.shape == storage.shape:
                lock = self._lock  # inlined on purpose: a shared helper costs a call
                lock.acquire()
                try:
                    if self._storage is storage:
                        if self._guard is not None:
                            self._barrier()
                        np.add(storage, delta, storage)
                        return self if read_value else None
                finally:
                    lock.release()
            self._write("add", delta)
            return self if read_value else None

        assign_add.__doc__ = VariableSurface.assign_add.__doc__

        def assign_sub(self, delta, *, read_value=True):
            storage = self._storage
            if self._host and type(delta) is np.ndarray and storage is not None and delta.dtype is storage.dtype and delta.shape == storage.shape:
                lock = self._lock  # inlined on purpose: a shared helper costs a call
                lock.acquire()
                try:
                    if self._storage is storage:
                        if self._guard is not None:
                            self._barrier()
                        np.subtract(storage, delta, storage)
                        return self if read_value else None
                finally:
                    lock.release()
            self._write("sub", delta)
            return self if read_value else None

        assign_sub.__doc__ = VariableSurface.assign_sub.__doc__

    def _write(self, op: str, value: Any) -> None:
        with self._lock:
            storage = self._storage
            if storage is None and op != "assign":
                raise self._uninitialized()
            device = self._device
            if self._same_place(value, storage):
                # A device array of our library already on our device, with our dtype and shape
                # (the common JAX / CuPy update): nothing to convert and no transfer to judge.
                if self._guard is not None:
                    self._barrier()
                try:
                    new = self._backend.apply(op, storage, value, device.backend_index)
                except Exception as exc:  # the message is built only on failure
                    mapped = map_backend_error(exc, device, f"{op} to variable '{self._name}'")
                    if mapped is None:
                        raise
                    raise mapped from exc
                if new is not storage:
                    self._storage = new
                return
            src = self._operand(value, op)
            with backend_errors(device, f"{op} to variable '{self._name}'"):
                if storage is None or src.shape != storage.shape:
                    # first value, or a dynamic-shape reallocation: the storage needs a private copy
                    self._install(self._backend.asarray(src, self._dtype, device.backend_index))  # type: ignore[arg-type]
                    return
                if self._guard is not None:
                    self._barrier()
                new = self._backend.apply(op, storage, src, device.backend_index)
            if new is not storage:
                self._storage = new

    def _same_place(self, value: Any, storage: Any) -> bool:
        """Whether ``value`` is a device array (not host memory) of our storage's library,
        type, dtype and shape, on our device: an update may use it as it is."""
        if storage is None or type(value) is not type(storage) or self._host:
            return False
        return bool(value.dtype == storage.dtype and value.shape == storage.shape and self._on_our_device(value))

    def _on_our_device(self, array: Any) -> bool:
        """Whether ``array`` (of our storage's array type) lives on our device and nowhere else
        (a backend's ``device_of`` is None for an array spread over several devices)."""
        return self._backend.device_of(array) == self._device.backend_index

    def _scatter_ready(self, storage: Any, indices: Any, updates: Any) -> bool:
        """Whether device ``indices`` and ``updates`` (our library's type) can go to the
        backend's scatter as they are: 1-d integer indices, updates of our dtype and of shape
        ``indices.shape + storage.shape[1:]``, both on our device, and storage with rows."""
        if self._host:
            return False
        shape, ishape = storage.shape, indices.shape
        return bool(
            shape
            and len(ishape) == 1
            and np.dtype(indices.dtype).kind in "iu"
            and updates.dtype == storage.dtype
            and updates.shape == ishape + shape[1:]
            and self._on_our_device(indices)
            and self._on_our_device(updates)
        )

    def _scatter(self, op: str, indices: Any, updates: Any) -> Variable:
        storage = self._storage
        rows = self._rows  # (storage, storage.shape[1:]) while the storage stays the same buffer
        if rows is None or rows[0] is not storage:
            rows = self._rows = (storage, storage.shape[1:]) if self._host and storage is not None else None
        if (  # the host fast path: numpy in, nothing to convert, one bounds check
            rows is not None
            and type(indices) is np.ndarray
            and type(updates) is np.ndarray
            and updates.dtype is storage.dtype  # identity: the common case, and cheap
            and indices.ndim == 1
            and updates.shape == indices.shape + rows[1]
        ):
            # numpy refuses an index >= rows before writing anything (IndexError: the slow path
            # below then names it), and refuses a scalar variable the same way; what it would
            # accept silently is checked here: a negative index (numpy wraps it) and a uint64
            # index >= 2**63 (numpy casts it to a negative intp). Smaller unsigned kinds need nothing.
            dt = indices.dtype
            if dt in _FAST_SIGNED:
                n = len(indices)
                ok = n == 0 or (min(indices.tolist()) if n <= 64 else int(np.minimum.reduce(indices))) >= 0
            else:
                ok = dt in _FAST_UNSIGNED or (
                    dt is _U64 and (len(indices) == 0 or int(np.maximum.reduce(indices)) < _I64_LIMIT)
                )
            if ok:
                lock = self._lock
                lock.acquire()  # acquire/release: half the cost of a with block
                try:
                    if self._storage is storage:
                        if self._guard is not None:
                            self._barrier()
                        if op == "update":
                            storage[indices] = updates  # fancy-index assignment: no method call between
                        else:
                            self._backend.scatter(op, storage, indices, updates, 0)
                        return self
                except IndexError:
                    pass  # out of range (or a scalar variable): the slow path raises the named error
                finally:
                    lock.release()
        elif (  # the device fast path (JAX, CuPy): indices and updates already on our device
            storage is not None
            and type(indices) is type(storage)
            and type(updates) is type(storage)
            and self._scatter_ready(storage, indices, updates)
        ):
            what = f"scatter_{op} on variable '{self._name}'"
            # the one bounds check, on a host copy of the indices; the scatter itself takes the
            # device indices as they are (no second copy back to the device)
            scatter_indices(_transfer.to_host(indices, self._backend), storage.shape[0], what)
            with self._lock:
                if self._storage is storage:
                    if self._guard is not None:
                        self._barrier()
                    with backend_errors(self._device, what):
                        new = self._backend.scatter(op, storage, indices, updates, self._device.backend_index)
                    if new is not storage:
                        self._storage = new
                    return self
        with self._lock:
            return self._scatter_locked(op, indices, updates)

    def _scatter_locked(self, op: str, indices: Any, updates: Any) -> Variable:
        storage = self._storage
        what = f"scatter_{op} on variable '{self._name}'"
        if storage is None:
            raise self._uninitialized()
        if storage.ndim == 0:
            raise InvalidArgumentError(f"{what}: a scalar variable has no rows to scatter into")
        flat_idx = scatter_indices(indices, storage.shape[0], what)
        upd = self._operand(updates, f"scatter_{op}", what)
        expected = tuple(np.shape(indices)) + tuple(storage.shape[1:])
        if tuple(upd.shape) != expected:
            raise InvalidArgumentError(
                f"{what}: updates must have shape indices.shape + variable.shape[1:] = {expected}, "
                f"got {tuple(upd.shape)}"
            )
        if self._guard is not None:
            self._barrier()
        with backend_errors(self._device, what):
            flat_shape = (flat_idx.size,) + tuple(storage.shape[1:])
            flat_upd = upd if tuple(upd.shape) == flat_shape else upd.reshape(flat_shape)  # JAX: no eager reshape
            new = self._backend.scatter(op, storage, flat_idx, flat_upd, self._device.backend_index)
        if new is not storage:
            self._storage = new
        return self

    # --- initialization -------------------------------------------------------------------

    def _init_plans(self) -> list[InitPlan]:
        if self._init is None:
            return []
        return [InitPlan(self, self._name, self._deps, self._materialize, self._install)]

    def _materialize(self, resolve_dep: Callable[[VariableSurface], Any]) -> Any:
        """A fresh private array of the initial value on our device (the init op calls this)."""
        what = f"initializing variable '{self._name}'"
        init, device = self._init, self._device
        with backend_errors(device, what):
            if isinstance(init, Initializer):
                assert self._init_shape is not None and self._dtype is not None
                arr = init.materialize(device, self._init_shape, self._dtype)
                return np.array(arr) if self._host and not arr.flags.writeable else arr
            if isinstance(init, _expr.Expression):
                with self._backend.scope(device.backend_index):  # CuPy computes on the current GPU
                    value = init.evaluate(lambda dep: _transfer.on_device(resolve_dep(dep), device))
            elif self._init_shape is not None:  # Keras-style initializer object
                value = init(self._init_shape, self._dtype)
            else:
                value = init()
            arr = self._convert(value, what, explicit=True)
        if not _shapes.fits(tuple(arr.shape), self._declared):
            raise InvalidArgumentError(
                f"{what}: the initial value's shape {tuple(arr.shape)} is not compatible with the declared "
                f"shape {_shapes.fmt(self._declared)}"
            )
        return arr

    def __deepcopy__(self, memo: dict[int, Any]) -> Variable:
        """An independent variable: a copy of the value on the same device, the same dtype,
        shape constraint and flags, registered under the same name (uniquified)."""
        if type(self) is not Variable:
            raise InvalidArgumentError(
                f"copy.deepcopy of the {type(self).__name__} '{self.name}' is not supported; "
                "create a new variable inside the strategy's scope from its value"
            )
        new: Variable = object.__new__(Variable)
        for field in Variable.__slots__:
            if field != "__weakref__":
                setattr(new, field, getattr(self, field))
        new._ro, new._rows, new._lock, new._guard = None, None, threading.RLock(), None
        if self._storage is not None:
            with backend_errors(self._device, f"copying variable '{self._name}'"):
                new._storage = self._backend.asarray(self._storage, self._storage.dtype, self._device.backend_index)
        new._name = current_registry().add(new, self._name)
        memo[id(self)] = new
        return new

def scatter_indices(indices: Any, rows: int, what: str) -> np.ndarray[Any, Any]:
    """``indices`` as a flat host int64 array, each checked to lie in ``[0, rows)`` (one pass)."""
    if type(indices) is np.ndarray:
        idx = indices
    else:
        backend = _transfer.device_of_array(indices)[0]
        idx = np.asarray(indices) if backend is None else _transfer.to_host(indices, backend)
    if idx.dtype.kind not in "iu":
        raise InvalidArgumentError(f"{what}: indices must be integers, got dtype {idx.dtype}")
    flat = idx.reshape(-1).astype(np.int64, copy=False)
    n = flat.size
    if n:
        # One bounds check, one pass: seen as uint64, a negative index wraps to >= 2**63, so
        # the largest unsigned value is >= rows exactly when some index is outside [0, rows).
        # A few indices are cheaper as Python ints than through a ufunc reduction.
        unsigned = flat.view(np.uint64)
        top = max(unsigned.tolist()) if n <= 64 else int(np.maximum.reduce(unsigned))
        if top >= rows:
            src = idx.reshape(-1)  # the caller's values (a uint64 index >= 2**63 stays positive)
            first = int(np.flatnonzero((flat < 0) | (flat >= rows))[0])
            raise InvalidArgumentError(f"{what}: index {int(src[first])} is out of range [0, {rows})")
    return flat


# --- the engine's access to storage (checkpoint adapters use only these) -----------------------


def make_deferred(
    name: str, init: Initializer, device: PhysicalDevice, shape: tuple[int, ...], dtype: np.dtype[Any],
    trainable: bool,
) -> Variable:
    """A new, registered, uninitialized plain Variable on ``device`` (already resolved) whose
    initial value is ``init`` and whose shape ``shape`` (non-negative ints) is fixed; what
    ``gv.Variable(init, name=name, trainable=trainable, device=...)`` makes outside any
    strategy scope, without parsing a device spec or checking arguments it can trust
    (a checkpoint's loader builds one per key, 200,000 of them at a time).

    Raises:
        InvalidArgumentError: ``device``'s backend cannot hold ``dtype``, or ``name`` is invalid.
    """
    self: Variable = object.__new__(Variable)
    self._lock = threading.RLock()
    self._guard = None
    self._storage = self._ro = self._rows = None
    self._dtype = None
    self._device, self._backend, self._host = device, device.backend, device.backend.host
    self._deps, self._init, self._init_shape = (), init, shape
    self._declared, self._pending_shape, self._fix_on_init = shape, shape, False
    self._trainable = trainable
    self._synchronization, self._aggregation = VariableSynchronization.AUTO, VariableAggregation.NONE
    registry = current_registry()
    self._name = registry.add(self, name)
    try:
        self._set_dtype(dtype, f"variable '{self._name}'")
        init.check_dtype(dtype)
    except BaseException:
        registry.remove(self)
        raise
    return self


def restore_target(variable: Variable, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
    """A writable buffer on ``variable``'s device to restore a tensor of ``shape`` into: the
    existing storage when it has that shape, else a new uninitialized array. Runs no
    initializer. Adopt the filled buffer with :func:`adopt`.

    Raises:
        InvalidArgumentError: ``shape`` does not fit the variable's declared shape.
        The backend's own errors (out of memory, ...) pass through unmapped: the caller
        maps them with ``backend_errors``, naming the file and key it restores from.
    """
    return variable._restore_buffer(tuple(shape), dtype)


def exclusive(variable: Variable) -> ContextManager[bool]:
    """``with exclusive(v):`` no other thread mutates ``v`` or pins it meanwhile (a restore
    fills the storage in place inside; :func:`restore_target` captures pending pins first).
    It is the variable's own reentrant lock: no generator per call on per-tensor paths."""
    return variable._lock


def pin(variable: Variable, snapshot: Snapshot) -> Pin | None:
    """Pin ``variable``'s storage for a save (the write barrier, :mod:`gpuvars._snapshot`):
    until the save has read it, a mutation first captures it. None when uninitialized."""
    with variable._lock:  # a mutation in flight ends first
        storage = variable._storage
        if storage is None:
            return None
        p = snapshot.pin(storage, variable._backend, variable._device.backend_index, variable._name)
        if variable._backend.inplace:
            guard = variable._guard
            variable._guard = [p] if guard is None else [q for q in guard if not q.done] + [p]
        return p


def adopt(variable: Variable, storage: Any) -> None:
    """Make ``storage`` (on the variable's device, its dtype, owned by nobody else) the value."""
    variable._set_storage(storage)


def install(variable: Variable, array: Any) -> None:
    """Write ``array`` (a private array on the variable's device, its dtype) as the value:
    into the existing buffer when the shape is unchanged, else adopted as new storage
    (a distributed variable writes every component)."""
    variable._install(array)


def invalidate(variable: Variable) -> None:
    """Drop the value: the variable (every component of a distributed one) becomes uninitialized."""
    variable._mark_uninitialized()


def writable(variable: Variable) -> Any:
    """The storage to update in place (an optimizer's kernel); the caller holds
    ``exclusive(variable)``. Saves that pinned it and have not read it capture it first.

    Raises:
        UninitializedVariableError: the variable holds no value.
    """
    variable._barrier()
    storage = variable._storage
    if storage is None:
        raise variable._uninitialized()
    return storage
