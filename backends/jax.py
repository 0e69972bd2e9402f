"""JAX on its CPU or GPU devices; arrays are immutable, so updates rebind storage."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Sequence

import numpy as np

try:
    import jax
    import jax.numpy as jnp
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the JAX backend needs jax: pip install 'gpuvars[jax]' (or jax[cuda12] for GPUs)"
    ) from err


# Updates are compiled, not dispatched op by op: one jax.jit function per update kind,
# made at import (jit compiles lazily, on the first call). jax.jit keeps one executable
# per (shape, dtype, device) of its operands, so each (op, shape, dtype, device) compiles
# once and is cached; a variable reshaped by a dynamic-shape assign, or another dtype or
# device, compiles once more. Committed operands decide the device; host numpy operands
# (scatter indices) go where they are used. Each result is cast to the storage dtype
# inside the compiled function.
#
# No buffer donation (donate_argnums): the old storage array may still be held elsewhere,
# e.g. by a checkpoint snapshot taken concurrently, by v.value() handed to the user, or by
# a reduction in flight; donating it would delete that buffer under its holder.


def _add(dst: Any, src: Any) -> Any:
    return (dst + src).astype(dst.dtype)


def _sub(dst: Any, src: Any) -> Any:
    return (dst - src).astype(dst.dtype)


def _cast(dst: Any, src: Any) -> Any:
    return src.astype(dst.dtype)


_APPLY: dict[str, Callable[[Any, Any], Any]] = {"assign": jax.jit(_cast), "add": jax.jit(_add), "sub": jax.jit(_sub)}

# The engine checks every index against [0, rows) before it scatters, so the scatter may
# promise in-bounds indices (no clamp or drop code); repeated indices still accumulate.
_IN_BOUNDS = "promise_in_bounds"
_SCATTER_BODIES: dict[str, Callable[[Any, Any], Any]] = {
    "update": lambda ref, u: ref.set(u, mode=_IN_BOUNDS),
    "add": lambda ref, u: ref.add(u, mode=_IN_BOUNDS),
    "sub": lambda ref, u: ref.add(-u, mode=_IN_BOUNDS),
    "mul": lambda ref, u: ref.multiply(u, mode=_IN_BOUNDS),
    "div": lambda ref, u: ref.divide(u, mode=_IN_BOUNDS),
    "min": lambda ref, u: ref.min(u, mode=_IN_BOUNDS),
    "max": lambda ref, u: ref.max(u, mode=_IN_BOUNDS),
}


def _jit_scatter(body: Callable[[Any, Any], Any]) -> Callable[[Any, Any, Any], Any]:
    def scatter(dst: Any, indices: Any, updates: Any) -> Any:
        return body(dst.at[indices], updates).astype(dst.dtype)

    return jax.jit(scatter)


_SCATTER: dict[str, Callable[[Any, Any, Any], Any]] = {op: _jit_scatter(f) for op, f in _SCATTER_BODIES.items()}


def _host_device() -> Any:
    """JAX's first CPU device, or None when JAX runs without its CPU client."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


def request_cpu_devices(count: int) -> None:
    """Set JAX's CPU device count if JAX has not started yet (afterwards it is fixed)."""
    config: Any = jax.config  # jax.config.update is untyped
    try:
        config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backends are initialized: the count can no longer change
        pass
    except AttributeError:  # JAX < 0.5 has no such option: XLA's flag, read when the CPU client starts
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


class JaxBackend:
    """Committed single-device jax.Arrays on one platform ("cpu" or "gpu")."""

    name = "jax"
    inplace = False
    host = False
    xp = jnp

    def __init__(self, platform: str) -> None:
        self.platform = platform
        try:
            # this process's devices: after jax.distributed.initialize, jax.devices() also lists
            # the other processes' (which no array of this process may live on)
            self._devices = list(jax.local_devices(backend=platform))
        except RuntimeError:
            self._devices = []
        self._index = {dev: i for i, dev in enumerate(self._devices)}  # device -> its index
        runtime = getattr(jax.errors, "JaxRuntimeError", RuntimeError)
        self.oom_errors: tuple[type[BaseException], ...] = ()
        self.errors: tuple[type[BaseException], ...] = (runtime,)
        self._apply = _APPLY
        self._scatter = _SCATTER

    def device_count(self) -> int:
        return len(self._devices)

    def scope(self, device: int) -> contextlib.AbstractContextManager[Any]:
        # committed operands already decide where JAX computes; nothing to make current
        return contextlib.nullcontext()

    def check_dtype(self, dtype: np.dtype[Any]) -> None:
        # With jax_enable_x64 off JAX would silently narrow 64-bit dtypes (float64 -> float32).
        if dtype.hasobject:
            raise TypeError(f"JAX arrays hold numbers, not {dtype}")
        held = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
        if held != dtype:
            raise TypeError(
                f"JAX would store {dtype} as {held} because jax_enable_x64 is off; enable it "
                f"(jax.config.update('jax_enable_x64', True)) or ask for dtype={held}"
            )

    def owns(self, array: object) -> bool:
        if not isinstance(array, jax.Array):
            return False
        devices = array.devices()
        return len(devices) == 1 and next(iter(devices)) in self._index

    def device_of(self, array: Any) -> int | None:
        # None for an array on several devices (sharded) or on another platform's device
        devices = array.devices()
        return self._index.get(next(iter(devices))) if len(devices) == 1 else None

    def asarray(self, value: Any, dtype: np.dtype[Any], device: int) -> Any:
        dev = self._devices[device]
        if isinstance(value, jax.Array):
            return jax.device_put(value.astype(dtype), dev)
        return jax.device_put(np.asarray(value, dtype=dtype), dev)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype[Any], device: int) -> Any:
        # device= commits the array: later ops can never move the storage elsewhere
        # (an uncommitted array, e.g. one made under jax.default_device, follows its operands)
        return jnp.zeros(shape, dtype=dtype, device=self._devices[device])

    def full(self, shape: tuple[int, ...], fill: Any, dtype: np.dtype[Any], device: int) -> Any:
        src = jax.device_put(np.asarray(fill).astype(dtype, copy=False), self._devices[device])
        return jnp.broadcast_to(src, shape)  # computed on the device from a committed operand

    def to_numpy(self, array: Any) -> np.ndarray[Any, Any]:
        if self.platform == "gpu":
            # through a CPU array of its own: np.array of a GPU array keeps the host copy on that
            # array (jax's _npy_value) while it lives, so a variable's storage would carry a
            # second, host copy of itself after every read
            host = _host_device()
            if host is not None:
                array = jax.device_put(array, host)
        return np.array(array, copy=True)

    def apply(self, op: str, dst: Any, src: Any, device: int) -> Any:
        if op == "assign" and src.dtype == dst.dtype:
            return src  # arrays are immutable: the new value is the storage, nothing to compute
        return self._apply[op](dst, src)

    def scatter(self, op: str, dst: Any, indices: Any, updates: Any, device: int) -> Any:
        return self._scatter[op](dst, indices, updates)

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
        with jax.default_device(self._devices[device]):
            key = jax.random.key(seed % (2**63))
            if kind == "uniform":
                out = jax.random.uniform(key, shape, dtype=dtype, minval=a, maxval=b)
            elif kind == "normal":
                out = jax.random.normal(key, shape, dtype=dtype) * b + a
            elif kind == "truncated_normal":
                out = jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype=dtype) * b + a
            else:
                raise ValueError(f"unknown random kind {kind!r}")
            return jax.device_put(out.astype(dtype), self._devices[device])

    def jit(self, fn: Any, donate_argnums: tuple[int, ...] = ()) -> Any:
        """``jax.jit(fn)`` for engine kernels written against ``self.xp`` (an optimizer's step
        over every variable of a device); ``donate_argnums`` lets XLA reuse those inputs."""
        return jax.jit(fn, donate_argnums=donate_argnums)

    def synchronize(self, device: int) -> None:
        # JAX has no per-device barrier; a tiny blocking computation drains the queue in order.
        jax.device_put(0, self._devices[device]).block_until_ready()

    def from_dlpack(self, obj: Any, device: int) -> Any:
        dev = self._devices[device]
        if isinstance(obj, np.ndarray) and (self.platform == "gpu" or obj.dtype.kind not in "iufc"):
            # to a GPU a host array is copied anyway: straight there, no CPU client needed (JAX_PLATFORMS=cuda);
            # DLPack has no bfloat16 / float8 (ml_dtypes), and bool is not taken everywhere: a plain copy
            return jax.device_put(obj, dev)
        # a host array JAX's CPU client can adopt (aligned, C-contiguous) is not copied
        return jax.device_put(jnp.from_dlpack(obj), dev)
