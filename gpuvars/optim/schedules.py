"""Learning-rate schedules: callables of the step (Keras 3's names and arguments).

A schedule is called with the optimizer's ``iterations`` before the update (0 for the
first step) and returns a Python float; any ``callable(step) -> float`` works as well.
"""

from __future__ import annotations

import math
from typing import Any

from gpuvars.errors import InvalidArgumentError

__all__ = ["CosineDecay", "ExponentialDecay", "LearningRateSchedule"]


def _positive(value: Any, what: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
        value < 0 if allow_zero else value <= 0
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidArgumentError(f"{what} must be a finite number {bound}, got {value!r}")
    return float(value)


class LearningRateSchedule:
    """Base class: ``schedule(step) -> float``."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError


class ExponentialDecay(LearningRateSchedule):
    """``initial_learning_rate * decay_rate ** (step / decay_steps)`` (floored when ``staircase``).

    Example:
        >>> from gpuvars.optim import ExponentialDecay
        >>> s = ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
        >>> s(0), s(10), round(s(5), 6)
        (0.1, 0.05, 0.070711)
    """

    def __init__(self, initial_learning_rate: float, decay_steps: int, decay_rate: float, staircase: bool = False) -> None:
        self.initial_learning_rate = _positive(initial_learning_rate, "ExponentialDecay: initial_learning_rate")
        self.decay_steps = _positive(decay_steps, "ExponentialDecay: decay_steps")
        self.decay_rate = _positive(decay_rate, "ExponentialDecay: decay_rate")
        if not isinstance(staircase, bool):
            raise InvalidArgumentError(f"ExponentialDecay: staircase must be a bool, got {staircase!r}")
        self.staircase = staircase

    def __call__(self, step: int) -> float:
        p = step / self.decay_steps
        if self.staircase:
            p = math.floor(p)
        return float(self.initial_learning_rate * self.decay_rate**p)


class CosineDecay(LearningRateSchedule):
    """Cosine decay from ``initial_learning_rate`` to ``alpha * initial_learning_rate`` over
    ``decay_steps``, after an optional linear warmup to ``warmup_target`` over ``warmup_steps``
    (Keras 3's ``CosineDecay``: with a warmup, the decay starts from ``warmup_target``).

    Example:
        >>> from gpuvars.optim import CosineDecay
        >>> s = CosineDecay(0.0, decay_steps=100, warmup_target=1.0, warmup_steps=10)
        >>> s(0), s(5), s(10), round(s(60), 3), s(110)
        (0.0, 0.5, 1.0, 0.5, 0.0)
    """

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        alpha: float = 0.0,
        warmup_target: float | None = None,
        warmup_steps: int = 0,
    ) -> None:
        self.initial_learning_rate = _positive(initial_learning_rate, "CosineDecay: initial_learning_rate", True)
        self.decay_steps = _positive(decay_steps, "CosineDecay: decay_steps")
        self.alpha = _positive(alpha, "CosineDecay: alpha", True)
        self.warmup_target = None if warmup_target is None else _positive(warmup_target, "CosineDecay: warmup_target", True)
        self.warmup_steps = _positive(warmup_steps, "CosineDecay: warmup_steps", True)

    def __call__(self, step: int) -> float:
        if self.warmup_target is not None and step < self.warmup_steps:
            frac = step / self.warmup_steps
            return self.initial_learning_rate + frac * (self.warmup_target - self.initial_learning_rate)
        peak = self.initial_learning_rate if self.warmup_target is None else self.warmup_target
        done = min(max(step - self.warmup_steps, 0), self.decay_steps) / self.decay_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * done))
        return peak * ((1.0 - self.alpha) * cosine + self.alpha)
