"""The one rule for shapes and dtypes of values written into variables.

A declared shape is a tuple whose ``None`` dims are free, or None for any shape at all
(``validate_shape=False``). Values are cast under numpy's ``same_kind`` rule.
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import numpy as np

from gpuvars.errors import InvalidArgumentError

__all__ = ["Declared", "check_cast", "check_int_range", "check_value_dtype", "fits", "fmt", "parse_shape"]

Declared = tuple[int | None, ...] | None


def parse_shape(shape: Any, what: str) -> tuple[int | None, ...]:
    """``shape`` (a sequence of ints or None) as a tuple; InvalidArgumentError naming ``what``."""
    if isinstance(shape, (str, bytes)):
        raise InvalidArgumentError(f"{what}: shape must be a sequence of ints or None, got {shape!r}")
    try:
        out = tuple(None if d is None else operator.index(d) for d in shape)
    except TypeError:
        raise InvalidArgumentError(f"{what}: shape must be a sequence of ints or None, got {shape!r}") from None
    if any(d is not None and d < 0 for d in out):
        raise InvalidArgumentError(f"{what}: shape dims must be >= 0 or None, got {shape!r}")
    return out


def fits(shape: Sequence[int], declared: Declared) -> bool:
    """Whether a concrete ``shape`` satisfies the ``declared`` constraint."""
    if declared is None:
        return True
    return len(shape) == len(declared) and all(d is None or d == s for s, d in zip(shape, declared))


def fmt(declared: Declared) -> str:
    """The constraint for messages: ``<any>`` for no constraint."""
    return "<any>" if declared is None else str(tuple(declared))


def check_cast(src: np.dtype[Any], dst: np.dtype[Any], what: str) -> None:
    """Refuse a cast numpy's ``same_kind`` rule does not allow (float -> int, complex -> float)."""
    if src != dst and not np.can_cast(src, dst, casting="same_kind"):
        raise InvalidArgumentError(
            f"{what}: cannot cast a value of dtype {src} to the variable's dtype {dst} "
            "(only same-kind casts, e.g. float64 -> float32, happen implicitly)"
        )


def check_value_dtype(array: Any, dst: np.dtype[Any], what: str, *, python: bool) -> None:
    """The cast rule for a value written into a variable of dtype ``dst``.

    An array's dtype must cast under ``same_kind``. Python ints (``python``: the array was
    made from a Python scalar or list) have no width of their own: they go into any integer
    variable whose dtype holds them, as in numpy and TF, and are refused, never wrapped,
    when it does not.
    """
    src = np.dtype(array.dtype)
    if python and src.kind in "iu" and dst.kind in "iu":
        check_int_range(array, dst, what)
        return
    check_cast(src, dst, what)
    if python:
        check_int_range(array, dst, what)


def check_int_range(host: np.ndarray[Any, Any], dst: np.dtype[Any], what: str) -> None:
    """Refuse Python ints that ``dst`` cannot hold (numpy and TF refuse them; a cast would wrap).

    ``host`` is the array made from a Python scalar or list (int32 or int64 by default).
    """
    if dst.kind not in "iu" or host.dtype.kind not in "iu" or host.size == 0:
        return
    info = np.iinfo(dst)
    lo, hi = host.min(), host.max()
    if lo < info.min or hi > info.max:
        bad = lo if lo < info.min else hi
        raise InvalidArgumentError(
            f"{what}: Python integer {int(bad)} is out of range for the variable's dtype {dst} "
            f"[{info.min}, {info.max}]"
        )
