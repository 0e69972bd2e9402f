"""Damaged checkpoints: every kind of damage is a CheckpointError naming the file (and the key),
structural damage writes nothing, and a failed load_checkpoint leaves no variable registered."""

from __future__ import annotations

import json
import os
import struct
import sys
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import gpuvars as gv
from gpuvars.checkpoint import _stformat as st

A = np.arange(16, dtype=np.float32).reshape(4, 4)
B = np.arange(8, dtype=np.int64) * 10


class Ckpt:
    def __init__(self, folder: Path) -> None:
        self.a = gv.Variable(A, name="a")
        self.b = gv.Variable(B, name="b")
        opts = gv.SaveOptions(experimental_variable_policy="save_variable_devices")
        self.saver = gv.Saver([self.a, self.b], options=opts)
        self.prefix = self.saver.save(folder / "m", global_step=1)
        self.data = Path(self.prefix + ".safetensors")
        self.index = Path(self.prefix + ".index.json")
        self.devices = Path(self.prefix + ".devices.json")
        self.a.assign(A + 100)
        self.b.assign(B + 100)

    def unchanged(self) -> bool:
        return bool(np.all(self.a.numpy() == A + 100) and np.all(self.b.numpy() == B + 100))

    def tensor_offset(self, key: str) -> int:
        with st.SafetensorsReader(self.data) as r:
            return r.tensors[key].begin

    def header_end(self) -> int:
        return 8 + int.from_bytes(self.data.read_bytes()[:8], "little")

    def edit_index(self, fn: Callable[[dict[str, Any]], None]) -> None:
        obj = json.loads(self.index.read_text())
        fn(obj)
        self.index.write_text(json.dumps(obj))


@pytest.fixture
def ckpt(tmp_path: Path) -> Ckpt:
    return Ckpt(tmp_path)


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def assert_load_leaves_nothing(prefix: str, exc: type[BaseException], match: str) -> None:
    with gv.Registry() as reg:
        with pytest.raises(exc, match=match):
            gv.load_checkpoint(prefix)
        assert len(reg) == 0 and gv.global_variables() == []


# --- tensor bytes: the checksum -------------------------------------------------------------------


def test_tensor_bit_flip_with_verify_first_touches_nothing(ckpt: Ckpt) -> None:
    flip(ckpt.data, ckpt.tensor_offset("b") + 3)
    with pytest.raises(gv.CheckpointCorruptError, match=r"m-1\.safetensors.*checksum failed for 'b'; nothing was restored"):
        ckpt.saver.restore(ckpt.prefix, verify_first=True)
    assert ckpt.a.initialized and ckpt.b.initialized and ckpt.unchanged()
    assert_load_leaves_nothing(ckpt.prefix, gv.CheckpointCorruptError, r"tensor 'b'.*checksum")


def test_tensor_bit_flip_marks_what_the_restore_wrote(ckpt: Ckpt) -> None:
    flip(ckpt.data, ckpt.tensor_offset("b") + 60, 0x80)
    with pytest.raises(gv.CheckpointCorruptError) as info:
        ckpt.saver.restore(ckpt.prefix)
    msg = str(info.value)
    assert "m-1.safetensors" in msg and "tensor 'b'" in msg and "checksum mismatch" in msg
    assert "already written 'a', 'b', now marked uninitialized" in msg
    assert not ckpt.a.initialized and not ckpt.b.initialized
    with pytest.raises(gv.UninitializedVariableError, match="'a'"):
        ckpt.a.numpy()
    assert gv.report_uninitialized_variables() == ["a", "b"]
    assert_load_leaves_nothing(ckpt.prefix, gv.CheckpointCorruptError, r"tensor 'b'.*checksum")


def test_first_tensor_damaged_marks_only_that_one(ckpt: Ckpt) -> None:
    flip(ckpt.data, ckpt.tensor_offset("a"))
    with pytest.raises(gv.CheckpointCorruptError, match=r"tensor 'a'.*already written 'a', now marked"):
        ckpt.saver.restore(ckpt.prefix)
    assert not ckpt.a.initialized
    assert ckpt.b.initialized and np.all(ckpt.b.numpy() == B + 100)


def test_subset_restore_ignores_damage_elsewhere(ckpt: Ckpt) -> None:
    flip(ckpt.data, ckpt.tensor_offset("b"))
    ckpt.saver.restore(ckpt.prefix, var_list=[ckpt.a])
    assert np.all(ckpt.a.numpy() == A)


# --- structure: found before any byte is written --------------------------------------------------


def test_every_header_byte_flip_is_caught_before_writing(ckpt: Ckpt) -> None:
    original = ckpt.data.read_bytes()
    for offset in range(ckpt.header_end()):
        flip(ckpt.data, offset)
        with pytest.raises(gv.CheckpointCorruptError, match=r"m-1\.safetensors"):
            ckpt.saver.restore(ckpt.prefix)
        assert ckpt.unchanged(), f"header byte {offset}"
        ckpt.data.write_bytes(original)
    ckpt.saver.restore(ckpt.prefix)  # the undamaged file restores
    assert np.all(ckpt.a.numpy() == A)


def test_header_flip_load_checkpoint_leaves_nothing(ckpt: Ckpt) -> None:
    flip(ckpt.data, 20)
    assert_load_leaves_nothing(ckpt.prefix, gv.CheckpointCorruptError, r"m-1\.safetensors")


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: os.truncate(p, p.stat().st_size - 1), r"'m-1\.safetensors' is \d+ bytes, the index recorded \d+"),
        (lambda p: os.truncate(p, 8), r"'m-1\.safetensors' is 8 bytes"),
        (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 8), r"'m-1\.safetensors' is \d+ bytes, the index recorded"),
        (lambda p: p.unlink(), r"file 'm-1\.safetensors' listed in the index is missing"),
    ],
    ids=["truncated-by-one", "truncated-to-8", "extended", "missing"],
)
def test_data_file_size_damage(ckpt: Ckpt, damage: Callable[[Path], Any], match: str) -> None:
    damage(ckpt.data)
    with pytest.raises(gv.CheckpointCorruptError, match=match):
        ckpt.saver.restore(ckpt.prefix)
    assert ckpt.unchanged()
    with pytest.raises(gv.CheckpointCorruptError, match=match):
        gv.CheckpointReader(ckpt.prefix)
    assert_load_leaves_nothing(ckpt.prefix, gv.CheckpointCorruptError, match)


def test_oversized_header_length_is_rejected_before_allocating(ckpt: Ckpt, tmp_path: Path) -> None:
    raw = bytearray(ckpt.data.read_bytes())
    raw[:8] = struct.pack("<Q", 2**62)  # same size: only the reader's bound can catch it
    ckpt.data.write_bytes(bytes(raw))
    with pytest.raises(gv.CheckpointCorruptError, match=r"m-1\.safetensors.*header length 4611686018427387904 exceeds the limit"):
        ckpt.saver.restore(ckpt.prefix)
    assert ckpt.unchanged()
    assert_load_leaves_nothing(ckpt.prefix, gv.CheckpointCorruptError, "exceeds the limit")
    # a plain file claiming a 99 MB header (under the cap) in 16 bytes: refused without allocating it
    plain = tmp_path / "liar.safetensors"
    plain.write_bytes(struct.pack("<Q", 99_000_000) + b"{}      ")
    tracemalloc.start()
    try:
        with pytest.raises(gv.CheckpointCorruptError, match="runs past the end of the file"):
            gv.CheckpointReader(plain)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20
    plain.write_bytes(struct.pack("<Q", 2**40) + b"{}      ")
    with pytest.raises(gv.CheckpointCorruptError, match="exceeds the limit"):
        gv.CheckpointReader(plain)


# --- the index ------------------------------------------------------------------------------------


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(obj: dict[str, Any]) -> None:
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return edit


def _rename_file(new: str) -> Callable[[dict[str, Any]], None]:
    def edit(obj: dict[str, Any]) -> None:
        obj["files"][new] = obj["files"].pop("m-1.safetensors")
        for rec in obj["variables"].values():
            rec["file"] = new

    return edit


INDEX_DAMAGE = {
    "not-an-object": (lambda o: o.clear() or o.update({"x": 1}), "format is None"),
    "version-newer": (_set(["version"], 3), r"format version 3 is newer than this gpuvars reads \(2\); upgrade gpuvars"),
    "version-string": (_set(["version"], "1"), "version '1' is not a positive integer"),
    "version-bool": (_set(["version"], True), "version True is not a positive integer"),
    "version-zero": (_set(["version"], 0), "version 0 is not a positive integer"),
    "policy": (_set(["policy"], "EVERYTHING"), "unknown policy 'EVERYTHING'"),
    "global-step": (_set(["global_step"], "1"), "global_step is not an int"),
    "algorithm": (_set(["checksum_algorithm"], "md5"), "checksum algorithm 'md5'"),
    "timestamp": (_set(["timestamp"], None), "timestamp is not a number"),
    "files-list": (_set(["files"], []), "'files' is not an object"),
    "file-record": (_set(["files", "m-1.safetensors"], 5), "file record for 'm-1.safetensors' is not an object"),
    "file-size": (_set(["files", "m-1.safetensors", "size"], -1), "file 'm-1.safetensors' has no valid size"),
    "file-checksum": (_set(["files", "m-1.safetensors", "checksum"], 7), "file 'm-1.safetensors' has no checksum"),
    "variables-list": (_set(["variables"], []), "'variables' is not an object"),
    "variable-record": (_set(["variables", "a"], "a"), "variable 'a'.*not an object"),
    "shape-string": (_set(["variables", "a", "shape"], "4,4"), r"variable 'a'.*bad shape '4,4'"),
    "shape-negative": (_set(["variables", "a", "shape"], [4, -4]), r"variable 'a'.*bad shape \[4, -4\]"),
    "shape-bool": (_set(["variables", "a", "shape"], [True, 4]), r"variable 'a'.*bad shape"),
    "dtype": (_set(["variables", "a", "dtype"], "F128"), "variable 'a'.*unknown dtype 'F128'"),
    "dtype-list": (_set(["variables", "a", "dtype"], ["F32"]), r"variable 'a'.*unknown dtype \['F32'\]"),
    "kind": (_set(["variables", "a", "kind"], "fancy"), "variable 'a'.*unknown kind 'fancy'"),
    "trainable": (_set(["variables", "a", "trainable"], "yes"), "variable 'a'.*trainable is not a bool"),
    "file-unhashable": (_set(["variables", "a", "file"], ["m-1.safetensors"]), r"variable 'a'.*its file \['m-1\.safetensors'\] is not among"),
    "file-unlisted": (_set(["variables", "a", "file"], "other.safetensors"), "variable 'a'.*its file 'other.safetensors' is not among the index's files"),
    "file-not-data": (_set(["variables", "a", "file"], "m-1.devices.json"), "variable 'a'.*not a .safetensors file"),
    "variable-checksum": (_set(["variables", "a", "checksum"], None), "variable 'a'.*no checksum"),
    "traversal-dotdot": (_rename_file("../m-1.safetensors"), r"'\.\./m-1\.safetensors' is not a plain file name"),
    "traversal-dir": (_rename_file("sub/m-1.safetensors"), r"'sub/m-1\.safetensors' is not a plain file name"),
    "traversal-absolute": (_rename_file("/etc/passwd"), r"'/etc/passwd' is not a plain file name"),
    "dotdot": (_rename_file(".."), r"'\.\.' is not a plain file name"),
    "hidden": (_rename_file(".m-1.safetensors"), r"'\.m-1\.safetensors' is not a plain file name"),
}


@pytest.mark.parametrize("name", list(INDEX_DAMAGE))
def test_damaged_index_is_rejected(ckpt: Ckpt, name: str) -> None:
    edit, match = INDEX_DAMAGE[name]
    ckpt.edit_index(edit)
    with pytest.raises(gv.CheckpointCorruptError, match=r"checkpoint index '.*m-1\.index\.json'.*" + match):
        ckpt.saver.restore(ckpt.prefix)
    assert ckpt.unchanged()
    with pytest.raises(gv.CheckpointCorruptError, match=match):
        gv.CheckpointReader(ckpt.prefix)
    assert_load_leaves_nothing(ckpt.prefix, gv.CheckpointCorruptError, match)


@pytest.mark.parametrize(
    "content", [b"", b"{", b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000, b'{"format": NaN'], ids=["empty", "truncated", "not-utf8", "deep", "nan"]
)
def test_index_that_is_not_json(ckpt: Ckpt, content: bytes) -> None:
    ckpt.index.write_bytes(content)
    with pytest.raises(gv.CheckpointCorruptError, match=r"checkpoint index file '.*m-1\.index\.json' is not valid JSON|not a JSON object|format is"):
        ckpt.saver.restore(ckpt.prefix)
    assert ckpt.unchanged()
    assert_load_leaves_nothing(ckpt.prefix, gv.CheckpointCorruptError, "m-1.index.json")


def test_index_disagreeing_with_the_data_header(ckpt: Ckpt) -> None:
    ckpt.edit_index(_set(["variables", "a", "shape"], [2, 8]))
    with gv.Registry() as reg:
        with pytest.raises(gv.CheckpointCorruptError, match=r"tensor 'a' disagrees with the index"):
            gv.load_checkpoint(ckpt.prefix)
        assert len(reg) == 0
    with pytest.raises(gv.CheckpointMismatchError, match=r"'a': shape \(2, 8\) in the checkpoint"):
        ckpt.saver.restore(ckpt.prefix)  # the variables' shapes are checked first
    assert ckpt.unchanged()


def test_index_with_a_wrong_tensor_checksum_is_damage(ckpt: Ckpt) -> None:
    ckpt.edit_index(_set(["variables", "b", "checksum"], "0" * 16))
    with pytest.raises(gv.CheckpointCorruptError, match="checksum failed for 'b'; nothing was restored"):
        ckpt.saver.restore(ckpt.prefix, verify_first=True)
    assert ckpt.unchanged()


# --- the device map -------------------------------------------------------------------------------


def test_devices_file_bit_flip_fails_its_checksum(ckpt: Ckpt) -> None:
    flip(ckpt.devices, 30)
    match = r"device map '.*m-1\.devices\.json' fails its checksum"
    with pytest.raises(gv.CheckpointCorruptError, match=match):
        ckpt.saver.restore(ckpt.prefix)
    assert ckpt.unchanged()
    with pytest.raises(gv.CheckpointCorruptError, match=match):
        gv.CheckpointReader(ckpt.prefix)
    assert_load_leaves_nothing(ckpt.prefix, gv.CheckpointCorruptError, match)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-2]), r"'m-1\.devices\.json' is \d+ bytes, the index recorded"),
        (lambda p: p.unlink(), r"'m-1\.devices\.json' listed in the index is missing"),
    ],
    ids=["truncated", "missing"],
)
def test_devices_file_size_damage(ckpt: Ckpt, damage: Callable[[Path], Any], match: str) -> None:
    damage(ckpt.devices)
    with pytest.raises(gv.CheckpointCorruptError, match=match):
        ckpt.saver.restore(ckpt.prefix)
    assert ckpt.unchanged()
    assert_load_leaves_nothing(ckpt.prefix, gv.CheckpointCorruptError, match)


def test_device_policy_without_devices_file_is_damage(ckpt: Ckpt) -> None:
    def drop(obj: dict[str, Any]) -> None:
        del obj["files"]["m-1.devices.json"]

    ckpt.edit_index(drop)
    with pytest.raises(gv.CheckpointCorruptError, match="policy SAVE_VARIABLE_DEVICES but the index lists no m-1.devices.json"):
        ckpt.saver.restore(ckpt.prefix)
    assert_load_leaves_nothing(ckpt.prefix, gv.CheckpointCorruptError, "lists no")


# --- the folder's state file ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, match",
    [
        ("{", "not valid JSON"),
        ('{"latest": 3, "all": []}', "unexpected structure"),
        ('{"latest": "../m-1", "all": []}', r"'\.\./m-1' is not a plain file name"),
        ('{"latest": "m-1", "all": [{"prefix": "m-1"}]}', "malformed entry"),
    ],
)
def test_damaged_state_file(ckpt: Ckpt, content: str, match: str) -> None:
    (ckpt.data.parent / "checkpoint").write_text(content)
    with pytest.raises(gv.CheckpointCorruptError, match=match):
        gv.latest_checkpoint(ckpt.data.parent)
    with pytest.raises(gv.CheckpointCorruptError, match=match):
        gv.get_checkpoint_state(ckpt.data.parent)
    # a save writes a fresh state file over it
    ckpt.saver.save(ckpt.data.parent / "m", global_step=2)
    assert gv.latest_checkpoint(ckpt.data.parent) == str(ckpt.data.parent / "m-2")


def test_io_error_while_streaming_marks_what_the_restore_wrote(ckpt: Ckpt, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpuvars.checkpoint import _transfer

    real = _transfer.restore_into

    def failing_on_b(reader: Any, key: str, var: gv.Variable, checksum: Any) -> None:
        if key == "b":
            raise OSError(5, "Input/output error")
        real(reader, key, var, checksum)

    monkeypatch.setattr(_transfer, "restore_into", failing_on_b)
    with pytest.raises(OSError, match="Input/output error") as info:
        ckpt.saver.restore(ckpt.prefix)
    assert not ckpt.a.initialized and not ckpt.b.initialized  # never a silent mix of old and new
    notes = getattr(info.value, "__notes__", [])
    if sys.version_info >= (3, 11):
        assert any("already written 'a', 'b', now marked uninitialized" in n for n in notes)
    with gv.Registry() as reg:
        with pytest.raises(OSError):
            gv.load_checkpoint(ckpt.prefix)
        assert len(reg) == 0
