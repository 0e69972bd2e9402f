"""The safetensors byte format, streamed: no whole-tensor copies, no Python-object deserialization, every
size from a header bounded before allocating.

A file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON padded with
spaces to a multiple of 8, then the tensors' bytes back to back (C order, little
endian). The writer lays tensors out exactly as safetensors' own writer does
(descending dtype, then name), so files are byte-identical to ``safetensors.numpy.save``
and every tensor is naturally aligned; the reader applies safetensors' validation
(contiguous offsets, exact file length, header cap) before it trusts any size.

Data moves with ``os.pwrite`` / ``os.preadv`` at explicit offsets, in chunks of at most
``CHUNK_BYTES``, straight between the caller's memory and the file; each chunk is
hashed as it passes, while it is still in cache.

Checksum choice (Decision 13: verification under a fifth of a warm restore), measured
by ``bench/bench_checksums.py`` (bench/checksum_choice.md) on AMD EPYC x86_64, 256 MiB
warm buffer, one thread, median of 5, in GB/s:

    memcpy (np.copyto) 14.5-14.7    zlib.crc32 4.3   zlib.adler32 3.6
    google-crc32c 14.2-14.3   crc32c 17.4-17.8   xxh64 10.5   xxh3_64 32.5-32.9   xxh3_128 33.3
    readinto from page cache, destination cache-line aligned to the file offset 16.3,
      16 bytes off (where numpy's large arrays start) 6.9
    the same reads with xxh3_64 fused in, 2 MiB chunks: 12.8 and 6.0-6.1

xxh3_64 (PyPI ``xxhash``) is the fastest well-kept choice, 1.9x ahead of crc32c: it takes half the time
of the fastest warm read on its own and, fused, adds 14% to a read into a numpy-placed
array and 28% to an aligned one (the CRCs: 0.9x-4.5x a read). It detects damage; it is
not a signature. Little-endian hosts only (no byte swapping).
"""

from __future__ import annotations

import errno
import json
import math
import operator
import os
import reprlib
import stat
import struct
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, Protocol

import ml_dtypes
import numpy as np
import numpy.typing as npt

from gpuvars._backend_errors import backend_errors
from gpuvars.checkpoint import _atomic, _parallel
from gpuvars.errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    InvalidArgumentError,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no FIFOs to block on, no O_NONBLOCK
    fcntl = None  # type: ignore[assignment]

try:
    import xxhash
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gpuvars checkpoints need the xxhash package for their checksums: pip install xxhash"
    ) from err

MAX_HEADER_SIZE = 100_000_000  # safetensors' MAX_HEADER_SIZE, enforced on write and read
CHUNK_BYTES = 2 << 20  # measured: read+hash is fastest at 1-2 MiB chunks (cache-hot), 8% slower at 8
CHECKSUM_ALGORITHM = "xxh3_64"

_Bytes = bytes | bytearray | memoryview

# In the order of safetensors' Dtype enum: its writer sorts by this rank, descending.
_ST_TO_NP: dict[str, np.dtype[Any]] = {st: np.dtype(dt) for st, dt in [
    ("BOOL", np.bool_), ("U8", np.uint8), ("I8", np.int8), ("F8_E5M2", ml_dtypes.float8_e5m2),
    ("F8_E4M3", ml_dtypes.float8_e4m3fn), ("I16", "<i2"), ("U16", "<u2"), ("F16", "<f2"),
    ("BF16", ml_dtypes.bfloat16), ("I32", "<i4"), ("U32", "<u4"), ("F32", "<f4"),
    ("C64", "<c8"), ("F64", "<f8"), ("I64", "<i8"), ("U64", "<u8")]}
_NP_TO_ST: dict[np.dtype[Any], str] = {dt: st for st, dt in _ST_TO_NP.items()}
_RANK = {st: rank for rank, st in enumerate(_ST_TO_NP)}
_INT_ONLY = frozenset({int})  # exact types: JSON true/false are not dimensions
_STR_ONLY = frozenset({str})
_MAX_DIM = np.iinfo(np.intp).max  # numpy's bound on a dimension and on an array's byte size
_BY_OFFSETS = operator.itemgetter(3, 4)
_BY_NAME = operator.itemgetter(0)
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)  # buffers per preadv/pwritev
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def _numpy_max_ndim() -> int:
    for ndim in (64, 32):  # numpy 2: 64, numpy 1: 32
        try:
            np.empty((0,) * ndim)
            return ndim
        except ValueError:
            pass
    return 32  # pragma: no cover


_MAX_NDIM = _numpy_max_ndim()


def st_dtype(dtype: npt.DTypeLike, *, key: str | None = None) -> str:
    """The safetensors dtype string of a numpy dtype; InvalidArgumentError if it has none."""
    try:
        resolved: object = np.dtype(dtype)
        return _NP_TO_ST[resolved]  # type: ignore[index]
    except TypeError:
        resolved = dtype
    except KeyError:
        pass
    where = f"tensor {key!r}: " if key is not None else ""
    raise InvalidArgumentError(
        f"{where}dtype {resolved!s:.80} has no safetensors equivalent (it has no complex128, "
        f"object, string or big-endian dtypes); supported: {', '.join(map(str, _NP_TO_ST))}")


def np_dtype(st: str) -> np.dtype[Any]:
    """The numpy dtype of a safetensors dtype string; InvalidArgumentError if unknown."""
    try:
        return _ST_TO_NP[st]
    except (KeyError, TypeError) as exc:
        raise InvalidArgumentError(
            f"unknown safetensors dtype {st!r}; known: {', '.join(_ST_TO_NP)}"
        ) from exc


def shape_problem(shape: Sequence[int], dtype: np.dtype[Any]) -> str | None:
    """Why numpy cannot make an array of ``shape`` (non-negative Python ints) and ``dtype``,
    or None when it can. The one statement of that rule, for headers and the index alike:
    at most ``_MAX_NDIM`` dims, and each dim and the byte size, empty dims counted as 1,
    at most ``2**63 - 1``. Cheap for any input: dims are bounded before they are multiplied."""
    if len(shape) > _MAX_NDIM:
        return f"{len(shape)} dims, numpy holds at most {_MAX_NDIM}"
    if shape and max(shape) > _MAX_DIM:
        return f"a dim over numpy's limit of {_MAX_DIM}"
    if math.prod(d or 1 for d in shape) * dtype.itemsize > _MAX_DIM:
        return f"over numpy's limit of {_MAX_DIM} bytes (counting empty dims as 1)"
    return None


class TensorInfo(NamedTuple):
    """One tensor of a file; ``begin``/``end`` are absolute byte offsets in the file.

    A named tuple, not a dataclass: a header of 200,000 tensors makes 200,000 of them, and
    ``_new_info`` builds one in C (a frozen dataclass's ``__init__`` is a Python call
    with one ``object.__setattr__`` per field)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Byte length of the tensor's data."""
        return self.end - self.begin


def _new_info(fields: tuple[str, np.dtype[Any], tuple[int, ...], int, int]) -> TensorInfo:
    return tuple.__new__(TensorInfo, fields)


@dataclass(frozen=True)
class FileRecord:
    """What the index keeps of a committed file: name, size and checksums."""

    file: str
    size: int
    header_checksum: str
    tensors: dict[str, str]


class Hasher(Protocol):
    """An incremental checksum: ``update`` with bytes, then ``hexdigest``."""

    def update(self, buffer: _Bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


def new_hasher() -> Hasher:
    """A fresh incremental hasher of ``CHECKSUM_ALGORITHM``."""
    return xxhash.xxh3_64()


def checksum(buffer: _Bytes) -> str:
    """The ``CHECKSUM_ALGORITHM`` hex digest of one buffer."""
    return xxhash.xxh3_64_hexdigest(buffer)


def layout(
    entries: Sequence[tuple[str, npt.DTypeLike, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, dict[str, TensorInfo]]:
    """The file prefix (length + padded JSON header) and each tensor's place, in file order.

    Raises InvalidArgumentError for an empty, duplicate or reserved name, a negative
    dimension, a dtype safetensors lacks, non-str metadata or an oversized header.
    """
    specs: list[tuple[str, str, tuple[int, ...]]] = []
    append = specs.append
    seen: set[str] = set()
    add = seen.add
    names = _NP_TO_ST
    for name, dtype, shape in entries:
        # the common case in one test (200,000 tensors: the careful path below names what
        # is wrong, and runs only for what this refuses)
        st_name = names.get(dtype) if isinstance(dtype, np.dtype) else None
        if (type(name) is str and name and name != "__metadata__" and name not in seen
                and type(shape) is tuple and st_name is not None
                and _INT_ONLY.issuperset(map(type, shape)) and (not shape or min(shape) >= 0)):
            add(name)
            append((name, st_name, shape))
            continue
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise InvalidArgumentError(
                f"tensor name {name!r} is not allowed: expected a non-empty str other "
                "than '__metadata__'")
        if name in seen:
            raise InvalidArgumentError(f"tensor name {name!r} appears twice")
        add(name)
        try:
            dims = tuple(operator.index(d) for d in shape)
        except TypeError as exc:
            raise InvalidArgumentError(
                f"tensor {name!r}: shape {shape!r} must be a tuple of ints") from exc
        if any(d < 0 for d in dims):
            raise InvalidArgumentError(f"tensor {name!r}: shape {dims} has a negative dimension")
        append((name, st_dtype(dtype, key=name), dims))
    if len({st for _, st, _ in specs}) > 1:  # one dtype: the name alone orders (a cheaper key)
        specs.sort(key=lambda s: (-_RANK[s[1]], s[0]))
    else:
        specs.sort(key=_BY_NAME)

    header: dict[str, Any] = {}
    if metadata is not None:
        bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise InvalidArgumentError(
                f"__metadata__ must map str to str (encode structures as JSON strings); "
                f"received non-str items {bad!r:.200}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    rel: list[tuple[str, np.dtype[Any], tuple[int, ...], int, int]] = []
    itemsizes = {st: _ST_TO_NP[st].itemsize for st in {st for _, st, _ in specs}}
    prod = math.prod
    for name, st, dims in specs:
        end = offset + prod(dims) * itemsizes[st]
        header[name] = {"dtype": st, "shape": list(dims), "data_offsets": [offset, end]}
        rel.append((name, _ST_TO_NP[st], dims, offset, end))
        offset = end
    try:
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(f"a tensor name or metadata string is not valid Unicode: {exc}") from exc
    text += b" " * (-len(text) % 8)  # safetensors' padding: data starts 8-byte aligned
    if len(text) > MAX_HEADER_SIZE:
        raise InvalidArgumentError(
            f"safetensors header would be {len(text)} bytes; the format allows at most {MAX_HEADER_SIZE}")
    base = 8 + len(text)
    infos = {name: _new_info((name, dtype, dims, base + b, base + e)) for name, dtype, dims, b, e in rel}
    return struct.pack("<Q", len(text)) + text, infos


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a folder, so a rename or unlink inside it survives a crash (``_atomic``'s)."""
    _atomic.fsync_dir(path)


def _byte_view(array: np.ndarray, what: str) -> memoryview:
    """A flat uint8 memoryview of a C-contiguous array's memory (no copy; 0-d and empty ok)."""
    if not array.flags.c_contiguous:
        raise InvalidArgumentError(
            f"{what}: array must be C-contiguous (pass np.ascontiguousarray(x))")
    try:
        return array.reshape(-1).view(np.uint8).data
    except (TypeError, ValueError) as exc:  # object arrays hold references, not bytes
        raise InvalidArgumentError(f"{what}: {array.dtype} array has no raw bytes") from exc


def _chunk_view(chunk: object, what: str) -> memoryview:
    if isinstance(chunk, np.ndarray):
        return _byte_view(chunk, what)
    try:
        view = memoryview(chunk)  # type: ignore[arg-type]
        return view if view.format == "B" and view.ndim == 1 and view.c_contiguous else view.cast("B")
    except TypeError as exc:  # not a buffer, or a strided one (cast refuses it)
        raise InvalidArgumentError(
            f"{what}: chunk of type {type(chunk).__name__} is not a C-contiguous buffer "
            "(bytes, memoryview or numpy array)") from exc


_O_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def open_regular(path: str | os.PathLike[str], what: str) -> int:
    """Open ``path`` read-only and return the file descriptor (the caller closes it), refusing
    at once anything but a regular file.

    A FIFO in place of a checkpoint file would block ``open()`` forever and a directory
    fails only later, as IsADirectoryError; here both are damage. The path is ``stat``-ed
    first, so a device or FIFO is never opened; the open itself is non-blocking (a FIFO
    swapped in since the stat cannot hang it), ``fstat``-checked, then made blocking again.

    Args:
        path: the file.
        what: what the file is, for messages ("checkpoint index", "checkpoint state").

    Raises:
        CheckpointNotFoundError: nothing is at ``path`` (a dangling symlink included).
        CheckpointCorruptError: ``path`` is a FIFO, directory, socket or device.
        OSError: any other failure (permissions, I/O), unchanged.
    """
    return _open_regular(os.fspath(path), what)[0]


def _open_regular(path: str, what: str) -> tuple[int, os.stat_result]:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such {what}") from None
    if not stat.S_ISREG(mode):
        raise _not_regular(path, what, mode)
    try:
        fd = os.open(path, _O_READ | _O_NONBLOCK)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such {what}") from None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket swapped in since the stat
            raise CheckpointCorruptError(f"{path}: {what} is not a regular file ({exc.strerror})") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, what, st.st_mode)
        if _O_NONBLOCK and fcntl is not None:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _not_regular(path: str, what: str, mode: int) -> CheckpointCorruptError:
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else f"of file type {stat.S_IFMT(mode):#o}")
    return CheckpointCorruptError(f"{path}: {what} is {kind}, not a regular file")


class SafetensorsWriter:
    """Streams tensors into a temporary sibling of ``path``; ``commit`` renames it in place.

    Tensors may be written in any order (each lands at its own offset), but ``order``
    (file order) writes sequentially, which is the fast one. Until ``commit`` the
    destination is untouched; ``abort`` (or leaving the ``with`` block without a
    commit) removes the temporary file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Sequence[tuple[str, npt.DTypeLike, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        prefix, self.infos = layout(entries, metadata)  # validate everything, then write
        self.order: list[str] = list(self.infos)
        self.size = len(prefix) + sum(i.nbytes for i in self.infos.values())
        self._header_checksum = checksum(prefix)
        self._hashes: dict[str, str] = {}
        folder, base = os.path.split(os.path.abspath(self.path))
        self._folder = folder
        self.temp_path = _atomic.temp_path(self.path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        self._fd: int | None = os.open(self.temp_path, flags, 0o644)
        self._done = False
        try:
            self._pwrite(memoryview(prefix), 0)
        except BaseException:
            self.abort()
            raise

    def _pwrite(self, view: memoryview, offset: int) -> None:
        assert self._fd is not None
        while view.nbytes:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def write(self, name: str, data: object) -> None:
        """Write one tensor: a C-contiguous numpy array, or an iterable of byte chunks.

        Chunks (bytes, memoryview, numpy arrays) must add up to the tensor's byte size
        exactly. Each name is written once; a failed write may be retried.
        """
        if self._fd is None:
            raise InvalidArgumentError(f"{self.path}: writer is closed (committed or aborted)")
        info = self.infos.get(name)
        if info is None:
            raise InvalidArgumentError(
                f"{self.path}: tensor {name!r} was not declared; declared: {_some(self.order)}")
        if name in self._hashes:
            raise InvalidArgumentError(f"{self.path}: tensor {name!r} was already written")
        what = f"{self.path}: tensor {name!r}"
        chunks: Iterable[object]
        if isinstance(data, np.ndarray):
            if data.dtype != info.dtype or data.nbytes != info.nbytes:
                raise InvalidArgumentError(
                    f"{what}: expected {info.dtype} with {info.nbytes} bytes (shape "
                    f"{info.shape}), received {data.dtype} with {data.nbytes} bytes "
                    f"(shape {data.shape})")
            chunks = (data,)
        elif isinstance(data, (bytes, bytearray, memoryview)):
            chunks = (data,)
        elif isinstance(data, Iterable):
            chunks = data
        else:
            raise InvalidArgumentError(
                f"{what}: expected a numpy array or an iterable of byte chunks, "
                f"received {type(data).__name__}")
        hasher, done = new_hasher(), 0
        for chunk in chunks:
            view = _chunk_view(chunk, what)
            if done + view.nbytes > info.nbytes:  # never spill into the next tensor
                raise InvalidArgumentError(
                    f"{what}: expected {info.nbytes} bytes, received at least {done + view.nbytes}")
            i = 0
            while i < view.nbytes:
                # piece edges on CHUNK_BYTES multiples of the *file* offset: writes that start
                # mid-page ran at 2.6x raw pwrite here (bench/README.md), aligned ones at 0.98x
                pos = info.begin + done
                part = view[i:i + CHUNK_BYTES - pos % CHUNK_BYTES]
                self._pwrite(part, pos)
                hasher.update(part)
                done += part.nbytes
                i += part.nbytes
        if done != info.nbytes:
            raise InvalidArgumentError(f"{what}: expected {info.nbytes} bytes, received {done}")
        self._hashes[name] = hasher.hexdigest()

    def write_run(self, names: Sequence[str], arrays: Sequence[np.ndarray]) -> None:
        """Write a run of tensors that lie back to back in the file (``names`` in file
        order, e.g. a slice of :attr:`order`), each from a C-contiguous numpy array, with
        ``pwritev`` calls of up to ``_IOV_MAX`` buffers; each tensor keeps its own checksum.

        The many-small-tensors path: the same checks and messages as :meth:`write`, no
        generator or chunking per tensor. A tensor over ``CHUNK_BYTES`` belongs in
        :meth:`write` (its pieces are aligned to the file's chunks)."""
        if self._fd is None:
            raise InvalidArgumentError(f"{self.path}: writer is closed (committed or aborted)")
        if len(names) != len(arrays):
            raise InvalidArgumentError(f"{self.path}: {len(names)} names for {len(arrays)} arrays")
        infos, hashes = self.infos, self._hashes
        expected = -1
        for name, data in zip(names, arrays):
            info = infos.get(name)
            if info is None:
                raise InvalidArgumentError(
                    f"{self.path}: tensor {name!r} was not declared; declared: {_some(self.order)}")
            if name in hashes:
                raise InvalidArgumentError(f"{self.path}: tensor {name!r} was already written")
            if expected >= 0 and info.begin != expected:
                raise InvalidArgumentError(
                    f"{self.path}: tensor {name!r} does not follow the previous tensor of the run in the file")
            expected = info.end
            if (type(data) is not np.ndarray or data.dtype != info.dtype or data.nbytes != info.nbytes
                    or not data.flags.c_contiguous):
                what = f"{self.path}: tensor {name!r}"
                if not isinstance(data, np.ndarray):
                    raise InvalidArgumentError(f"{what}: expected a numpy array, received {type(data).__name__}")
                if data.dtype != info.dtype or data.nbytes != info.nbytes:
                    raise InvalidArgumentError(
                        f"{what}: expected {info.dtype} with {info.nbytes} bytes (shape "
                        f"{info.shape}), received {data.dtype} with {data.nbytes} bytes "
                        f"(shape {data.shape})")
                _byte_view(data, what)  # raises for a non-contiguous array
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"{self.path}: a tensor appears twice in the run")
        assert self._fd is not None
        fd, digest = self._fd, xxhash.xxh3_64_hexdigest
        offset = infos[names[0]].begin if names else 0
        for i in range(0, len(arrays), _IOV_MAX):
            group = arrays[i:i + _IOV_MAX]
            total = sum(a.nbytes for a in group)
            n = os.pwritev(fd, group, offset)  # type: ignore[arg-type]  # numpy arrays are buffers
            if n != total:  # a short write: the rest, buffer by buffer
                done = 0
                for a in group:
                    if done + a.nbytes > n:
                        view = _byte_view(a, self.path)[max(0, n - done):]
                        self._pwrite(view, offset + done + (a.nbytes - view.nbytes))
                    done += a.nbytes
            offset += total
        for name, data in zip(names, arrays):
            hashes[name] = digest(data)  # type: ignore[arg-type]

    def commit(self) -> FileRecord:
        """fsync, rename onto ``path`` and fsync the folder; every tensor must be written."""
        if self._fd is None:
            raise InvalidArgumentError(f"{self.path}: writer is closed (committed or aborted)")
        missing = [n for n in self.order if n not in self._hashes]
        if missing:
            self.abort()
            raise InvalidArgumentError(
                f"{self.path}: {len(missing)} tensor(s) never written: {_some(missing)}")
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self.temp_path, self.path)
            self._done = True
            fsync_dir(self._folder)
        except BaseException:
            self.abort()
            raise
        return FileRecord(os.path.basename(self.path), self.size, self._header_checksum,
                          {n: self._hashes[n] for n in self.order})

    def abort(self) -> None:
        """Close and remove the temporary file (idempotent; a no-op after commit)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self._done:
            try:
                os.unlink(self.temp_path)
            except FileNotFoundError:
                pass
            self._done = True

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abort()


class SafetensorsReader:
    """Opens a safetensors file, validates its header, and reads tensors into your memory.

    Reads use ``os.preadv`` at explicit offsets, so one reader may serve several
    threads at once.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_header_size: int = MAX_HEADER_SIZE) -> None:
        self.path = os.fspath(path)
        fd, st = _open_regular(self.path, "safetensors file")
        self._fd: int | None = fd
        try:
            self.size = st.st_size
            self._parse(max_header_size)
        except BaseException:
            self.close()
            raise

    def _corrupt(self, msg: str, key: str | None = None) -> CheckpointCorruptError:
        where = f"{self.path}: tensor {_short(key)}" if key is not None else self.path
        return CheckpointCorruptError(f"{where}: {msg}")

    def _pread_exact(self, view: memoryview, offset: int, key: str | None) -> None:
        assert self._fd is not None
        while view.nbytes:
            n = os.preadv(self._fd, [view], offset)
            if n == 0:
                raise self._corrupt(f"truncated: no bytes at offset {offset} (file shrank?)", key)
            view, offset = view[n:], offset + n

    def _parse(self, max_header_size: int) -> None:
        if self.size < 8:
            raise self._corrupt(f"truncated: {self.size} bytes, a safetensors file starts "
                                "with an 8-byte header length")
        head = bytearray(8)
        self._pread_exact(memoryview(head), 0, None)
        (n,) = struct.unpack("<Q", head)
        if n > max_header_size:  # both bounds before the header is read or allocated
            raise self._corrupt(f"header length {n} exceeds the limit of {max_header_size} bytes")
        if 8 + n > self.size:
            raise self._corrupt(f"header length {n} runs past the end of the file ({self.size} bytes)")
        text = bytearray(n)
        self._pread_exact(memoryview(text), 8, None)
        hasher = new_hasher()
        hasher.update(head)
        hasher.update(text)
        self.header_checksum = hasher.hexdigest()
        try:
            header = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys,
                                parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError too
            raise self._corrupt(f"header is not valid UTF-8 JSON: {exc}") from exc
        if not isinstance(header, dict):
            raise self._corrupt(f"header must be a JSON object, found {type(header).__name__}")
        meta = header.pop("__metadata__", None)
        if meta is not None and not (type(meta) is dict and _STR_ONLY.issuperset(map(type, meta.values()))):
            raise self._corrupt(f"__metadata__ must map str to str (a JSON object of strings, or "
                                f"null), found {_short(meta)}")
        self.metadata: dict[str, str] = dict(meta or {})

        # The fast path, inlined (20,000 entries: a call per entry is a fifth of the parse):
        # exact JSON types, every dim and offset a non-negative int, shape_problem's bounds
        # on dims (an empty tensor's size is checked by it in full); any failure goes to
        # _bad_entry, which says which field of which tensor is wrong. Fields
        # beyond these three are ignored, as safetensors' own (serde) reader ignores them.
        entries: list[tuple[str, np.dtype[Any], tuple[int, ...], int, int]] = []
        append = entries.append
        for key, value in header.items():
            if type(value) is not dict:
                raise self._bad_entry(key, value)
            st = value.get("dtype")
            dtype = _ST_TO_NP.get(st) if type(st) is str else None
            shape = value.get("shape")
            offsets = value.get("data_offsets")
            if (dtype is None or type(shape) is not list or type(offsets) is not list or len(offsets) != 2
                    or len(shape) > _MAX_NDIM or not _INT_ONLY.issuperset(map(type, shape))
                    or (shape and not 0 <= min(shape) <= max(shape) <= _MAX_DIM)):
                raise self._bad_entry(key, value)
            begin, end = offsets
            if type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
                raise self._bad_entry(key, value)
            nbytes = math.prod(shape) * dtype.itemsize  # Python ints of at most 64 dims < 2**63: exact, cheap
            if end - begin != nbytes:
                raise self._corrupt(f"data_offsets [{begin}, {end}] hold {end - begin} bytes, "
                                    f"shape {shape} of {st} needs {nbytes}", key)
            if not nbytes and len(shape) > 1 and (problem := shape_problem(shape, dtype)) is not None:
                raise self._corrupt(f"shape {_short(shape)} of {st} is beyond numpy: {problem}", key)
            append((key, dtype, tuple(shape), begin, end))
        entries.sort(key=_BY_OFFSETS)
        base, expected = 8 + n, 0
        for key, _, _, begin, end in entries:
            if begin != expected:
                kind = "overlaps the previous tensor" if begin < expected else "leaves a gap"
                raise self._corrupt(f"data_offsets [{begin}, {end}] {kind}: expected it to "
                                    f"begin at {expected}", key)
            expected = end
        if base + expected != self.size:
            kind = "truncated" if base + expected > self.size else "extended"
            raise self._corrupt(f"{kind}: file is {self.size} bytes, its header describes "
                                f"{base + expected}")
        new = _new_info
        self.tensors: dict[str, TensorInfo] = {
            key: new((key, dtype, shape, base + begin, base + end)) for key, dtype, shape, begin, end in entries}

    def _bad_entry(self, key: str, value: object) -> CheckpointCorruptError:
        """The error for an entry the fast path refused: which field is wrong, and how."""
        if type(value) is not dict:
            return self._corrupt(f"entry must be a JSON object with dtype, shape and data_offsets, "
                                 f"found {_short(value)}", key)
        for field in ("dtype", "shape", "data_offsets"):
            if field not in value:
                return self._corrupt(f"entry has no {field!r} field (it has {_short(sorted(value))})", key)
        st, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
        if type(st) is not str:
            return self._corrupt(f"dtype must be a JSON string, found {_short(st)}", key)
        if st not in _ST_TO_NP:
            return self._corrupt(f"unknown dtype {_short(st)}; gpuvars reads {', '.join(_ST_TO_NP)}", key)
        if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
            return self._corrupt(f"shape must be a JSON list of non-negative integers, found {_short(shape)}", key)
        if (problem := shape_problem(shape, _ST_TO_NP[st])) is not None:
            return self._corrupt(f"shape {_short(shape)} of {st} is beyond numpy: {problem}", key)
        return self._corrupt(f"data_offsets must be a JSON list [begin, end] of integers with "
                             f"0 <= begin <= end, found {_short(offsets)}", key)

    def _info(self, name: str) -> TensorInfo:
        if self._fd is None:
            raise InvalidArgumentError(f"{self.path}: reader is closed")
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointMismatchError(
                f"{self.path}: no tensor {name!r}; the file holds {len(self.tensors)}: "
                f"{_some(list(self.tensors), 10)}")
        return info

    def _check(self, info: TensorInfo, hasher: Hasher | None, expected: str | None) -> None:
        if hasher is not None and (actual := hasher.hexdigest()) != expected:
            raise self._corrupt(f"{CHECKSUM_ALGORITHM} checksum mismatch: expected {expected}, "
                                f"computed {actual}", info.name)

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.tensors)

    def read_into(self, name: str, out: np.ndarray, *, expected_checksum: str | None = None) -> None:
        """Fill ``out`` (C-contiguous, writable, same byte size) with the tensor's bytes.

        With ``expected_checksum`` each chunk is hashed as it lands and a mismatch
        raises CheckpointCorruptError after the read (``out`` then holds the bad bytes).
        """
        info = self._info(name)
        what = f"{self.path}: tensor {name!r}"
        if not isinstance(out, np.ndarray) or not out.flags.writeable or out.nbytes != info.nbytes:
            raise InvalidArgumentError(
                f"{what}: expected a writable numpy array of {info.nbytes} bytes "
                f"({info.dtype}{list(info.shape)}), received {_describe(out)}")
        dest = _byte_view(out, what)
        hasher = new_hasher() if expected_checksum is not None else None
        for i in range(0, info.nbytes, CHUNK_BYTES):
            part = dest[i:i + CHUNK_BYTES]
            self._pread_exact(part, info.begin + i, name)
            if hasher is not None:
                hasher.update(part)
        self._check(info, hasher, expected_checksum)

    def read_run(self, names: Sequence[str], outs: Sequence[np.ndarray],
                 expected_checksums: Sequence[str | None] | None = None) -> None:
        """:meth:`read_into` for a run of tensors that lie back to back in the file (``names``
        in file order), with ``preadv`` calls of up to ``_IOV_MAX`` buffers; each checksum
        is verified after the run is read (the first mismatch raises, naming its tensor).

        The many-small-tensors path: the same checks and messages as :meth:`read_into`."""
        infos = [self._info(n) for n in names]
        expected = -1
        for info, out in zip(infos, outs):
            if expected >= 0 and info.begin != expected:
                raise InvalidArgumentError(
                    f"{self.path}: tensor {info.name!r} does not follow the previous tensor of the run in the file")
            expected = info.end
            if (type(out) is not np.ndarray or not out.flags.writeable or out.nbytes != info.nbytes
                    or not out.flags.c_contiguous):
                what = f"{self.path}: tensor {info.name!r}"
                if not isinstance(out, np.ndarray) or not out.flags.writeable or out.nbytes != info.nbytes:
                    raise InvalidArgumentError(
                        f"{what}: expected a writable numpy array of {info.nbytes} bytes "
                        f"({info.dtype}{list(info.shape)}), received {_describe(out)}")
                _byte_view(out, what)  # raises for a non-contiguous array
        if len(infos) != len(outs):
            raise InvalidArgumentError(f"{self.path}: {len(infos)} names for {len(outs)} buffers")
        assert self._fd is not None
        fd = self._fd
        offset = infos[0].begin if infos else 0
        for i in range(0, len(outs), _IOV_MAX):
            group = outs[i:i + _IOV_MAX]
            total = sum(a.nbytes for a in group)
            n = os.preadv(fd, group, offset)  # type: ignore[arg-type]  # numpy arrays are buffers
            if n != total:  # a short read: the rest, buffer by buffer (end of file: truncated)
                done = 0
                for k, a in enumerate(group):
                    if done + a.nbytes > n:
                        view = _byte_view(a, self.path)[max(0, n - done):]
                        self._pread_exact(view, offset + done + (a.nbytes - view.nbytes), infos[i + k].name)
                    done += a.nbytes
            offset += total
        if expected_checksums is not None:
            digest = xxhash.xxh3_64_hexdigest
            for info, out, want in zip(infos, outs, expected_checksums):
                if want is not None and (actual := digest(out)) != want:  # type: ignore[arg-type]
                    raise self._corrupt(f"{CHECKSUM_ALGORITHM} checksum mismatch: expected {want}, "
                                        f"computed {actual}", info.name)

    def read_chunks(self, name: str, buffer: np.ndarray | memoryview, *,
                    expected_checksum: str | None = None,
                    spare: np.ndarray | memoryview | None = None) -> Iterator[memoryview]:
        """Fill the reusable ``buffer`` again and again, yielding the filled part each time.

        Copy each yielded view away (e.g. to the device) before asking for the next;
        the checksum is verified after the last chunk, before the iterator ends. With
        ``spare`` (a second buffer of the same size) chunks alternate between ``buffer``
        (chunks 0, 2, ...) and ``spare`` (1, 3, ...): a yielded view then stays intact
        until the one after the next is asked for, so it can be copied away while the
        next chunk is read (double buffering).
        """
        info = self._info(name)
        what = f"{self.path}: tensor {name!r}"
        views = [_chunk_view(b, what) for b in ((buffer,) if spare is None else (buffer, spare))]
        for staging in views:
            if staging.readonly or (not staging.nbytes and info.nbytes):
                raise InvalidArgumentError(f"{what}: staging buffer must be writable and non-empty, "
                                           f"received {staging.nbytes} bytes, read-only={staging.readonly}")
        if len(views) == 2 and views[0].nbytes != views[1].nbytes:
            raise InvalidArgumentError(f"{what}: spare buffer must match the staging buffer's size, "
                                       f"received {views[1].nbytes} and {views[0].nbytes} bytes")
        return self._chunks(info, views, expected_checksum)

    def _chunks(self, info: TensorInfo, views: Sequence[memoryview], expected: str | None) -> Iterator[memoryview]:
        hasher = new_hasher() if expected is not None else None
        size = views[0].nbytes
        for k, i in enumerate(range(0, info.nbytes, max(1, size))):  # an empty tensor may come with an empty buffer
            part = views[k % len(views)][:min(size, info.nbytes - i)]
            self._pread_exact(part, info.begin + i, info.name)
            if hasher is not None:
                hasher.update(part)
            yield part
        self._check(info, hasher, expected)

    def get_tensor(self, name: str, *, expected_checksum: str | None = None) -> np.ndarray:
        """A new array holding the tensor (its size is bounded by the validated file size).

        Raises ResourceExhaustedError, naming the file and tensor, when host memory cannot hold it.
        """
        info = self._info(name)
        with backend_errors(None, f"reading tensor {_short(name)} ({info.nbytes} bytes) of {self.path}"):
            out = np.empty(info.shape, info.dtype)  # MemoryError -> ResourceExhaustedError
        self.read_into(name, out, expected_checksum=expected_checksum)
        return out

    def verify(self, expected: Mapping[str, str]) -> list[str]:
        """Names (in file order) whose data fails its expected checksum.

        Streams through one buffer of at most ``CHUNK_BYTES``; a name the file lacks
        raises CheckpointMismatchError before anything is read.
        """
        infos = sorted((self._info(n) for n in expected), key=lambda i: i.begin)
        largest = max((i.nbytes for i in infos), default=0)
        local = threading.local()

        def ok(info: TensorInfo) -> bool:
            # one staging buffer per thread: runs of tensors hash in parallel (pread and xxh3
            # release the GIL; 2 threads: 49 ms vs 74 ms per GiB here)
            staging = getattr(local, "staging", None)
            if staging is None:
                staging = local.staging = memoryview(bytearray(max(1, min(CHUNK_BYTES, largest))))
            try:
                for _ in self._chunks(info, (staging,), expected[info.name]):
                    pass
            except CheckpointCorruptError:
                return False
            return True

        results = _parallel.run(infos, [i.nbytes for i in infos], ok)
        return [info.name for info, good in zip(infos, results) if not good]

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _short(x: object) -> str:
    """A bounded repr for messages (a header may hold 100 MB of anything)."""
    return _REPR.repr(x)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        dup = [k for k, count in Counter(k for k, _ in pairs).items() if count > 1]
        raise ValueError(f"duplicate keys {dup[:10]}")
    return out


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _some(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        flags = "" if x.flags.writeable else " read-only"
        return f"{x.dtype}{list(x.shape)} of {x.nbytes} bytes{flags}"
    return type(x).__name__
