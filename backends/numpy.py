"""numpy on the host: ``/cpu:N`` (logical devices all share host memory, distinct buffers)."""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import numpy as np

from ._util import draw_dtype, truncated

_UFUNCS = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.true_divide,
    "min": np.minimum,
    "max": np.maximum,
}


class NumpyBackend:
    """Host arrays; updates run in place."""

    name = "numpy"
    platform = "cpu"
    inplace = True
    host = True
    xp = np
    oom_errors: tuple[type[BaseException], ...] = (MemoryError,)
    errors: tuple[type[BaseException], ...] = (FloatingPointError,)

    def device_count(self) -> int:
        return 1

    def scope(self, device: int) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def check_dtype(self, dtype: np.dtype[Any]) -> None:
        if dtype.hasobject:
            raise TypeError(f"numpy storage holds numbers, not {dtype}")

    def owns(self, array: object) -> bool:
        return isinstance(array, np.ndarray)

    def device_of(self, array: Any) -> int | None:
        return None

    def asarray(self, value: Any, dtype: np.dtype[Any], device: int) -> Any:
        return np.array(value, dtype=dtype, copy=True, order="C")

    def empty(self, shape: tuple[int, ...], dtype: np.dtype[Any], device: int) -> Any:
        return np.empty(shape, dtype=dtype)

    def full(self, shape: tuple[int, ...], fill: Any, dtype: np.dtype[Any], device: int) -> Any:
        out = np.empty(shape, dtype=dtype)
        out[...] = fill
        return out

    def to_numpy(self, array: Any) -> np.ndarray[Any, Any]:
        return np.array(array, copy=True)

    def apply(self, op: str, dst: Any, src: Any, device: int) -> Any:
        if op == "assign":
            np.copyto(dst, src, casting="unsafe")
        else:
            _UFUNCS[op](dst, src, out=dst, casting="unsafe")
        return dst

    def scatter(self, op: str, dst: Any, indices: Any, updates: Any, device: int) -> Any:
        if op == "update":
            dst[indices] = updates
        elif op == "div":
            with np.errstate(divide="ignore", invalid="ignore"):  # by zero: inf / nan, quietly, as TF
                np.true_divide.at(dst, indices, updates)
        else:
            _UFUNCS[op].at(dst, indices, updates)
        return dst

    def random(
        self,
        kind: str,
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        seed: int,
        device: int,
        params: Sequence[float],
    ) -> Any:
        rng = np.random.default_rng(seed)
        n = int(np.prod(shape, dtype=np.int64))
        ddt = draw_dtype(dtype)
        a, b = params
        if kind == "uniform":
            flat = rng.random(n, dtype=ddt) * (b - a) + a
        elif kind == "normal":
            flat = rng.standard_normal(n, dtype=ddt) * b + a
        elif kind == "truncated_normal":
            flat = truncated(lambda k: rng.standard_normal(k, dtype=ddt), n, -2.0, 2.0, np) * b + a
        else:
            raise ValueError(f"unknown random kind {kind!r}")
        return flat.astype(dtype, copy=False).reshape(shape)

    def synchronize(self, device: int) -> None:
        return None

    def from_dlpack(self, obj: Any, device: int) -> Any:
        return np.from_dlpack(obj)
