"""Deferred initializers, drawn on the target device when an init op runs.

An initializer allocates nothing when made: ``gv.Variable(gv.random_normal([784, 200]))``
draws on the variable's device only when its initializer runs, and never when the
variable is restored from a checkpoint. Seeds follow TF: ``gv.set_random_seed(s)`` plus
an optional per-op ``seed`` make every draw reproducible; each run of the same
initializer draws fresh values from its own stream.
"""

from __future__ import annotations

import itertools
import math
import secrets
import threading
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from gpuvars.errors import InvalidArgumentError

if TYPE_CHECKING:
    from gpuvars.placement import PhysicalDevice

__all__ = [
    "Constant",
    "GlorotNormal",
    "GlorotUniform",
    "HeNormal",
    "HeUniform",
    "Initializer",
    "LecunNormal",
    "Ones",
    "RandomNormal",
    "RandomUniform",
    "TruncatedNormal",
    "VarianceScaling",
    "Zeros",
    "constant",
    "get",
    "ones",
    "random_normal",
    "random_uniform",
    "set_random_seed",
    "truncated_normal",
    "zeros",
]

_DEFAULT_GRAPH_SEED = 87654321  # TF's DEFAULT_GRAPH_SEED
_seed_lock = threading.Lock()
_global_seed: int | None = None
_op_counter = itertools.count()


def set_random_seed(seed: int | None) -> None:
    """Set the global seed: with it, every random initializer made afterwards is reproducible.

    Like TF: with a global seed and no op seed, op seeds are drawn from a counter (so
    the n-th initializer made gets the same values in every run of the program); with
    an op seed and no global seed, a fixed default global seed is used.

    Example:
        >>> import gpuvars as gv
        >>> gv.set_random_seed(42)
    """
    global _global_seed, _op_counter
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise InvalidArgumentError(f"seed must be an int or None, got {seed!r}")
    with _seed_lock:
        _global_seed = seed
        _op_counter = itertools.count()


def _base_seed(op_seed: int | None) -> tuple[int, int] | None:
    """(global, op) seeds for a new random op, or None for OS entropy on every draw."""
    if op_seed is not None and (not isinstance(op_seed, int) or isinstance(op_seed, bool)):
        raise InvalidArgumentError(f"seed must be an int or None, got {op_seed!r}")
    with _seed_lock:
        if _global_seed is None and op_seed is None:
            return None
        g = _DEFAULT_GRAPH_SEED if _global_seed is None else _global_seed
        return (g, next(_op_counter) if op_seed is None else op_seed)


def _shape(shape: Any, what: str) -> tuple[int, ...]:
    try:
        dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        out = tuple(int(d) for d in dims)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what}: shape must be a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in out) or any(isinstance(d, bool) for d in dims):
        raise InvalidArgumentError(f"{what}: shape must be non-negative ints, got {shape!r}")
    return out


def _dtype(dtype: Any, what: str) -> np.dtype[Any]:
    try:
        out: np.dtype[Any] = np.dtype(dtype)
    except TypeError:
        raise InvalidArgumentError(f"{what}: {dtype!r} is not a dtype") from None
    return out


class Initializer:
    """Base class: a recipe for a variable's initial value, drawn on the variable's device.

    Subclasses implement :meth:`_draw`. An initializer may carry a ``shape`` and
    ``dtype`` (``gv.zeros([3])``) or get them from the variable (``shape=`` argument).
    Calling it Keras-style, ``init(shape, dtype)``, returns a host numpy array.
    """

    shape: tuple[int, ...] | None = None
    dtype: np.dtype[Any] | None = None

    def __init__(self, shape: Sequence[int] | None = None, dtype: Any = None) -> None:
        name = type(self).__name__
        self.shape = None if shape is None else _shape(shape, name)
        self.dtype = None if dtype is None else _dtype(dtype, name)

    def check_dtype(self, dtype: np.dtype[Any]) -> None:
        """Raise InvalidArgumentError if this initializer cannot produce ``dtype``."""

    def materialize(self, device: PhysicalDevice, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        """Draw a new array of ``shape``/``dtype`` on ``device`` (the init op calls this)."""
        return self._draw(device, shape, np.dtype(dtype))

    def _draw(self, device: PhysicalDevice, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        raise NotImplementedError

    def __call__(self, shape: Sequence[int] | None = None, dtype: Any = None) -> np.ndarray[Any, Any]:
        """Keras-style: a host numpy array of ``shape`` and ``dtype`` (default float32)."""
        from gpuvars.placement import host_device

        shp = _shape(shape, type(self).__name__) if shape is not None else self.shape
        if shp is None:
            raise InvalidArgumentError(f"{type(self).__name__}() needs a shape")
        dt = _dtype(dtype, type(self).__name__) if dtype is not None else (self.dtype or np.dtype(np.float32))
        device = host_device()  # numpy on the host: no device table, no GPU library
        out: np.ndarray[Any, Any] = self._draw(device, shp, dt)
        return out

    def __repr__(self) -> str:
        shown = {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_") and k != "kind" and not (k in ("shape", "dtype") and v is None)
        }
        params = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        return f"{type(self).__name__}({params})"


class Zeros(Initializer):
    """All zeros."""

    def _draw(self, device: PhysicalDevice, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        return device.backend.full(shape, 0, dtype, device.backend_index)


class Ones(Initializer):
    """All ones."""

    def _draw(self, device: PhysicalDevice, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        return device.backend.full(shape, 1, dtype, device.backend_index)


class Constant(Initializer):
    """A constant value (scalar or array), broadcast to the variable's shape."""

    def __init__(self, value: Any = 0, shape: Sequence[int] | None = None, dtype: Any = None) -> None:
        host = np.asarray(value)
        if host.dtype == object:
            raise InvalidArgumentError(f"Constant: value must be numeric, got {type(value).__name__}")
        super().__init__(shape if shape is not None else (host.shape if host.ndim else None), dtype)
        self.value = host

    def _draw(self, device: PhysicalDevice, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        try:
            np.broadcast_to(self.value, shape)
        except ValueError:
            raise InvalidArgumentError(
                f"Constant: value of shape {self.value.shape} does not broadcast to shape {shape}"
            ) from None
        return device.backend.full(shape, self.value.astype(dtype), dtype, device.backend_index)


class _Random(Initializer):
    kind = "normal"

    def __init__(self, shape: Sequence[int] | None = None, dtype: Any = None, seed: int | None = None) -> None:
        super().__init__(shape, dtype)
        self.seed = seed
        self._base = _base_seed(seed)
        self._runs = itertools.count()

    def _next_seed(self) -> int:
        if self._base is None:
            return secrets.randbits(62)
        entropy = [x % 2**64 for x in (*self._base, next(self._runs))]  # TF seeds may be negative
        state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
        return int(state[0]) << 31 | int(state[1]) >> 1

    def _params(self, shape: tuple[int, ...]) -> tuple[float, float]:
        raise NotImplementedError

    def check_dtype(self, dtype: np.dtype[Any]) -> None:
        if dtype.kind != "f" and dtype.name != "bfloat16" and not dtype.name.startswith("float8"):
            raise InvalidArgumentError(f"{type(self).__name__} draws floats; dtype {dtype} is not a float type")

    def _draw(self, device: PhysicalDevice, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        self.check_dtype(dtype)
        params = self._params(shape)
        return device.backend.random(self.kind, shape, dtype, self._next_seed(), device.backend_index, params)


class RandomNormal(_Random):
    """Normal draws with ``mean`` and ``stddev``."""

    def __init__(
        self,
        mean: float = 0.0,
        stddev: float = 1.0,
        seed: int | None = None,
        shape: Sequence[int] | None = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(shape, dtype, seed)
        self.mean, self.stddev = float(mean), float(stddev)

    def _params(self, shape: tuple[int, ...]) -> tuple[float, float]:
        return self.mean, self.stddev


class TruncatedNormal(RandomNormal):
    """Normal draws, redrawn when beyond two standard deviations (TF's truncated_normal)."""

    kind = "truncated_normal"


class RandomUniform(_Random):
    """Uniform draws in ``[minval, maxval)``."""

    kind = "uniform"

    def __init__(
        self,
        minval: float = 0.0,
        maxval: float = 1.0,
        seed: int | None = None,
        shape: Sequence[int] | None = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(shape, dtype, seed)
        if not minval < maxval:
            raise InvalidArgumentError(f"RandomUniform needs minval < maxval, got {minval} and {maxval}")
        self.minval, self.maxval = float(minval), float(maxval)

    def _params(self, shape: tuple[int, ...]) -> tuple[float, float]:
        return self.minval, self.maxval


def _fans(shape: tuple[int, ...]) -> tuple[float, float]:
    if len(shape) == 0:
        return 1.0, 1.0
    if len(shape) == 1:
        return float(shape[0]), float(shape[0])
    receptive = math.prod(shape[:-2])
    return float(shape[-2] * receptive), float(shape[-1] * receptive)


class VarianceScaling(_Random):
    """Draws scaled by fan-in/fan-out (Keras' VarianceScaling)."""

    def __init__(
        self,
        scale: float = 1.0,
        mode: str = "fan_in",
        distribution: str = "truncated_normal",
        seed: int | None = None,
        shape: Sequence[int] | None = None,
        dtype: Any = None,
    ) -> None:
        if scale <= 0:
            raise InvalidArgumentError(f"VarianceScaling: scale must be > 0, got {scale}")
        if mode not in ("fan_in", "fan_out", "fan_avg"):
            raise InvalidArgumentError(f"VarianceScaling: mode must be fan_in, fan_out or fan_avg, got {mode!r}")
        if distribution not in ("truncated_normal", "untruncated_normal", "uniform"):
            raise InvalidArgumentError(
                "VarianceScaling: distribution must be truncated_normal, untruncated_normal or uniform, "
                f"got {distribution!r}"
            )
        super().__init__(shape, dtype, seed)
        self.scale, self.mode, self.distribution = float(scale), mode, distribution
        self.kind = {"truncated_normal": "truncated_normal", "untruncated_normal": "normal"}.get(
            distribution, "uniform"
        )

    def _params(self, shape: tuple[int, ...]) -> tuple[float, float]:
        fan_in, fan_out = _fans(shape)
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[self.mode]
        variance = self.scale / max(1.0, n)
        if self.distribution == "uniform":
            limit = math.sqrt(3.0 * variance)
            return -limit, limit
        # 0.8796... is the stddev of a standard normal truncated to [-2, 2]
        std = math.sqrt(variance) / (0.87962566103423978 if self.kind == "truncated_normal" else 1.0)
        return 0.0, std


class GlorotUniform(VarianceScaling):
    """Uniform in ±sqrt(6 / (fan_in + fan_out)) (Xavier)."""

    def __init__(self, seed: int | None = None, shape: Sequence[int] | None = None, dtype: Any = None) -> None:
        super().__init__(1.0, "fan_avg", "uniform", seed, shape, dtype)


class GlorotNormal(VarianceScaling):
    """Truncated normal with stddev sqrt(2 / (fan_in + fan_out))."""

    def __init__(self, seed: int | None = None, shape: Sequence[int] | None = None, dtype: Any = None) -> None:
        super().__init__(1.0, "fan_avg", "truncated_normal", seed, shape, dtype)


class HeNormal(VarianceScaling):
    """Truncated normal with stddev sqrt(2 / fan_in)."""

    def __init__(self, seed: int | None = None, shape: Sequence[int] | None = None, dtype: Any = None) -> None:
        super().__init__(2.0, "fan_in", "truncated_normal", seed, shape, dtype)


class HeUniform(VarianceScaling):
    """Uniform in ±sqrt(6 / fan_in)."""

    def __init__(self, seed: int | None = None, shape: Sequence[int] | None = None, dtype: Any = None) -> None:
        super().__init__(2.0, "fan_in", "uniform", seed, shape, dtype)


class LecunNormal(VarianceScaling):
    """Truncated normal with stddev sqrt(1 / fan_in)."""

    def __init__(self, seed: int | None = None, shape: Sequence[int] | None = None, dtype: Any = None) -> None:
        super().__init__(1.0, "fan_in", "truncated_normal", seed, shape, dtype)


_BY_NAME: dict[str, type[Initializer]] = {
    "zeros": Zeros,
    "ones": Ones,
    "constant": Constant,
    "random_normal": RandomNormal,
    "truncated_normal": TruncatedNormal,
    "random_uniform": RandomUniform,
    "variance_scaling": VarianceScaling,
    "glorot_uniform": GlorotUniform,
    "glorot_normal": GlorotNormal,
    "he_normal": HeNormal,
    "he_uniform": HeUniform,
    "lecun_normal": LecunNormal,
}


def get(identifier: str | Initializer) -> Initializer:
    """An initializer from its snake_case name ("glorot_uniform") or class name, or itself.

    Example:
        >>> import gpuvars as gv
        >>> gv.initializers.get("glorot_uniform")
        GlorotUniform(seed=None, scale=1.0, mode='fan_avg', distribution='uniform')
    """
    if isinstance(identifier, Initializer):
        return identifier
    if isinstance(identifier, str):
        key = identifier if identifier in _BY_NAME else next(
            (k for k, cls in _BY_NAME.items() if cls.__name__ == identifier), ""
        )
        if key:
            return _BY_NAME[key]()
    raise InvalidArgumentError(f"unknown initializer {identifier!r}; known: {sorted(_BY_NAME)}")


def zeros(shape: Sequence[int], dtype: Any = np.float32) -> Zeros:
    """A deferred all-zeros initial value of ``shape`` (float32 by default)."""
    return Zeros(shape, dtype)


def ones(shape: Sequence[int], dtype: Any = np.float32) -> Ones:
    """A deferred all-ones initial value of ``shape``."""
    return Ones(shape, dtype)


def constant(value: Any, dtype: Any = None, shape: Sequence[int] | None = None) -> Constant:
    """A deferred constant initial value (``value`` broadcast to ``shape`` if given)."""
    return Constant(value, shape, dtype)


def random_normal(
    shape: Sequence[int], mean: float = 0.0, stddev: float = 1.0, dtype: Any = np.float32, seed: int | None = None
) -> RandomNormal:
    """A deferred normal draw (TF's tf.random_normal used as an initial value).

    Example:
        >>> import gpuvars as gv
        >>> w = gv.Variable(gv.random_normal([784, 200], stddev=0.35), name="weights")
        >>> w.initialized
        False
    """
    return RandomNormal(mean, stddev, seed, shape, dtype)


def truncated_normal(
    shape: Sequence[int], mean: float = 0.0, stddev: float = 1.0, dtype: Any = np.float32, seed: int | None = None
) -> TruncatedNormal:
    """A deferred normal draw with values beyond 2 stddev redrawn."""
    return TruncatedNormal(mean, stddev, seed, shape, dtype)


def random_uniform(
    shape: Sequence[int],
    minval: float = 0.0,
    maxval: float = 1.0,
    dtype: Any = np.float32,
    seed: int | None = None,
) -> RandomUniform:
    """A deferred uniform draw in ``[minval, maxval)``."""
    return RandomUniform(minval, maxval, seed, shape, dtype)
