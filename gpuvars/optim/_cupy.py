"""CuPy kernels: one ``ElementwiseKernel`` per optimizer configuration and dtype, reading
p, g and each slot once and writing p and the slots (one pass over memory).

The body is each optimizer's ``_cuda()``; the backend compiles it on first use and caches
it; the step's scalars (bias corrections, learning rate) are kernel arguments, so a
schedule never recompiles. Runs only where CuPy sees a GPU (``bash bench/gpu.sh``).
"""

from __future__ import annotations

from typing import Any

from gpuvars.placement import PhysicalDevice

__all__ = ["update"]


def update(opt: Any, p: Any, g: Any, slots: dict[str, Any], hyper: tuple[float, ...], device: PhysicalDevice) -> None:
    """One step of ``opt`` on CuPy arrays, in place, on ``device``."""
    backend: Any = device.backend
    ins = ", ".join(["T g"] + [f"T h{i}" for i in range(len(hyper))])
    outs = ", ".join(["T p"] + [f"T {s}" for s in opt.slot_names])
    kernel = backend.elementwise(ins, outs, opt._cuda(), f"gpuvars_{type(opt).__name__.lower()}")
    with backend.scope(device.backend_index):
        kernel(g, *[p.dtype.type(h) for h in hyper], p, *[slots[s] for s in opt.slot_names])
