"""The folder's state file (TF's ``checkpoint``, as JSON): written and read here, only.

``{"format": "gpuvars-checkpoint-state", "version": 1, "latest": name | null,
"all": [{"prefix": name, "timestamp": seconds}, ...], "last_preserved_timestamp": seconds}``,
oldest first, names relative to the folder. It changes only after a commit and is
replaced atomically. Reading validates every field: whatever the file holds, the answer
is a :class:`State` or a CheckpointError naming the file.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from gpuvars.checkpoint import _atomic, _format
from gpuvars.errors import CheckpointCorruptError

STATE_FILE = "checkpoint"
STATE_FORMAT = "gpuvars-checkpoint-state"
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class State:
    """A validated state file: names are plain file names in its folder."""

    latest: str | None
    entries: tuple[tuple[str, float], ...]  #: (prefix name, timestamp), oldest first
    last_preserved: float | None  #: None when the file does not say


def path_of(folder: str) -> str:
    return os.path.join(folder, STATE_FILE)


def read_state(folder: str) -> State | None:
    """The folder's state, or None when it has no state file.

    Raises:
        CheckpointCorruptError: the state file is not a regular file, not JSON, or a
            field is missing or of the wrong type (the message names the file and field).
    """
    path = path_of(folder)
    if not os.path.lexists(path):
        return None
    obj = _format.read_json(path, "checkpoint state")
    where = f"checkpoint state file {path!r}"

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise CheckpointCorruptError(f"{where} has an unexpected structure: {msg}")

    need(isinstance(obj, dict), f"expected a JSON object, found {type(obj).__name__}")
    fmt, version = obj.get("format", STATE_FORMAT), obj.get("version", STATE_VERSION)
    need(fmt == STATE_FORMAT, f"format is {fmt!r}, expected {STATE_FORMAT!r}")
    need(type(version) is int and version >= 1, f"version {version!r} is not a positive integer")
    if version > STATE_VERSION:
        raise CheckpointCorruptError(f"{where}: version {version} is newer than this gpuvars reads "
                                     f"({STATE_VERSION}); upgrade gpuvars")
    need("latest" in obj, "no 'latest'")
    latest = obj["latest"]
    need(latest is None or isinstance(latest, str), f"'latest' is {latest!r}, not a name or null")
    if latest is not None:
        _format.check_plain_name(latest, where)
    entries_raw = obj.get("all")
    need(isinstance(entries_raw, list), f"'all' is {entries_raw!r:.80}, not a list")
    entries: list[tuple[str, float]] = []
    for entry in entries_raw:
        if not (isinstance(entry, dict) and _format.is_number(entry.get("timestamp"))):
            raise CheckpointCorruptError(f"{where} has a malformed entry {entry!r:.200}: "
                                         "expected {\"prefix\": name, \"timestamp\": seconds}")
        entries.append((_format.check_plain_name(entry.get("prefix"), where), float(entry["timestamp"])))
    last_preserved = None
    if "last_preserved_timestamp" in obj:
        preserved = obj["last_preserved_timestamp"]
        need(_format.is_number(preserved), f"'last_preserved_timestamp' is {preserved!r:.80}, not a number")
        last_preserved = float(preserved)
    return State(latest, tuple(entries), last_preserved)


def write_state(folder: str, latest: str | None, entries: Sequence[tuple[str, float]], preserved: float) -> None:
    """Replace the folder's state file atomically (plain names only). Raises the OSError of
    the failing step (the caller names the checkpoint)."""
    state = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "latest": latest,
        "all": [{"prefix": p, "timestamp": t} for p, t in entries],
        "last_preserved_timestamp": preserved,
    }
    _atomic.write_bytes(path_of(folder), _format.dump_json(state))
