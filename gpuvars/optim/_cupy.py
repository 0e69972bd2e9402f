"""CuPy kernels: one ``ElementwiseKernel`` per optimizer configuration and dtype, reading
p, g and each slot once and writing p and the slots (one pass over memory).

The body is each optimizer's ``_cuda()``; compiled on first use and cached; the step's
scalars (bias corrections, learning rate) are kernel arguments, so a schedule never
recompiles. Runs only where CuPy sees a GPU (``bash bench/gpu.sh``).
"""

from __future__ import annotations

from typing import Any

from gpuvars.placement import PhysicalDevice

__all__ = ["update"]

_kernels: dict[tuple[Any, ...], Any] = {}


def update(opt: Any, p: Any, g: Any, slots: dict[str, Any], hyper: tuple[float, ...], device: PhysicalDevice) -> None:
    """One step of ``opt`` on CuPy arrays, in place, on ``device``."""
    import cupy

    body = opt._cuda()
    key = (body, opt.slot_names, len(hyper))
    kernel = _kernels.get(key)
    if kernel is None:
        ins = ", ".join(["T g"] + [f"T h{i}" for i in range(len(hyper))])
        outs = ", ".join(["T p"] + [f"T {s}" for s in opt.slot_names])
        kernel = _kernels[key] = cupy.ElementwiseKernel(ins, outs, body, f"gpuvars_{type(opt).__name__.lower()}")
    with cupy.cuda.Device(device.backend_index):
        kernel(g, *[p.dtype.type(h) for h in hyper], p, *[slots[s] for s in opt.slot_names])
