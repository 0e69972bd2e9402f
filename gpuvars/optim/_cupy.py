"""CuPy kernels: one ``ElementwiseKernel`` per optimizer configuration and dtype, reading
p, g and each slot once and writing p and the slots (one pass over memory).

Compiled on first use and cached; the step's scalars (bias corrections, learning rate)
are kernel arguments, so a schedule never recompiles. Runs only where CuPy sees a GPU
(``bash bench/gpu.sh``).
"""

from __future__ import annotations

from typing import Any

from gpuvars.optim._optimizers import SGD, Adagrad, Adam, RMSprop
from gpuvars.placement import PhysicalDevice

__all__ = ["update"]

_kernels: dict[tuple[Any, ...], Any] = {}


def _source(opt: Any) -> tuple[str, tuple[str, ...]]:
    """The kernel body and the names of its scalar arguments (``h0``, ``h1``, ... in order)."""
    if isinstance(opt, SGD):
        if not opt.slot_names:
            return "p = p - h0 * g;", ("h0", "h1")
        step = "p = p + h1 * momentum - h0 * g;" if opt.nesterov else "p = p + momentum;"
        return "momentum = h1 * momentum - h0 * g; " + step, ("h0", "h1")
    if isinstance(opt, Adam):  # AdamW too: h4 is lr * weight_decay (0 for Adam)
        denom = "vhat = max(vhat, v); T d = vhat;" if opt.amsgrad else "T d = v;"
        body = ("p = p - p * h4; m = m + (g - m) * h1; v = v + (g * g - v) * h2; "
                f"{denom} p = p - (m * h0) / (sqrt(d) + h3);")
        return body, ("h0", "h1", "h2", "h3", "h4")
    if isinstance(opt, RMSprop):
        body = "rms = h1 * rms + (1 - h1) * g * g; T d = rms;"
        if opt.centered:
            body += " mg = h1 * mg + (1 - h1) * g; d = rms - mg * mg;"
        body += " T inc = h0 * g / sqrt(d + h3);"
        body += " momentum = h2 * momentum + inc; p = p - momentum;" if "momentum" in opt.slot_names else " p = p - inc;"
        return body, ("h0", "h1", "h2", "h3")
    if isinstance(opt, Adagrad):
        return "accumulator = accumulator + g * g; p = p - h0 * g / sqrt(accumulator + h1);", ("h0", "h1")
    raise TypeError(f"no CuPy kernel for {type(opt).__name__}")


def _kernel(opt: Any) -> Any:
    import cupy

    config = (type(opt), opt.slot_names, getattr(opt, "nesterov", None), getattr(opt, "amsgrad", None),
              getattr(opt, "centered", None))
    kernel = _kernels.get(config)
    if kernel is None:
        body, scalars = _source(opt)
        ins = ", ".join(["T g"] + [f"T {h}" for h in scalars])
        outs = ", ".join(["T p"] + [f"T {s}" for s in opt.slot_names])
        kernel = _kernels[config] = cupy.ElementwiseKernel(ins, outs, body, f"gpuvars_{type(opt).__name__.lower()}")
    return kernel


def update(opt: Any, p: Any, g: Any, slots: dict[str, Any], hyper: tuple[float, ...], device: PhysicalDevice) -> None:
    """One step of ``opt`` on CuPy arrays, in place, on ``device``."""
    import cupy

    kernel = _kernel(opt)
    _, scalars = _source(opt)
    with cupy.cuda.Device(device.backend_index):
        hp = [p.dtype.type(h) for h in hyper[: len(scalars)]]
        kernel(g, *hp, p, *[slots[s] for s in opt.slot_names])
