"""Format v1, in one module: the names of a prefix's files and the schema of its JSON,
written and read here (the index manifest, which commits a checkpoint, and the device map).

Writers build their JSON with :func:`variable_record`, :func:`device_record`,
:func:`build_index` and :func:`build_devices`; readers get it back validated by
:func:`read_index` and :func:`read_devices`. The index is parsed and validated in full,
and every file it names is checked to be a regular file of its recorded size, before any
tensor byte is read: structural damage never reaches a variable. Every problem with a
file is a CheckpointError naming the file and the key.

A plain ``.safetensors`` file (written by ``safetensors.numpy.save_file``, torch, ...)
opens as a checkpoint too, through :func:`open_checkpoint`: a synthetic index made from
its validated header, with no checksums (the file carries none) and no devices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

from gpuvars.checkpoint import _atomic
from gpuvars.checkpoint import _stformat as st
from gpuvars.checkpoint.policy import VariablePolicy
from gpuvars.devices import DeviceSpec
from gpuvars.errors import CheckpointCorruptError, CheckpointNotFoundError, InvalidArgumentError
from gpuvars.variable import VariableAggregation, VariableSynchronization

FORMAT = "gpuvars-checkpoint"
DEVICES_FORMAT = "gpuvars-devices"
VERSION = 1
KINDS = ("plain", "mirrored", "sync_on_read", "sharded")
PLAIN_SUFFIX = ".safetensors"
MAX_JSON_BYTES = 64 << 20  # an index or sidecar larger than this is damage, not data


# --- names ------------------------------------------------------------------------------------------


def index_file(base: str) -> str:
    return f"{base}.index.json"


def data_file(base: str) -> str:
    return f"{base}.safetensors"


def devices_file(base: str) -> str:
    return f"{base}.devices.json"


def replica_file(base: str, k: int, n: int) -> str:
    return f"{base}.replica-{k}-of-{n}.safetensors"


def split_prefix(prefix: Any, what: str) -> tuple[str, str]:
    """(folder, base name) of a checkpoint prefix, validated."""
    if isinstance(prefix, os.PathLike):
        prefix = os.fspath(prefix)
    if not isinstance(prefix, str) or not prefix:
        raise InvalidArgumentError(f"{what}: a checkpoint prefix must be a non-empty path, got {prefix!r}")
    folder, base = os.path.split(prefix)
    if not base or base in (".", "..") or base.startswith("."):
        raise InvalidArgumentError(f"{what}: {prefix!r} does not end in a plain file-name prefix")
    return folder, base


def check_plain_name(name: Any, where: str) -> str:
    """``name`` if it is a plain file name (no folder part, not hidden, no ``..``)."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or name.startswith(".")
    ):
        raise CheckpointCorruptError(f"{where}: {name!r} is not a plain file name in the checkpoint folder")
    return name


# --- JSON -------------------------------------------------------------------------------------------


def dump_json(obj: Any) -> bytes:
    """Compact JSON bytes (``indent=`` bypasses the C encoder: 130 ms vs 25 ms for a
    20,000-tensor index here); ``python -m gpuvars inspect`` is the human view."""
    return (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode()


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes, where: str) -> Any:
    """JSON from ``raw`` (no NaN or Infinity: the writer never makes them); damage is a
    CheckpointCorruptError."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointCorruptError(f"{where} is not valid JSON: {exc}") from None


def read_json(path: str, what: str) -> Any:
    """Parse a small JSON file: a regular file (a FIFO there never blocks), its size bounded
    before reading.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        CheckpointCorruptError: not a regular file, too large, unreadable or not JSON.
    """
    return parse_json(_atomic.read_regular(path, what, MAX_JSON_BYTES), f"{what} file {path!r}")


# --- the index -------------------------------------------------------------------------------------




@dataclasses.dataclass(frozen=True)
class Component:
    """One replica's component (or shard) of a distributed variable, in a replica file."""

    file: str
    shape: tuple[int, ...]
    checksum: str


class VarEntry(NamedTuple):
    """One saved variable as the index describes it.

    A named tuple, not a dataclass: an index of 200,000 variables makes 200,000 of them,
    and :func:`read_index` builds each in C (``tuple.__new__``), not by a Python ``__init__``."""

    key: str
    shape: tuple[int, ...]
    dtype: str  #: safetensors dtype string, e.g. "F32"
    kind: str
    trainable: bool
    file: str
    checksum: str | None  #: None for a plain .safetensors file (it carries no checksums)
    components: tuple[Component, ...] = ()  #: EXPAND_DISTRIBUTED_VARIABLES: one per replica file


@dataclasses.dataclass(frozen=True)
class Index:
    """A parsed, validated ``P.index.json``."""

    folder: str
    base: str
    policy: VariablePolicy
    global_step: int | None
    timestamp: float
    checksum_algorithm: str | None
    variables: dict[str, VarEntry]
    files: dict[str, dict[str, Any]]
    plain: bool = False  #: a plain .safetensors file, not a committed gpuvars checkpoint

    @property
    def prefix(self) -> str:
        """The checkpoint prefix (for a plain file: the file's path)."""
        return os.path.join(self.folder, self.base)

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)


# writing: the JSON a save commits (the one place that knows its field names)


def file_record(role: str, size: int, checksum: str) -> dict[str, Any]:
    """An index entry of ``files``: ``role`` is "data", "replica" or "devices"."""
    return {"role": role, "size": size, "checksum": checksum}


def component_record(file: str, shape: Sequence[int], checksum: str) -> dict[str, Any]:
    """One replica file's component of a distributed variable, in its index entry."""
    return {"file": file, "shape": list(shape), "checksum": checksum}


def variable_record(
    shape: Sequence[int],
    dtype: str,
    kind: str,
    trainable: bool,
    file: str,
    checksum: str,
    components: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """An index entry of ``variables`` (``dtype``: the safetensors string, e.g. "F32")."""
    rec = {"shape": list(shape), "dtype": dtype, "kind": kind, "trainable": trainable, "file": file,
           "checksum": checksum}
    if components:
        rec["components"] = list(components)
    return rec


def plain_variable_records(
    rows: Sequence[tuple[str, Sequence[int], str, str, bool, str, str]],
) -> dict[str, dict[str, Any]]:
    """``{key: variable_record(shape, dtype, kind, trainable, file, checksum)}`` for rows
    ``(key, shape, dtype, kind, trainable, file, checksum)`` of variables without
    components: the same JSON, built in one comprehension (no call per variable)."""
    return {
        key: {"shape": list(shape), "dtype": dtype, "kind": kind, "trainable": trainable, "file": file,
              "checksum": checksum}
        for key, shape, dtype, kind, trainable, file, checksum in rows
    }


def build_index(
    policy: VariablePolicy,
    global_step: int | None,
    timestamp: float,
    variables: dict[str, dict[str, Any]],
    files: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The JSON object of an index (written last; its rename is the commit)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "policy": policy.name,
        "global_step": global_step,
        "timestamp": timestamp,
        "checksum_algorithm": st.CHECKSUM_ALGORITHM,
        "variables": variables,
        "files": files,
    }


def device_record(
    kind: str,
    device: str,
    components: Sequence[tuple[str, int, int] | str] = (),
    *,
    aggregation: VariableAggregation | None = None,
    synchronization: VariableSynchronization | None = None,
) -> dict[str, Any]:
    """A device-map entry: the variable's device and kind; for a mirrored or sync-on-read
    variable each component's device (``components`` of str) and its aggregation and
    synchronization; for a sharded one each shard's ``(device, offset, rows)``."""
    rec: dict[str, Any] = {"device": device, "kind": kind}
    if components:
        rec["components"] = [
            {"device": c} if isinstance(c, str) else {"device": c[0], "offset": c[1], "rows": c[2]}
            for c in components
        ]
    if aggregation is not None:
        rec["aggregation"] = aggregation.name
    if synchronization is not None:
        rec["synchronization"] = synchronization.name
    return rec


def build_devices(devices: Mapping[str, dict[str, Any]]) -> bytes:
    """The bytes of ``P.devices.json`` for ``{key: device_record(...)}``."""
    return dump_json({"format": DEVICES_FORMAT, "version": VERSION, "devices": dict(devices)})


# reading: everything validated before a byte of tensor data is read


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise CheckpointCorruptError(f"{where}: {msg}")


def _is_uint(x: object) -> bool:
    return type(x) is int and x >= 0


def is_number(x: object) -> bool:
    """A finite JSON number that a float holds (not a bool, not NaN, not a 400-digit int)."""
    if type(x) is int:
        return abs(x) < 2**63
    return type(x) is float and math.isfinite(x)


def _is_shape(x: object) -> bool:
    return isinstance(x, list) and all(_is_uint(d) for d in x)


def read_index(prefix: str) -> Index:
    """Parse and validate ``prefix``'s index, and check that every file it names is a
    regular file with its recorded size.

    Raises:
        CheckpointNotFoundError: no committed checkpoint at ``prefix``.
        CheckpointCorruptError: the index or a file it names is damaged or missing.
    """
    folder, base = os.path.split(os.fspath(prefix))
    path = os.path.join(folder, index_file(base))
    if not os.path.lexists(path):
        hint = ""
        if os.path.exists(os.path.join(folder, data_file(base))):
            hint = f" ({data_file(base)} exists without its index: an uncommitted or retired save)"
        elif os.path.exists(os.path.join(folder, base)) and base.endswith(".safetensors"):
            hint = " (that is a plain .safetensors file; pass the prefix without the extension)"
        raise CheckpointNotFoundError(f"The passed save_path is not a valid checkpoint: {prefix!r}: no {index_file(base)}{hint}")
    raw = read_json(path, "checkpoint index")
    where = f"checkpoint index {path!r}"
    _need(isinstance(raw, dict), where, "not a JSON object")
    _need(raw.get("format") == FORMAT, where, f"format is {raw.get('format')!r}, expected {FORMAT!r}")
    version = raw.get("version")
    _need(_is_uint(version) and version >= 1, where, f"version {version!r} is not a positive integer")
    if version > VERSION:
        raise CheckpointCorruptError(f"{where}: format version {version} is newer than this gpuvars reads ({VERSION}); upgrade gpuvars")
    policy_name = raw.get("policy")
    _need(isinstance(policy_name, str) and policy_name in VariablePolicy.__members__, where,
          f"unknown policy {policy_name!r}")
    policy = VariablePolicy[policy_name]
    step = raw.get("global_step")
    _need(step is None or type(step) is int, where, "global_step is not an int")
    algo = raw.get("checksum_algorithm")
    _need(algo == st.CHECKSUM_ALGORITHM, where, f"checksum algorithm {algo!r} is not {st.CHECKSUM_ALGORITHM!r}")
    ts = raw.get("timestamp")
    _need(is_number(ts), where, "timestamp is not a number")

    files = raw.get("files")
    _need(isinstance(files, dict), where, "'files' is not an object")
    for name, rec in files.items():
        check_plain_name(name, where)
        _need(isinstance(rec, dict), where, f"file record for {name!r} is not an object")
        size = rec.get("size")
        _need(_is_uint(size), where, f"file {name!r} has no valid size")
        _need(isinstance(rec.get("checksum"), str), where, f"file {name!r} has no checksum")
        try:
            info = os.stat(os.path.join(folder, name))
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{where}: file {name!r} listed in the index is missing") from None
        except (OSError, ValueError) as exc:  # a name too long for this file system, ...
            raise CheckpointCorruptError(f"{where}: file {name!r} listed in the index cannot be examined: {exc}") from None
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointCorruptError(f"{where}: file {name!r} listed in the index is {_atomic.describe_mode(info.st_mode)}, "
                                         "not a regular file")
        if info.st_size != size:
            raise CheckpointCorruptError(
                f"{where}: file {name!r} is {info.st_size} bytes, the index recorded {size} (truncated or overwritten)"
            )

    variables_raw = raw.get("variables")
    _need(isinstance(variables_raw, dict), where, "'variables' is not an object")
    variables: dict[str, VarEntry] = {}
    data_files = {n for n in files if n.endswith(PLAIN_SUFFIX)}
    dtypes: set[str] = set()  # the safetensors dtype strings seen valid
    new, kinds, get = tuple.__new__, frozenset(KINDS), dict.get
    for key, rec in variables_raw.items():
        # the common case, checked in one expression (200,000 entries: messages are built only
        # on the careful path below, which names what is wrong)
        if type(rec) is dict and "components" not in rec:
            shape, dtype, kind, file, checksum, trainable = (
                get(rec, "shape"), get(rec, "dtype"), get(rec, "kind"), get(rec, "file"), get(rec, "checksum"),
                get(rec, "trainable"))
            if (
                type(shape) is list and _INT_ONLY.issuperset(map(type, shape)) and (not shape or min(shape) >= 0)
                and type(dtype) is str and (dtype in dtypes or _known_dtype(dtype, dtypes))
                and type(kind) is str and kind in kinds and type(trainable) is bool
                and type(file) is str and file in data_files and type(checksum) is str
            ):
                variables[key] = new(VarEntry, (key, tuple(shape), dtype, kind, trainable, file, checksum, ()))
                continue
        variables[key] = _parse_variable(f"{where}, variable {key!r}", key, rec, files)
    return Index(folder, base, policy, step, float(ts), algo, variables, files)


_INT_ONLY = frozenset({int})  # exact types: JSON true/false are not dimensions


def _known_dtype(dtype: str, seen: set[str]) -> bool:
    try:
        st.np_dtype(dtype)
    except InvalidArgumentError:
        return False
    seen.add(dtype)
    return True


def _parse_variable(w: str, key: str, rec: Any, files: Mapping[str, Any]) -> VarEntry:
    """One index entry of ``variables``, each field checked with its own message."""
    _need(isinstance(rec, dict), w, "not an object")
    shape = rec.get("shape")
    _need(_is_shape(shape), w, f"bad shape {shape!r}")
    dtype = rec.get("dtype")
    try:
        st.np_dtype(dtype)
    except InvalidArgumentError:
        raise CheckpointCorruptError(f"{w}: unknown dtype {dtype!r}") from None
    kind = rec.get("kind")
    _need(isinstance(kind, str) and kind in KINDS, w, f"unknown kind {kind!r}")
    _need(isinstance(rec.get("trainable"), bool), w, "trainable is not a bool")
    file = rec.get("file")
    _need(isinstance(file, str) and file in files, w, f"its file {file!r} is not among the index's files")
    _need(file.endswith(PLAIN_SUFFIX), w, f"its file {file!r} is not a .safetensors file")
    _need(isinstance(rec.get("checksum"), str), w, "no checksum")
    comps = rec.get("components", [])
    _need(isinstance(comps, list), w, "'components' is not a list")
    parsed = []
    for c in comps:
        _need(isinstance(c, dict), w, f"component {c!r} is not an object")
        cfile, cshape = c.get("file"), c.get("shape")
        _need(isinstance(cfile, str) and cfile in files and cfile.endswith(PLAIN_SUFFIX), w,
              f"component file {cfile!r} is not among the index's .safetensors files")
        _need(_is_shape(cshape), w, f"bad component shape {cshape!r}")
        _need(isinstance(c.get("checksum"), str), w, "a component has no checksum")
        parsed.append(Component(cfile, tuple(cshape), c["checksum"]))
    return VarEntry(key, tuple(shape), dtype, kind, rec["trainable"], file, rec["checksum"], tuple(parsed))


def read_devices(index: Index) -> dict[str, dict[str, Any]]:
    """The device map of ``index`` (empty when the policy saved none), checksum-verified
    and validated: every device string parses, every component record is well formed,
    a sharded variable's shard rows add up to its first dimension.

    Raises:
        CheckpointCorruptError: a missing, damaged or malformed device map, naming the
            file and the key.
    """
    name = devices_file(index.base)
    if name not in index.files:
        if index.policy.saves_devices():
            raise CheckpointCorruptError(
                f"checkpoint {index.prefix!r}: policy {index.policy.name} but the index lists no {name}"
            )
        return {}
    path = index.path(name)
    where = f"device map {path!r}"
    try:
        raw = _atomic.read_regular(path, "device map", int(index.files[name]["size"]))
    except CheckpointNotFoundError:
        raise CheckpointCorruptError(f"{where} listed in the index is missing") from None
    if st.checksum(raw) != index.files[name]["checksum"]:
        raise CheckpointCorruptError(f"{where} fails its checksum (damaged)")
    obj = parse_json(raw, where)
    _need(isinstance(obj, dict) and obj.get("format") == DEVICES_FORMAT, where, "not a gpuvars device map")
    devices = obj.get("devices")
    _need(isinstance(devices, dict), where, "'devices' is not an object")
    for key, rec in devices.items():
        _check_device_record(where, key, rec, index.variables.get(key))
    return dict(devices)


def _check_device(where: str, key: str, value: Any, what: str = "device") -> None:
    if not isinstance(value, str):
        raise CheckpointCorruptError(f"{where}: entry {key!r}: {what} {value!r} is not a device string")
    try:
        DeviceSpec.from_string(value)
    except InvalidArgumentError as exc:
        raise CheckpointCorruptError(f"{where}: entry {key!r}: {what} {value!r} does not parse: {exc}") from None


def _check_device_record(where: str, key: str, rec: Any, entry: VarEntry | None) -> None:
    _need(isinstance(rec, dict), where, f"entry {key!r} is not an object")
    _check_device(where, key, rec.get("device"))
    kind = rec.get("kind", "plain")
    _need(isinstance(kind, str) and kind in KINDS, where, f"entry {key!r}: unknown kind {kind!r}")
    for field, enum in (("aggregation", VariableAggregation), ("synchronization", VariableSynchronization)):
        value = rec.get(field)
        _need(value is None or (isinstance(value, str) and value in enum.__members__), where,
              f"entry {key!r}: unknown {field} {value!r}")
    comps = rec.get("components")
    if comps is None:
        return
    _need(isinstance(comps, list) and all(isinstance(c, dict) for c in comps), where,
          f"entry {key!r}: 'components' is not a list of objects")
    for k, c in enumerate(comps):
        _check_device(where, key, c.get("device"), f"component {k}'s device")
    if kind == "sharded" or (entry is not None and entry.kind == "sharded"):  # load builds by the index's kind
        rows = [c.get("rows") for c in comps]
        offsets = [c.get("offset", 0) for c in comps]
        _need(all(_is_uint(r) for r in rows) and all(_is_uint(o) for o in offsets), where,
              f"entry {key!r}: shard rows {rows} or offsets {offsets} are not non-negative integers")
        if entry is not None:
            total = entry.shape[0] if entry.shape else None
            _need(sum(rows) == total, where, f"entry {key!r}: shard rows {rows} do not add up to its shape {entry.shape}")


def read_plain(path: str) -> Index:
    """A synthetic index for a plain ``.safetensors`` file (no checksums, no devices).

    The data file of a gpuvars checkpoint whose index is gone (an uncommitted or retired
    save) is refused: a prefix without its index does not exist for readers.

    Raises:
        CheckpointNotFoundError: no such file, or an uncommitted gpuvars data file.
        CheckpointCorruptError: the file's header or size is damaged.
    """
    folder, base = os.path.split(path)
    with st.SafetensorsReader(path) as reader:
        if reader.metadata.get("format") == FORMAT:
            stem = base[: -len(PLAIN_SUFFIX)]
            raise CheckpointNotFoundError(
                f"{path!r} is the data file of a gpuvars checkpoint without its index "
                f"({index_file(stem)} is missing: an uncommitted or retired save); it is not restored"
            )
        tensors = dict(reader.tensors)
        size = reader.size
    variables = {
        key: VarEntry(key, info.shape, st.st_dtype(info.dtype), "plain", True, base, None)
        for key, info in tensors.items()
    }
    files = {base: {"role": "data", "size": size, "checksum": None}}
    return Index(folder, base, VariablePolicy.NONE, None, os.path.getmtime(path), None, variables, files, plain=True)


def open_checkpoint(path: str | os.PathLike[str]) -> Index:
    """The index of a committed checkpoint prefix, or a synthetic one for a plain ``.safetensors`` file.

    A committed prefix wins over a file of the same name. ``X.safetensors`` that is the
    data file of the committed checkpoint ``X`` opens as ``X`` (with its checksums).
    """
    path = os.fspath(path)
    folder, base = os.path.split(path)
    if base.endswith(PLAIN_SUFFIX) and not os.path.exists(os.path.join(folder, index_file(base))):
        stem = base[: -len(PLAIN_SUFFIX)]
        if stem and os.path.exists(os.path.join(folder, index_file(stem))):
            return read_index(os.path.join(folder, stem))
        if os.path.isfile(path):
            return read_plain(path)
    return read_index(path)


def open_data(index: Index, name: str, keys: Any = ()) -> st.SafetensorsReader:
    """Open the data file ``name`` of ``index``: its header must match the index's checksum,
    and each of ``keys`` must be in it with the shape and dtype the index records."""
    return open_file(index, name, {k: (index.variables[k].shape, index.variables[k].dtype) for k in keys})


def open_file(index: Index, name: str, expected: Mapping[str, tuple[tuple[int, ...], str]]) -> st.SafetensorsReader:
    """Open file ``name`` of ``index`` (data or replica file): its header must match the
    index's checksum, and each key of ``expected`` must be in it with that (shape, dtype)."""
    path = index.path(name)
    reader = st.SafetensorsReader(path)
    try:
        want = index.files[name]["checksum"]
        if want is not None and reader.header_checksum != want:
            raise CheckpointCorruptError(f"{path!r}: its header fails the checksum in the index (damaged)")
        tensors, np_dtypes = reader.tensors, {d: st.np_dtype(d) for d in {d for _, d in expected.values()}}
        for key, (shape, dtype) in expected.items():
            info = tensors.get(key)
            if info is None or info.shape != shape or info.dtype != np_dtypes[dtype]:
                raise CheckpointCorruptError(
                    f"{path!r}: tensor {key!r} disagrees with the index (shape/dtype) or is absent"
                )
    except BaseException:
        reader.close()
        raise
    return reader


def iter_files(prefix: str) -> Iterator[str]:
    """The paths of a committed checkpoint's files (index last)."""
    index = read_index(prefix)
    yield from (index.path(n) for n in index.files)
    yield os.path.join(index.folder, index_file(index.base))
