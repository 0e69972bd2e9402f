"""Progress bars for large saves and restores: tqdm on a terminal, nothing otherwise.

Auto mode (``progress=None``) shows a bar only when stderr is a terminal and the
checkpoint holds at least ``THRESHOLD`` bytes; ``True`` always shows one (and needs
tqdm); ``False`` never does.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from gpuvars.errors import InvalidArgumentError

THRESHOLD = 256 << 20


class _Silent:
    silent = True

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int, desc: str, enabled: bool | None) -> Any:
    """A bar with ``update(nbytes)`` and ``close()`` (a silent one when not wanted)."""
    if enabled is not None and not isinstance(enabled, bool):
        raise InvalidArgumentError(f"progress must be True, False or None, got {enabled!r}")
    if enabled is False or (enabled is None and (total < THRESHOLD or not sys.stderr.isatty())):
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        if enabled:
            raise InvalidArgumentError("progress=True needs tqdm: pip install 'gpuvars[progress]'") from None
        return _Silent()
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)


class Shared:
    """``meter`` updated from several threads (each update under a lock); ``close`` is left
    to the owner, so per-file code that closes its meter closes nothing here."""

    def __init__(self, meter: Any) -> None:
        self._meter, self._lock = meter, threading.Lock()
        self.silent = getattr(meter, "silent", False)

    def update(self, n: int) -> None:
        if not self.silent:
            with self._lock:
                self._meter.update(n)

    def close(self) -> None:
        pass
