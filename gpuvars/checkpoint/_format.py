"""Format v1: the files of a prefix, the index manifest (the commit marker) and its checks.

The index is parsed and validated in full, and every file it names is checked for
existence and size, before any tensor byte is read: structural damage never reaches
a variable.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from gpuvars.checkpoint import _stformat as st
from gpuvars.checkpoint._files import check_plain_name, read_json
from gpuvars.checkpoint.policy import VariablePolicy
from gpuvars.errors import CheckpointCorruptError, CheckpointNotFoundError

FORMAT = "gpuvars-checkpoint"
DEVICES_FORMAT = "gpuvars-devices"
VERSION = 1
KINDS = ("plain", "mirrored", "sync_on_read", "sharded")


def index_file(base: str) -> str:
    return f"{base}.index.json"


def data_file(base: str) -> str:
    return f"{base}.safetensors"


def devices_file(base: str) -> str:
    return f"{base}.devices.json"


def replica_file(base: str, k: int, n: int) -> str:
    return f"{base}.replica-{k}-of-{n}.safetensors"


@dataclasses.dataclass(frozen=True)
class VarEntry:
    """One saved variable as the index describes it."""

    key: str
    shape: tuple[int, ...]
    dtype: str  #: safetensors dtype string, e.g. "F32"
    kind: str
    trainable: bool
    file: str
    checksum: str


@dataclasses.dataclass(frozen=True)
class Index:
    """A parsed, validated ``P.index.json``."""

    folder: str
    base: str
    policy: VariablePolicy
    global_step: int | None
    timestamp: float
    checksum_algorithm: str
    variables: dict[str, VarEntry]
    files: dict[str, dict[str, Any]]

    @property
    def prefix(self) -> str:
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
    _need(isinstance(version, int), where, "no integer version")
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
            st.np_dtype(dtype)  # type: ignore[arg-type]
        except Exception:
            raise CheckpointCorruptError(f"{w}: unknown dtype {dtype!r}") from None
        kind = rec.get("kind")
        _need(kind in KINDS, w, f"unknown kind {kind!r}")
        _need(isinstance(rec.get("trainable"), bool), w, "trainable is not a bool")
        file = rec.get("file")
        _need(file in files, w, f"its file {file!r} is not among the index's files")
        _need(isinstance(rec.get("checksum"), str), w, "no checksum")
        variables[key] = VarEntry(key, tuple(shape), dtype, kind, rec["trainable"], file, rec["checksum"])
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
    with open(path, "rb") as f:
        raw = f.read(index.files[name]["size"] + 1)
    if st.checksum(raw) != index.files[name]["checksum"]:
        raise CheckpointCorruptError(f"device map {path!r} fails its checksum (damaged)")
    obj = read_json(path, "device map")
    where = f"device map {path!r}"
    _need(isinstance(obj, dict) and obj.get("format") == DEVICES_FORMAT, where, "not a gpuvars device map")
    devices = obj.get("devices")
    _need(isinstance(devices, dict), where, "'devices' is not an object")
    for key, rec in devices.items():
        _need(isinstance(rec, dict) and isinstance(rec.get("device"), str), where, f"entry {key!r} has no device")
    return devices
