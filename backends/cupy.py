"""CuPy on CUDA devices: every call runs inside ``cupy.cuda.Device(i)``; updates in place."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ._util import draw_dtype, truncated, unique_rounds

try:
    import cupy
    import cupyx
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the CuPy backend needs cupy: pip install 'gpuvars[cuda12]' or 'gpuvars[cuda13]'"
    ) from err


class CupyBackend:
    """cupy.ndarray storage on ``/gpu:N``."""

    name = "cupy"
    platform = "gpu"
    inplace = True
    host = False
    xp = cupy
    oom_errors: tuple[type[BaseException], ...] = (cupy.cuda.memory.OutOfMemoryError,)
    errors: tuple[type[BaseException], ...] = (
        cupy.cuda.runtime.CUDARuntimeError,
        cupy.cuda.driver.CUDADriverError,
    )

    def __init__(self) -> None:
        self._count = int(cupy.cuda.runtime.getDeviceCount())

    def device_count(self) -> int:
        return self._count

    def scope(self, device: int) -> Any:
        return cupy.cuda.Device(device)

    def check_dtype(self, dtype: np.dtype[Any]) -> None:
        if dtype.kind not in "biufc":  # bfloat16 / float8 (ml_dtypes), objects, strings
            raise TypeError(f"CuPy has no {dtype} arrays (it holds bool, int, uint, float and complex)")

    def owns(self, array: object) -> bool:
        return isinstance(array, cupy.ndarray)

    def device_of(self, array: Any) -> int | None:
        return int(array.device.id)

    def asarray(self, value: Any, dtype: np.dtype[Any], device: int) -> Any:
        with cupy.cuda.Device(device):
            if isinstance(value, cupy.ndarray):
                if value.device.id == device:
                    return value.astype(dtype, copy=True)
                # cupy.copy allocates on the current device and copies across devices (peer
                # or staged); kernels and copyto with casting refuse operands on another GPU
                return cupy.copy(value).astype(dtype, copy=False)
            return cupy.array(np.asarray(value, dtype=dtype), copy=True)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype[Any], device: int) -> Any:
        with cupy.cuda.Device(device):
            return cupy.empty(shape, dtype=dtype)

    def full(self, shape: tuple[int, ...], fill: Any, dtype: np.dtype[Any], device: int) -> Any:
        with cupy.cuda.Device(device):
            out = cupy.empty(shape, dtype=dtype)
            out[...] = cupy.asarray(fill, dtype=dtype)
            return out

    def to_numpy(self, array: Any) -> np.ndarray[Any, Any]:
        with cupy.cuda.Device(array.device.id):
            out: np.ndarray[Any, Any] = cupy.asnumpy(array)
            return out

    def apply(self, op: str, dst: Any, src: Any, device: int) -> Any:
        with cupy.cuda.Device(device):
            if op == "assign":
                cupy.copyto(dst, src, casting="unsafe")
            elif op == "add":
                cupy.add(dst, src, out=dst, casting="unsafe")
            else:
                cupy.subtract(dst, src, out=dst, casting="unsafe")
        return dst

    def scatter(self, op: str, dst: Any, indices: Any, updates: Any, device: int) -> Any:
        with cupy.cuda.Device(device):
            idx = cupy.asarray(indices)
            upd = cupy.asarray(updates, dtype=dst.dtype)
            if op == "update":
                dst[idx] = upd
            elif op == "add":
                cupyx.scatter_add(dst, idx, upd)
            elif op == "sub":
                cupyx.scatter_add(dst, idx, -upd)
            elif op == "min":
                cupyx.scatter_min(dst, idx, upd)
            elif op == "max":
                cupyx.scatter_max(dst, idx, upd)
            else:  # mul/div: no atomic kernel; one round per repeat of an index
                fn = cupy.multiply if op == "mul" else cupy.true_divide
                for rows in unique_rounds(cupy.asnumpy(idx)):
                    pos = cupy.asarray(rows)
                    sel = idx[pos]
                    # setitem casts like numpy's ufunc.at (integer division truncates)
                    dst[sel] = fn(dst[sel], upd[pos])
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
        a, b = params
        ddt = draw_dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64))
        with cupy.cuda.Device(device):
            rs = cupy.random.RandomState(seed % (2**63))
            if kind == "uniform":
                flat = rs.uniform(a, b, size=n, dtype=ddt)
            elif kind == "normal":
                flat = rs.standard_normal(size=n, dtype=ddt) * b + a
            elif kind == "truncated_normal":
                draw = lambda k: rs.standard_normal(size=k, dtype=ddt)  # noqa: E731
                flat = truncated(draw, n, -2.0, 2.0, cupy) * b + a
            else:
                raise ValueError(f"unknown random kind {kind!r}")
            return flat.astype(dtype, copy=False).reshape(shape)

    def synchronize(self, device: int) -> None:
        with cupy.cuda.Device(device):
            cupy.cuda.Device(device).synchronize()

    def from_dlpack(self, obj: Any, device: int) -> Any:
        with cupy.cuda.Device(device):
            arr = cupy.from_dlpack(obj)
            return arr if arr.device.id == device else self.asarray(arr, arr.dtype, device)
