"""Format v1: the files of a prefix, the index manifest (the commit marker) and its checks.

The index is parsed and validated in full, and every file it names is checked for
existence and size, before any tensor byte is read: structural damage never reaches
a variable.

A plain ``.safetensors`` file (written by ``safetensors.numpy.save_file``, torch, ...)
opens as a checkpoint too, through :func:`open_checkpoint`: a synthetic index made from
its validated header, with no checksums (the file carries none) and no devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from gpuvars.checkpoint import _stformat as st
from gpuvars.checkpoint._files import check_plain_name, read_json
from gpuvars.checkpoint.policy import VariablePolicy
from gpuvars.errors import CheckpointCorruptError, CheckpointNotFoundError

FORMAT = "gpuvars-checkpoint"
DEVICES_FORMAT = "gpuvars-devices"
VERSION = 1
KINDS = ("plain", "mirrored", "sync_on_read", "sharded")
PLAIN_SUFFIX = ".safetensors"


def index_file(base: str) -> str:
    return f"{base}.index.json"


def data_file(base: str) -> str:
    return f"{base}.safetensors"


def devices_file(base: str) -> str:
    return f"{base}.devices.json"


def replica_file(base: str, k: int, n: int) -> str:
    return f"{base}.replica-{k}-of-{n}.safetensors"


@dataclasses.dataclass(frozen=True)
class Component:
    """One replica's component (or shard) of a distributed variable, in a replica file."""

    file: str
    shape: tuple[int, ...]
    checksum: str


@dataclasses.dataclass(frozen=True)
class VarEntry:
    """One saved variable as the index describes it."""

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


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise CheckpointCorruptError(f"{where}: {msg}")


def read_index(prefix: str) -> Index:
    """Parse and validate ``prefix``'s index, and check that every file it names exists
    with its recorded size.

    Raises:
        CheckpointNotFoundError: no committed checkpoint at ``prefix``.
        CheckpointCorruptError: the index or a file it names is damaged or missing.
    """
    folder, base = os.path.split(os.fspath(prefix))
    path = os.path.join(folder, index_file(base))
    if not os.path.exists(path):
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
    _need(isinstance(version, int) and not isinstance(version, bool) and version >= 1, where,
          f"version {version!r} is not a positive integer")
    if version > VERSION:
        raise CheckpointCorruptError(f"{where}: format version {version} is newer than this gpuvars reads ({VERSION}); upgrade gpuvars")
    try:
        policy = VariablePolicy[str(raw.get("policy"))]
    except KeyError:
        raise CheckpointCorruptError(f"{where}: unknown policy {raw.get('policy')!r}") from None
    step = raw.get("global_step")
    _need(step is None or (isinstance(step, int) and not isinstance(step, bool)), where, "global_step is not an int")
    algo = raw.get("checksum_algorithm")
    _need(algo == st.CHECKSUM_ALGORITHM, where, f"checksum algorithm {algo!r} is not {st.CHECKSUM_ALGORITHM!r}")
    ts = raw.get("timestamp")
    _need(isinstance(ts, (int, float)), where, "timestamp is not a number")

    files = raw.get("files")
    _need(isinstance(files, dict), where, "'files' is not an object")
    for name, rec in files.items():
        check_plain_name(name, where)
        _need(isinstance(rec, dict), where, f"file record for {name!r} is not an object")
        size = rec.get("size")
        _need(isinstance(size, int) and size >= 0, where, f"file {name!r} has no valid size")
        _need(isinstance(rec.get("checksum"), str), where, f"file {name!r} has no checksum")
        fpath = os.path.join(folder, name)
        try:
            actual = os.path.getsize(fpath)
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{where}: file {name!r} listed in the index is missing") from None
        if actual != size:
            raise CheckpointCorruptError(
                f"{where}: file {name!r} is {actual} bytes, the index recorded {size} (truncated or overwritten)"
            )

    variables_raw = raw.get("variables")
    _need(isinstance(variables_raw, dict), where, "'variables' is not an object")
    variables: dict[str, VarEntry] = {}
    for key, rec in variables_raw.items():
        w = f"{where}, variable {key!r}"
        _need(isinstance(rec, dict), w, "not an object")
        shape = rec.get("shape")
        _need(
            isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape),
            w,
            f"bad shape {shape!r}",
        )
        dtype = rec.get("dtype")
        try:
            st.np_dtype(dtype)
        except Exception:
            raise CheckpointCorruptError(f"{w}: unknown dtype {dtype!r}") from None
        kind = rec.get("kind")
        _need(kind in KINDS, w, f"unknown kind {kind!r}")
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
            _need(isinstance(cshape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                   for d in cshape), w, f"bad component shape {cshape!r}")
            _need(isinstance(c.get("checksum"), str), w, "a component has no checksum")
            parsed.append(Component(cfile, tuple(cshape), c["checksum"]))
        variables[key] = VarEntry(key, tuple(shape), dtype, kind, rec["trainable"], file, rec["checksum"], tuple(parsed))
    return Index(folder, base, policy, step, float(ts), algo, variables, files)


def read_devices(index: Index) -> dict[str, Any]:
    """The device map of ``index`` (empty when the policy saved none), checksum-verified."""
    name = devices_file(index.base)
    if name not in index.files:
        if index.policy.saves_devices():
            raise CheckpointCorruptError(
                f"checkpoint {index.prefix!r}: policy {index.policy.name} but the index lists no {name}"
            )
        return {}
    path = index.path(name)
    try:
        with open(path, "rb") as f:
            raw = f.read(index.files[name]["size"] + 1)
    except FileNotFoundError:
        raise CheckpointCorruptError(f"device map {path!r} listed in the index is missing") from None
    if st.checksum(raw) != index.files[name]["checksum"]:
        raise CheckpointCorruptError(f"device map {path!r} fails its checksum (damaged)")
    where = f"device map {path!r}"
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointCorruptError(f"{where}: not valid JSON: {exc}") from None
    _need(isinstance(obj, dict) and obj.get("format") == DEVICES_FORMAT, where, "not a gpuvars device map")
    devices = obj.get("devices")
    _need(isinstance(devices, dict), where, "'devices' is not an object")
    for key, rec in devices.items():
        _need(isinstance(rec, dict) and isinstance(rec.get("device"), str), where, f"entry {key!r} has no device")
    return dict(devices)


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
        for key, (shape, dtype) in expected.items():
            info = reader.tensors.get(key)
            if info is None or info.shape != shape or st.st_dtype(info.dtype) != dtype:
                raise CheckpointCorruptError(
                    f"{path!r}: tensor {key!r} disagrees with the index (shape/dtype) or is absent"
                )
    except BaseException:
        reader.close()
        raise
    return reader
