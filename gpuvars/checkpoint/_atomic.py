"""Crash-safe files, in one place: one temporary naming, fsync, rename, folder fsync.

A file of a checkpoint is either absent or whole: it is written to a hidden temporary
sibling, fsynced, renamed over its name, and the folder is fsynced so the rename
survives a crash (Orbax's ``atomicity.py`` rule). Every writer of the package (the
safetensors writer included) takes its temporary name from :func:`temp_path`.

A temporary name says who writes it::

    .<name>.tmp-<pid>-<start>-<host>-<machine>-<random>

``start`` is the writer's start time (clock ticks since boot, ``/proc/<pid>/stat``
field 22; 0 where unknown), ``host`` its host name cut to a readable tag, ``machine`` a
hash of the host name, boot id and PID namespace: the scope in which a pid means one
process. :func:`remove_stale_temps` deletes a temporary file only when its writer is
provably gone, because several hosts may share a checkpoint folder: written in this
``machine`` scope by a pid that no longer runs (or is a zombie, or now belongs to a
process started at another time), or not modified for ``MAX_TEMP_AGE_S``. A writer on
another host keeps its files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import secrets
import socket
import stat
import time

from gpuvars.errors import CheckpointCorruptError, CheckpointNotFoundError

__all__ = [
    "MAX_TEMP_AGE_S",
    "Writer",
    "describe_mode",
    "fsync_dir",
    "open_regular",
    "parse_temp",
    "read_regular",
    "remove_stale_temps",
    "temp_path",
    "this_writer",
    "unlink_quiet",
    "write_bytes",
]

#: a temporary file untouched this long is stale whoever wrote it (a live writer's
#: file changes with every write; one paused for a day is not coming back)
MAX_TEMP_AGE_S = 24 * 3600.0
_NAME_MAX = 255  # bytes in one file name (Linux, macOS)
_TEMP = re.compile(
    r"^\.(?P<base>.+)\.tmp-(?P<pid>\d{1,10})-(?P<start>\d{1,20})-(?P<host>[A-Za-z0-9_]{0,16})"
    r"-(?P<machine>[0-9a-f]{8})-[0-9a-f]{8}$"
)
#: the names of gpuvars before temporary names carried their host (judged by age only)
_LEGACY_TEMP = re.compile(r"^\.(?P<base>.+)\.tmp-(?P<pid>\d{1,10})-[0-9a-f]{4,32}$")


@dataclasses.dataclass(frozen=True)
class Writer:
    """The process a temporary file names: ``machine`` is empty for a legacy name."""

    pid: int
    start: int
    host: str
    machine: str


def _proc_start(pid: int) -> int | None:
    """``pid``'s start time (field 22 of /proc/<pid>/stat); None when there is no such
    process or it is a zombie; 0 when this system has no /proc to ask."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces and ')'
    except FileNotFoundError:
        return None if os.path.isdir("/proc/self") else 0
    except (OSError, IndexError):
        return 0
    if not fields or fields[0] in (b"Z", b"X"):  # dead, not yet reaped
        return None
    try:
        return int(fields[19])  # field 3 (state) is fields[0]
    except (IndexError, ValueError):
        return 0


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


@functools.lru_cache(maxsize=4)
def _writer_for(pid: int) -> Writer:
    host = socket.gethostname()
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    scope = "\0".join([host, _read_text("/proc/sys/kernel/random/boot_id"), pidns])
    machine = hashlib.blake2b(scope.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
    tag = re.sub(r"[^A-Za-z0-9]", "_", host.split(".", 1)[0])[:16]
    return Writer(pid, _proc_start(pid) or 0, tag, machine)


def this_writer() -> Writer:
    """The identity this process writes into temporary names (recomputed after a fork)."""
    return _writer_for(os.getpid())


def temp_path(path: str, writer: Writer | None = None) -> str:
    """A new hidden temporary sibling of ``path`` naming ``writer`` (default: this process).

    The name's ``<name>`` part is cut when the whole would exceed 255 bytes: it is for
    people; the writer keeps the path it was given.
    """
    w = this_writer() if writer is None else writer
    folder, base = os.path.split(os.fspath(path))
    suffix = f".tmp-{w.pid}-{w.start}-{w.host}-{w.machine}-{secrets.token_hex(4)}"
    room = _NAME_MAX - 1 - len(suffix)
    raw = os.fsencode(base)
    if len(raw) > room:
        base = raw[:room].decode("utf-8", "ignore") or "f"
    return os.path.join(folder, f".{base}{suffix}")


def parse_temp(name: str) -> Writer | None:
    """The writer of a temporary file name made by :func:`temp_path` (or an older gpuvars),
    else None (not ours: never touched)."""
    m = _TEMP.match(name)
    if m:
        return Writer(int(m["pid"]), int(m["start"]), m["host"], m["machine"])
    m = _LEGACY_TEMP.match(name)
    if m:
        return Writer(int(m["pid"]), 0, "", "")
    return None


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder, so a rename or unlink inside it survives a crash."""
    fd = os.open(os.fspath(folder) or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quiet(path: str) -> None:
    """Remove ``path`` if it exists."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_bytes(path: str, data: bytes, *, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    Raises the OSError of the failing step (the caller names the checkpoint); the
    temporary file is gone afterwards.
    """
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quiet(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        unlink_quiet(tmp)
        raise
    if sync_dir:
        fsync_dir(os.path.dirname(path))


def _writer_gone(w: Writer, here: Writer) -> bool:
    """Whether the writer ``w`` of a temporary file is provably gone (``here``: this process)."""
    if not w.machine or w.machine != here.machine:
        return False  # another host, PID namespace or boot (or a legacy name): its pid means nothing here
    if w.pid <= 0:
        return True
    try:
        os.kill(w.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it runs, under another user
        pass
    except OverflowError:
        return True
    start = _proc_start(w.pid)
    if start is None:
        return True  # gone, or a zombie
    return bool(start and w.start and start != w.start)  # the pid now names a later process


def remove_stale_temps(folder: str, *, max_age_s: float = MAX_TEMP_AGE_S) -> list[str]:
    """Delete the temporary files in ``folder`` whose writers are provably gone (see the
    module docstring); returns their names. Files that are not gpuvars temporaries, and
    files this function cannot judge or delete, are left alone."""
    try:
        names = os.listdir(folder or ".")
    except (FileNotFoundError, NotADirectoryError):
        return []
    here, now = this_writer(), time.time()
    removed: list[str] = []
    for name in names:
        w = parse_temp(name) if name.startswith(".") else None
        if w is None:
            continue
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if now - st.st_mtime < max_age_s and not _writer_gone(w, here):
            continue
        try:
            os.unlink(path)
        except OSError:
            continue  # gone already, or not ours to delete
        removed.append(name)
    return removed


# --- reading: never block on a FIFO, never read a directory ---------------------------------------


def open_regular(path: str, what: str) -> int:
    """A read-only descriptor of the regular file ``path``, opened without blocking (a FIFO
    would otherwise wait forever for a writer).

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        CheckpointCorruptError: a directory, FIFO, socket or device is there, or the file
            cannot be opened (permissions, a name too long, a loop of links).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{what} file {path!r} does not exist") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise CheckpointCorruptError(f"{what} file {path!r} cannot be opened: {exc}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise CheckpointCorruptError(f"{what} file {path!r} cannot be read: {exc}") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointCorruptError(f"{what} file {path!r} is {describe_mode(mode)}, not a regular file")
    return fd


def read_regular(path: str, what: str, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`), refusing one
    larger than ``limit`` bytes before reading it."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CheckpointCorruptError(f"{what} file {path!r} is {size} bytes, more than the {limit} allowed")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise CheckpointCorruptError(f"{what} file {path!r} cannot be read: {exc}") from None
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) > limit:
        raise CheckpointCorruptError(f"{what} file {path!r} grew past the {limit} bytes allowed while being read")
    return raw


def describe_mode(mode: int) -> str:
    """What a file of ``mode`` is, for messages ("a directory", "a FIFO", ...)."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"
