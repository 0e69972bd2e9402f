"""SGD, Adam, AdamW, RMSprop and Adagrad: Keras 3's names, defaults and update rules.

Each states its rule once in array math (``_rule``: the JAX kernel, and the reference the
tests check every backend against) and once in place on numpy (``_numpy``: ``out=``
ufuncs over one scratch buffer per thread, no temporaries per element-op); the CuPy
kernels (:mod:`gpuvars.optim._cupy`) are the same rule in C.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from gpuvars.errors import InvalidArgumentError
from gpuvars.optim.optimizer import LearningRate, Optimizer, _number

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "RMSprop"]

_scratch = threading.local()


def scratch(like: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A per-thread scratch array shaped like ``like`` (one buffer, grown as needed)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.nbytes < like.nbytes:
        buf = _scratch.buf = np.empty(max(like.nbytes, 1), np.uint8)
    out: np.ndarray[Any, Any] = buf[: like.nbytes].view(like.dtype).reshape(like.shape)
    return out


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{what} must be a bool, got {value!r}")
    return value


class SGD(Optimizer):
    """Gradient descent with optional (Nesterov) momentum.

    ``m = momentum * m - lr * g``; ``p += m`` (Nesterov: ``p += momentum * m - lr * g``);
    without momentum ``p -= lr * g`` and no slot.

    Example:
        >>> import gpuvars as gv, numpy as np
        >>> with gv.Registry():
        ...     w = gv.Variable(np.array([1.0, 2.0], np.float32), name="w")
        ...     opt = gv.optim.SGD(learning_rate=0.5)
        ...     opt.apply_gradients([(np.array([1.0, 1.0], np.float32), w)])
        ...     w.numpy().tolist(), int(opt.iterations.numpy())
        ([0.5, 1.5], 1)
    """

    def __init__(self, learning_rate: LearningRate = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 name: str = "SGD") -> None:
        super().__init__(learning_rate, name)
        self.momentum = _number(momentum, "SGD: momentum", low=0.0, high=1.0)
        self.nesterov = _flag(nesterov, "SGD: nesterov")
        self.slot_names = ("momentum",) if self.momentum > 0 else ()

    def _hyper(self, step: int, lr: float) -> tuple[float, ...]:
        return (lr, self.momentum)

    def _cuda(self) -> str:
        if not self.slot_names:
            return "p = p - h0 * g;"
        step = "p = p + h1 * momentum - h0 * g;" if self.nesterov else "p = p + momentum;"
        return "momentum = h1 * momentum - h0 * g; " + step

    def _rule(self, xp: Any, p: Any, g: Any, slots: dict[str, Any], hp: Any) -> tuple[Any, dict[str, Any]]:
        lr, mom = hp[0], hp[1]
        if not slots:
            return p - lr * g, {}
        m = mom * slots["momentum"] - lr * g
        return (p + mom * m - lr * g if self.nesterov else p + m), {"momentum": m}

    def _numpy(self, p: Any, g: Any, slots: dict[str, Any], hp: tuple[float, ...]) -> None:
        lr, mom = hp
        s = scratch(p)
        np.multiply(g, lr, out=s)  # s = lr * g
        if not slots:
            p -= s
            return
        m = slots["momentum"]
        m *= mom
        m -= s
        if self.nesterov:
            p -= s
            np.multiply(m, mom, out=s)
            p += s
        else:
            p += m


class Adam(Optimizer):
    """Adam (Kingma & Ba), Keras' form: ``alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)``,
    ``m += (g - m)(1 - b1)``, ``v += (g^2 - v)(1 - b2)``, ``p -= alpha m / (sqrt(v) + eps)``;
    ``amsgrad`` divides by the running maximum of ``v`` instead (slot ``vhat``).
    """

    def __init__(self, learning_rate: LearningRate = 0.001, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7, amsgrad: bool = False, name: str = "Adam") -> None:
        super().__init__(learning_rate, name)
        cls = type(self).__name__
        self.beta_1 = _number(beta_1, f"{cls}: beta_1", low=0.0, high=1.0, open_high=True)
        self.beta_2 = _number(beta_2, f"{cls}: beta_2", low=0.0, high=1.0, open_high=True)
        self.epsilon = _number(epsilon, f"{cls}: epsilon", low=0.0)
        self.amsgrad = _flag(amsgrad, f"{cls}: amsgrad")
        self.slot_names = ("m", "v", "vhat") if self.amsgrad else ("m", "v")

    def _hyper(self, step: int, lr: float) -> tuple[float, ...]:
        alpha = lr * math.sqrt(1.0 - self.beta_2**step) / (1.0 - self.beta_1**step)
        return (alpha, 1.0 - self.beta_1, 1.0 - self.beta_2, self.epsilon, 0.0)

    def _cuda(self) -> str:  # AdamW too: h4 is lr * weight_decay (0 for Adam)
        denom = "vhat = max(vhat, v); T d = vhat;" if self.amsgrad else "T d = v;"
        return ("p = p - p * h4; m = m + (g - m) * h1; v = v + (g * g - v) * h2; "
                f"{denom} p = p - (m * h0) / (sqrt(d) + h3);")

    def _rule(self, xp: Any, p: Any, g: Any, slots: dict[str, Any], hp: Any) -> tuple[Any, dict[str, Any]]:
        alpha, c1, c2, eps, decay = hp[0], hp[1], hp[2], hp[3], hp[4]
        p = p - p * decay
        m = slots["m"] + (g - slots["m"]) * c1
        v = slots["v"] + (g * g - slots["v"]) * c2
        out = {"m": m, "v": v}
        denom = v
        if self.amsgrad:
            denom = out["vhat"] = xp.maximum(slots["vhat"], v)
        return p - (m * alpha) / (xp.sqrt(denom) + eps), out

    def _numpy(self, p: Any, g: Any, slots: dict[str, Any], hp: tuple[float, ...]) -> None:
        alpha, c1, c2, eps, decay = hp
        m, v = slots["m"], slots["v"]
        s = scratch(p)
        if decay:
            np.multiply(p, decay, out=s)
            p -= s
        np.subtract(g, m, out=s)
        s *= c1
        m += s
        np.multiply(g, g, out=s)
        s -= v
        s *= c2
        v += s
        denom = v
        if self.amsgrad:
            denom = slots["vhat"]
            np.maximum(denom, v, out=denom)
        np.sqrt(denom, out=s)
        s += eps
        np.divide(m, s, out=s)
        s *= alpha
        p -= s


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): first ``p -= lr * wd * p``,
    then Adam's step (Keras 3's order)."""

    def __init__(self, learning_rate: LearningRate = 0.001, weight_decay: float = 0.004, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7, amsgrad: bool = False, name: str = "AdamW") -> None:
        super().__init__(learning_rate, beta_1, beta_2, epsilon, amsgrad, name)
        self.weight_decay = _number(weight_decay, "AdamW: weight_decay", low=0.0)

    def _hyper(self, step: int, lr: float) -> tuple[float, ...]:
        return super()._hyper(step, lr)[:4] + (lr * self.weight_decay,)


class RMSprop(Optimizer):
    """RMSprop: ``rms = rho rms + (1 - rho) g^2``; ``inc = lr g / sqrt(rms + eps)``
    (centered: ``sqrt(rms - mg^2 + eps)`` with ``mg`` the mean gradient); ``p -= inc``, or with
    momentum ``mom = momentum mom + inc; p -= mom``."""

    def __init__(self, learning_rate: LearningRate = 0.001, rho: float = 0.9, momentum: float = 0.0,
                 epsilon: float = 1e-7, centered: bool = False, name: str = "RMSprop") -> None:
        super().__init__(learning_rate, name)
        self.rho = _number(rho, "RMSprop: rho", low=0.0, high=1.0)
        self.momentum = _number(momentum, "RMSprop: momentum", low=0.0, high=1.0)
        self.epsilon = _number(epsilon, "RMSprop: epsilon", low=0.0)
        self.centered = _flag(centered, "RMSprop: centered")
        self.slot_names = ("rms",) + (("momentum",) if self.momentum > 0 else ()) + (("mg",) if self.centered else ())

    def _hyper(self, step: int, lr: float) -> tuple[float, ...]:
        return (lr, self.rho, self.momentum, self.epsilon)

    def _cuda(self) -> str:
        body = "rms = h1 * rms + (1 - h1) * g * g; T d = rms;"
        if self.centered:
            body += " mg = h1 * mg + (1 - h1) * g; d = rms - mg * mg;"
        body += " T inc = h0 * g / sqrt(d + h3);"
        return body + (" momentum = h2 * momentum + inc; p = p - momentum;" if "momentum" in self.slot_names
                       else " p = p - inc;")

    def _rule(self, xp: Any, p: Any, g: Any, slots: dict[str, Any], hp: Any) -> tuple[Any, dict[str, Any]]:
        lr, rho, mom, eps = hp[0], hp[1], hp[2], hp[3]
        rms = rho * slots["rms"] + (1 - rho) * g * g
        out = {"rms": rms}
        denom = rms
        if self.centered:
            mg = out["mg"] = rho * slots["mg"] + (1 - rho) * g
            denom = rms - mg * mg
        inc = lr * g / xp.sqrt(denom + eps)
        if "momentum" in slots:
            inc = out["momentum"] = mom * slots["momentum"] + inc
        return p - inc, out

    def _numpy(self, p: Any, g: Any, slots: dict[str, Any], hp: tuple[float, ...]) -> None:
        lr, rho, mom, eps = hp
        rms = slots["rms"]
        s = scratch(p)
        rms *= rho
        np.multiply(g, g, out=s)
        s *= 1 - rho
        rms += s
        if self.centered:
            mg = slots["mg"]
            mg *= rho
            np.multiply(g, 1 - rho, out=s)
            mg += s
            np.multiply(mg, mg, out=s)
            np.subtract(rms, s, out=s)
            s += eps
        else:
            np.add(rms, eps, out=s)
        np.sqrt(s, out=s)
        np.divide(g, s, out=s)
        s *= lr
        if "momentum" in slots:
            m = slots["momentum"]
            m *= mom
            m += s
            p -= m
        else:
            p -= s


class Adagrad(Optimizer):
    """Adagrad: ``acc += g^2``; ``p -= lr g / sqrt(acc + eps)``; ``acc`` starts at
    ``initial_accumulator_value``."""

    def __init__(self, learning_rate: LearningRate = 0.001, initial_accumulator_value: float = 0.1,
                 epsilon: float = 1e-7, name: str = "Adagrad") -> None:
        super().__init__(learning_rate, name)
        self.initial_accumulator_value = _number(initial_accumulator_value, "Adagrad: initial_accumulator_value", low=0.0)
        self.epsilon = _number(epsilon, "Adagrad: epsilon", low=0.0)
        self.slot_names = ("accumulator",)
        self._slot_init = {"accumulator": self.initial_accumulator_value}

    def _hyper(self, step: int, lr: float) -> tuple[float, ...]:
        return (lr, self.epsilon)

    def _cuda(self) -> str:
        return "accumulator = accumulator + g * g; p = p - h0 * g / sqrt(accumulator + h1);"

    def _rule(self, xp: Any, p: Any, g: Any, slots: dict[str, Any], hp: Any) -> tuple[Any, dict[str, Any]]:
        acc = slots["accumulator"] + g * g
        return p - hp[0] * g / xp.sqrt(acc + hp[1]), {"accumulator": acc}

    def _numpy(self, p: Any, g: Any, slots: dict[str, Any], hp: tuple[float, ...]) -> None:
        lr, eps = hp
        acc = slots["accumulator"]
        s = scratch(p)
        np.multiply(g, g, out=s)
        acc += s
        np.add(acc, eps, out=s)
        np.sqrt(s, out=s)
        np.divide(g, s, out=s)
        s *= lr
        p -= s
