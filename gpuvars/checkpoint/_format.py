"""Formats v1 and v2, in one module: the names of a prefix's files and the schema of its
JSON, written and read here (the index manifest, which commits a checkpoint, and the
device map). Version 2 is version 1 plus a sharded data file: ``P-00001-of-0000N.safetensors``
... and a ``weight_map`` in the index naming each key's shard; a save that is not sharded
still writes version 1.

Writers build their JSON with :func:`variable_record`, :func:`device_record`,
:func:`build_index` and :func:`build_devices`; readers get it back validated by
:func:`read_index` and :func:`read_devices`. The index is parsed and validated in full,
and every file it names is checked to be a regular file of its recorded size, before any
tensor byte is read: structural damage never reaches a variable. Every problem with a
file is a CheckpointError naming the file and the key.

A plain ``.safetensors`` file (written by ``safetensors.numpy.save_file``, torch, ...)
opens as a checkpoint too, through :func:`open_checkpoint`: a synthetic index made from
its validated header, with no checksums (the file carries none) and no devices; so does
a Hugging Face sharded folder (``model.safetensors.index.json`` and its shards), through
:func:`read_hf_index`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
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
VERSION = 2  #: the newest index version written and read; an unsharded save writes version 1
SHARDED_VERSION = 2  #: the first version with a sharded data file and a weight_map
DEVICES_VERSION = 1
HF_INDEX_SUFFIX = ".safetensors.index.json"
HF_INDEX = "model.safetensors.index.json"
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


def shard_file(base: str, k: int, n: int) -> str:
    """Shard ``k`` (1-based) of ``n`` of the data file: ``P-00001-of-00004.safetensors``,
    the Hugging Face naming."""
    return f"{base}-{k:05d}-of-{n:05d}.safetensors"


_SHARD_NAME = re.compile(r"(.+)-([0-9]{5,})-of-([0-9]{5,})\.safetensors")


def shard_base(name: str) -> str | None:
    """The base of the checkpoint whose shard file ``name`` would be (None if it is no shard name)."""
    m = _SHARD_NAME.fullmatch(name)
    return m.group(1) if m else None


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
    weight_map: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The JSON object of an index (written last; its rename is the commit): version 1, or
    version 2 with ``weight_map`` (``{key: shard file}``) for a sharded data file."""
    index = {
        "format": FORMAT,
        "version": 1 if weight_map is None else SHARDED_VERSION,
        "policy": policy.name,
        "global_step": global_step,
        "timestamp": timestamp,
        "checksum_algorithm": st.CHECKSUM_ALGORITHM,
        "variables": variables,
        "files": files,
    }
    if weight_map is not None:
        index["weight_map"] = weight_map
    return index


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
    return dump_json({"format": DEVICES_FORMAT, "version": DEVICES_VERSION, "devices": dict(devices)})


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


def index_files(prefix: str) -> list[str]:
    """The file names ``prefix``'s index lists, each checked to be a plain name in its folder,
    without validating the rest (a save retiring an old index needs only these: its files that
    the save does not overwrite are removed after the commit; 20,000 variables validated in full
    cost ~0.1 s a save for nothing).

    Raises:
        CheckpointNotFoundError: no index at ``prefix``.
        CheckpointCorruptError: not a gpuvars index, or a name that is not a plain file name.
    """
    folder, base = os.path.split(os.fspath(prefix))
    path = os.path.join(folder, index_file(base))
    raw = read_json(path, "checkpoint index")
    where = f"checkpoint index {path!r}"
    _need(isinstance(raw, dict) and raw.get("format") == FORMAT, where, "not a gpuvars checkpoint index")
    files = raw.get("files")
    _need(isinstance(files, dict), where, "'files' is not an object")
    return [check_plain_name(name, where) for name in files]


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
    assert isinstance(version, int)
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
    if version >= SHARDED_VERSION or "weight_map" in raw:
        _check_weight_map(where, version, raw.get("weight_map"), variables, files)
    return Index(folder, base, policy, step, float(ts), algo, variables, files)


def _check_weight_map(where: str, version: int, weight_map: Any, variables: Mapping[str, VarEntry],
                      files: Mapping[str, Any]) -> None:
    """A version-2 index's ``weight_map``, when present: ``{key: file}`` for every variable,
    each file the one its variable record names, a data file of the index."""
    if weight_map is None and version >= SHARDED_VERSION:
        return  # an unsharded version-2 index: the variables' records name the file
    _need(version >= SHARDED_VERSION, where, f"a weight_map needs format version {SHARDED_VERSION}, not {version}")
    _need(isinstance(weight_map, dict), where, "'weight_map' is not an object")
    for key, file in weight_map.items():
        entry = variables.get(key)
        _need(entry is not None, where, f"weight_map names {key!r}, which is not among the variables")
        _need(isinstance(file, str) and file in files and files[file].get("role") == "data", where,
              f"weight_map: {key!r} is in {file!r}, which is not a data file of the index")
        assert entry is not None
        _need(entry.file == file, where, f"weight_map puts {key!r} in {file!r}, its variable record in {entry.file!r}")
    missing = [k for k in variables if k not in weight_map]
    _need(not missing, where, f"weight_map lacks {', '.join(map(repr, missing[:5]))}")


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
            stem = shard_base(base) or base[: -len(PLAIN_SUFFIX)]
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
    """The index of a committed checkpoint prefix, or a synthetic one for a plain ``.safetensors``
    file or a Hugging Face sharded folder (its ``*.safetensors.index.json``, or the folder).

    A committed prefix wins over a file or folder of the same name. ``X.safetensors`` that
    is the data file of the committed checkpoint ``X`` opens as ``X`` (with its checksums),
    and so does a shard ``X-00001-of-00004.safetensors``.
    """
    path = os.fspath(path)
    folder, base = os.path.split(path)
    if base and os.path.lexists(os.path.join(folder, index_file(base))):
        return read_index(path)
    if path and os.path.isdir(path):
        return _open_folder(path)
    if base.endswith(HF_INDEX_SUFFIX) and os.path.lexists(path):
        return read_hf_index(path)
    if base.endswith(PLAIN_SUFFIX):
        stem = base[: -len(PLAIN_SUFFIX)]
        if stem and os.path.exists(os.path.join(folder, index_file(stem))):
            return read_index(os.path.join(folder, stem))
        owner = shard_base(base)
        if owner and os.path.exists(os.path.join(folder, index_file(owner))):
            return read_index(os.path.join(folder, owner))
        if os.path.isfile(path):
            return read_plain(path)
    return read_index(path)


def _open_folder(folder: str) -> Index:
    """A folder: its ``model.safetensors.index.json``, else its one ``*.safetensors.index.json``,
    else its one ``model.safetensors`` (Hugging Face's unsharded layout)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise CheckpointNotFoundError(f"cannot list the folder {folder!r}: {exc}") from None
    indexes = [n for n in names if n.endswith(HF_INDEX_SUFFIX) and not n.startswith(".")]
    if HF_INDEX in indexes:
        return read_hf_index(os.path.join(folder, HF_INDEX))
    if len(indexes) == 1:
        return read_hf_index(os.path.join(folder, indexes[0]))
    if len(indexes) > 1:
        raise CheckpointNotFoundError(
            f"the folder {folder!r} holds several safetensors indexes ({', '.join(indexes)}): pass one of them")
    if "model.safetensors" in names:
        return read_plain(os.path.join(folder, "model.safetensors"))
    raise CheckpointNotFoundError(
        f"The passed save_path is not a valid checkpoint: {folder!r} is a folder without a {HF_INDEX} "
        "(or any *.safetensors.index.json, or a model.safetensors); pass a checkpoint prefix or a file")


class _Duplicate(Exception):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Duplicate(k)
            seen.add(k)
    return out


def read_hf_index(path: str) -> Index:
    """A synthetic index for a Hugging Face sharded folder: ``path`` is its
    ``*.safetensors.index.json`` (``{"metadata": {"total_size": N}, "weight_map": {tensor:
    shard}}``), validated strictly, and every shard's header is read. No checksums (the
    format has none), no devices; every tensor trainable. A file of that name that is a
    gpuvars index (a prefix ending in ``.safetensors``) opens as that checkpoint.

    Raises:
        CheckpointNotFoundError: no file at ``path``.
        CheckpointCorruptError: the JSON is malformed or of the wrong types, a key appears
            twice, a shard name is not a plain ``.safetensors`` file name in the folder
            (``../x``, ``/abs``), a shard is missing or damaged, a tensor is absent from
            its shard, or in two shards, or a shard holds a tensor the map does not name:
            each names the file and the key.
    """
    folder, base = os.path.split(path)
    where = f"safetensors index {path!r}"
    raw = _atomic.read_regular(path, "safetensors index", MAX_JSON_BYTES)
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_pairs, parse_constant=_no_constant)
    except _Duplicate as exc:
        raise CheckpointCorruptError(f"{where}: the key {exc.args[0]!r} appears twice") from None
    except (ValueError, RecursionError) as exc:
        raise CheckpointCorruptError(f"{where} is not valid JSON: {exc}") from None
    _need(isinstance(obj, dict), where, f"not a JSON object (found {type(obj).__name__})")
    if obj.get("format") == FORMAT:  # a gpuvars checkpoint whose prefix ends in .safetensors
        return read_index(path[: -len(".index.json")])
    meta = obj.get("metadata")
    _need(meta is None or isinstance(meta, dict), where, f"'metadata' is not an object: {meta!r:.100}")
    if isinstance(meta, dict) and "total_size" in meta:
        total = meta["total_size"]
        _need(is_number(total) and total >= 0, where, f"metadata.total_size {total!r:.100} is not a byte count")
    weight_map = obj.get("weight_map")
    _need(isinstance(weight_map, dict), where, f"'weight_map' is not an object: {weight_map!r:.100}")
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        w = f"{where}, tensor {key!r}"
        _need(isinstance(shard, str), w, f"its shard {shard!r:.100} is not a file name")
        check_plain_name(shard, w)
        _need(shard.endswith(PLAIN_SUFFIX), w, f"its shard {shard!r} is not a .safetensors file "
              "(pickled .bin shards are never read)")
        by_shard.setdefault(shard, []).append(key)
    infos: dict[str, st.TensorInfo] = {}
    files: dict[str, dict[str, Any]] = {}
    for shard, keys in by_shard.items():
        if not os.path.lexists(os.path.join(folder, shard)):
            raise CheckpointCorruptError(f"{where}, tensor {keys[0]!r}: its shard {shard!r} is missing")
    for shard, keys in by_shard.items():
        shard_path = os.path.join(folder, shard)
        with st.SafetensorsReader(shard_path) as reader:  # a regular file, its header validated
            tensors, size = reader.tensors, reader.size
        for key in keys:
            info = tensors.get(key)
            _need(info is not None, f"{where}, tensor {key!r}", f"it is not in its shard {shard!r}")
            assert info is not None
            infos[key] = info
        for key in tensors:
            other = weight_map.get(key)
            _need(other is not None, where, f"shard {shard!r} holds tensor {key!r}, which the weight_map does not name")
            _need(other == shard, f"{where}, tensor {key!r}", f"it is in two shards: {other!r} (the weight_map) and {shard!r}")
        files[shard] = {"role": "data", "size": size, "checksum": None}
    variables = {
        key: VarEntry(key, infos[key].shape, st.st_dtype(infos[key].dtype), "plain", True, shard, None)
        for key, shard in weight_map.items()
    }
    return Index(folder, base, VariablePolicy.NONE, None, os.path.getmtime(path), None, variables, files, plain=True)


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
            if info is None or info[2] != shape or (info[1] is not np_dtypes[dtype] and info[1] != np_dtypes[dtype]):
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
