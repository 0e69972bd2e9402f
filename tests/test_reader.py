"""gv.CheckpointReader (TF's CheckpointReader) and the read paths it shares with restores:
every kind of damage is a CheckpointError naming the file and the key."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from hypothesis import example, given, settings

import gpuvars as gv
from gpuvars.checkpoint._stformat import SafetensorsReader
from gpuvars.cli import main
from test_stformat import damaged_headers, entry  # the byte-format tests' header builders and fuzzer

def craft(path: Path, header: Any, data: bytes = b"") -> int:
    """Write a safetensors file from a hand-made header; returns its size."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return 8 + len(text) + len(data)


def only_checkpoint_errors(fn: Callable[[], Any]) -> None:
    """Run ``fn``: success, or a CheckpointError naming a file; anything else fails the test."""
    try:
        fn()
    except gv.CheckpointError as exc:
        assert ".safetensors" in str(exc) or ".index.json" in str(exc), exc


def cli(*args: str) -> int:
    """``python -m gpuvars ...`` in this process; must return 0 or 1 and raise nothing."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(list(args))
    assert code in (0, 1), err.getvalue()
    assert code == 0 or "error:" in err.getvalue() or "DAMAGED" in err.getvalue()
    return code


# --- header fields of the wrong JSON type ---------------------------------------------------------

def _bad(field: str, value: Any) -> dict[str, Any]:
    return {"a": {**entry("F32", [2], 0, 8), field: value}, "b": entry("U8", [3], 8, 11)}


def test_header_fields_of_any_json_type_are_checkpoint_errors_everywhere(tmp_path: Path) -> None:
    """Plain files and gpuvars checkpoints alike, through every public read path."""
    a = gv.Variable(np.arange(2, dtype=np.float32), name="a")
    b = gv.Variable(np.arange(3, dtype=np.uint8), name="b")
    prefix = gv.Saver([a, b]).save(tmp_path / "m")
    data_path, index_path = Path(prefix + ".safetensors"), Path(prefix + ".index.json")
    with SafetensorsReader(data_path) as r:  # the same layout as the crafted headers
        assert [(k, i.begin - r.tensors["a"].begin, i.nbytes) for k, i in r.tensors.items()] == [("a", 0, 8), ("b", 8, 3)]
        data = data_path.read_bytes()[r.tensors["a"].begin:]
    index = json.loads(index_path.read_text())
    plain = tmp_path / "plain.safetensors"

    @settings(max_examples=150, deadline=None)
    @given(header=damaged_headers())
    @example(header=_bad("dtype", 5))
    @example(header=_bad("dtype", ["F32"]))
    @example(header=_bad("dtype", {"F32": None}))
    @example(header=_bad("shape", "3"))
    @example(header=_bad("shape", [2.0]))
    @example(header=_bad("shape", [True, True]))
    @example(header=_bad("shape", [2**64]))
    @example(header=_bad("shape", [2**63, 0]))
    @example(header=_bad("data_offsets", {"a": 1}))
    @example(header=_bad("data_offsets", [[0], [8]]))
    @example(header={"__metadata__": {"k": ["v"]}, "a": entry("F32", [2], 0, 8), "b": entry("U8", [3], 8, 11)})
    def check(header: dict[str, Any]) -> None:
        craft(plain, header, data)
        index["files"][data_path.name]["size"] = craft(data_path, header, data)  # the header is what fails
        index_path.write_text(json.dumps(index))

        def read_all() -> None:
            with SafetensorsReader(plain) as r:
                for k in r.keys():
                    r.get_tensor(k)

        only_checkpoint_errors(read_all)
        for path in (str(plain), prefix):
            def restore() -> None:
                with gv.Registry():
                    x = gv.Variable(np.zeros(2, np.float32), name="a")
                    y = gv.Variable(np.zeros(3, np.uint8), name="b")
                    gv.Saver([x, y]).restore(path)

            def load() -> None:
                with gv.Registry():
                    gv.load_checkpoint(path)

            def reader() -> None:
                with gv.CheckpointReader(path) as ckpt:
                    for k in ckpt.keys():
                        ckpt.get_tensor(k)
                    ckpt.verify()

            for fn in (restore, load, reader):
                only_checkpoint_errors(fn)
            cli("inspect", path)
            cli("inspect", path, "--all")
            cli("verify", path)

    check()


# --- each file opened once --------------------------------------------------------------------------

def open_fds() -> int:
    """How many file descriptors this process holds (Linux)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except FileNotFoundError:
        pytest.skip("needs /proc/self/fd")


N = 300


@pytest.fixture
def many(tmp_path: Path) -> str:
    keep = [gv.Variable(np.full(3, i, np.int32), name=f"layer{i:03d}/w") for i in range(N)]
    return gv.Saver(keep).save(tmp_path / "m")


def test_get_tensor_opens_and_parses_each_file_once(many: str) -> None:
    before = open_fds()
    reader = gv.CheckpointReader(many)
    keys = reader.keys()
    assert reader.get_tensor(keys[0]).tolist() == [0, 0, 0]
    assert open_fds() == before + 1
    # The file is gone from the folder now: only the descriptor opened (and the header parsed)
    # by the first read can serve the other N-1 reads; a reader that reopened per call fails.
    os.unlink(many + ".safetensors")
    for i, key in enumerate(keys):
        assert reader.get_tensor(key).tolist() == [i, i, i]
    assert reader.verify() == []
    assert open_fds() == before + 1
    reader.close()
    reader.close()  # idempotent
    assert open_fds() == before
    with pytest.raises(gv.InvalidArgumentError, match="CheckpointReader of .*m' is closed"):
        reader.get_tensor(keys[1])
    assert reader.get_variable_to_shape_map()[keys[1]] == (3,)  # the maps need no file


def test_reader_is_a_context_manager_and_a_dropped_one_closes_its_files(many: str) -> None:
    before = open_fds()
    with gv.CheckpointReader(many) as reader:
        assert reader.get_tensor("layer007/w").tolist() == [7, 7, 7]
        assert open_fds() == before + 1
    assert open_fds() == before
    with pytest.raises(gv.InvalidArgumentError, match="closed"):
        reader.get_tensor("layer007/w")
    dropped = gv.CheckpointReader(many)
    dropped.get_tensor("layer001/w")
    del dropped
    assert open_fds() == before


def test_reader_sees_a_consistent_checkpoint_while_files_are_replaced(many: str, tmp_path: Path) -> None:
    reader = gv.CheckpointReader(many)
    assert reader.get_tensor("layer002/w").tolist() == [2, 2, 2]
    with gv.Registry():
        other = gv.Variable(np.full(3, -1, np.int32), name="layer002/w")
        gv.Saver([other]).save(tmp_path / "m")  # the same prefix, saved over (new inodes)
    assert reader.get_tensor("layer005/w").tolist() == [5, 5, 5]  # the files it opened, not the new ones
    reader.close()


# --- verify: every file the index lists ------------------------------------------------------------

class Expanded:
    """An EXPAND_DISTRIBUTED_VARIABLES checkpoint of a MirroredVariable over two logical CPUs
    plus a plain variable: m.safetensors, m.replica-{0,1}-of-2.safetensors, m.devices.json."""

    def __init__(self, folder: Path) -> None:
        gv.config.set_logical_devices("cpu", 2)
        self.strategy = gv.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with self.strategy.scope():
            self.w = gv.Variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="w")
        self.b = gv.Variable(np.arange(3, dtype=np.int64), name="b")
        opts = gv.SaveOptions(experimental_variable_policy="expand_distributed_variables")
        self.saver = gv.Saver([self.w, self.b], options=opts)
        self.prefix = self.saver.save(folder / "m")
        self.folder = folder
        self.index = json.loads(Path(self.prefix + ".index.json").read_text())

    def path(self, name: str) -> Path:
        return self.folder / name

    def flip_tensor_byte(self, name: str, key: str) -> None:
        with SafetensorsReader(self.path(name)) as r:
            offset = r.tensors[key].end - 1
        raw = bytearray(self.path(name).read_bytes())
        raw[offset] ^= 0x04
        self.path(name).write_bytes(bytes(raw))

    def replace_same_size(self, name: str, old: bytes, new: bytes) -> None:
        raw = self.path(name).read_bytes()
        assert len(old) == len(new) and raw.count(old) == 1
        self.path(name).write_bytes(raw.replace(old, new))


@pytest.fixture
def expanded(tmp_path: Path) -> Expanded:
    return Expanded(tmp_path)


REPLICA_0, REPLICA_1 = "m.replica-0-of-2.safetensors", "m.replica-1-of-2.safetensors"


def test_expanded_checkpoint_lists_the_files_verify_must_check(expanded: Expanded) -> None:
    files = expanded.index["files"]
    assert {n: r["role"] for n, r in files.items()} == {
        "m.safetensors": "data", REPLICA_0: "replica", REPLICA_1: "replica", "m.devices.json": "devices"}
    assert [c["file"] for c in expanded.index["variables"]["w"]["components"]] == [REPLICA_0, REPLICA_1]
    with gv.CheckpointReader(expanded.prefix) as reader:
        assert reader.verify() == []
    assert cli("verify", expanded.prefix) == 0


def test_verify_checks_every_replica_component(expanded: Expanded) -> None:
    expanded.flip_tensor_byte(REPLICA_1, "w")
    with gv.CheckpointReader(expanded.prefix) as reader:
        assert reader.verify() == [f"w (in {REPLICA_1})"]
        assert reader.get_tensor("w").tolist() == [[0, 1, 2], [3, 4, 5]]  # the logical value is intact
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(["verify", expanded.prefix]) == 1
    assert err.getvalue() == f"DAMAGED: {expanded.prefix}: checksum failed for w (in {REPLICA_1})\n"
    # what verify now reports, a restore into the same topology meets: it reads the replica files
    with pytest.raises(gv.CheckpointCorruptError, match=f"{REPLICA_1}.*checksum failed for 'w'"):
        expanded.saver.restore(expanded.prefix, verify_first=True)


def test_verify_checks_every_replica_header(expanded: Expanded) -> None:
    expanded.replace_same_size(REPLICA_0, b'"replica":"0 of 2"', b'"replica":"7 of 2"')
    with gv.CheckpointReader(expanded.prefix) as reader:
        assert reader.verify() == [f"<header of {REPLICA_0}>"]
    assert cli("verify", expanded.prefix) == 1
    with pytest.raises(gv.CheckpointCorruptError, match=f"{REPLICA_0}.*header fails the checksum"):
        expanded.saver.restore(expanded.prefix)


def test_verify_checks_the_device_map(expanded: Expanded) -> None:
    with gv.CheckpointReader(expanded.prefix) as reader:  # opened while the device map was sound
        expanded.replace_same_size("m.devices.json", b'"device":"/cpu:1"', b'"device":"/cpu:7"')
        assert reader.verify() == ["<m.devices.json>"]
    with pytest.raises(gv.CheckpointCorruptError, match="m.devices.json.*fails its checksum"):
        gv.CheckpointReader(expanded.prefix)
    assert cli("verify", expanded.prefix) == 1


def test_verify_reports_a_replica_file_that_lost_a_component(expanded: Expanded) -> None:
    index_path = Path(expanded.prefix + ".index.json")
    index = dict(expanded.index)
    index["variables"]["b"]["components"] = [{"file": REPLICA_1, "shape": [3], "checksum": "0" * 16}]
    index_path.write_text(json.dumps(index))
    with gv.CheckpointReader(expanded.prefix) as reader:
        assert reader.verify() == [f"b (in {REPLICA_1})"]


# --- shapes in the index ----------------------------------------------------------------------------

BIG_SHAPES = [[10**30], [2**62, 4], [2**63], [1] * 65, [0, 2**62, 4], [3, 10**6]]


@pytest.mark.parametrize("shape", BIG_SHAPES, ids=["1e30", "int64-overflow", "2**63", "65-dims", "empty-huge", "past-file"])
@pytest.mark.parametrize("where", ["variable", "component"])
def test_index_shape_beyond_numpy_or_its_file_is_corrupt(expanded: Expanded, shape: list[int], where: str) -> None:
    index = expanded.index
    if where == "variable":
        index["variables"]["w"]["shape"] = shape
    else:
        index["variables"]["w"]["components"][1]["shape"] = shape
    Path(expanded.prefix + ".index.json").write_text(json.dumps(index))
    with pytest.raises(gv.CheckpointCorruptError, match=r"m\.index\.json.*variable 'w': shape .* of F32 (needs|is beyond numpy)"):
        gv.CheckpointReader(expanded.prefix)
    for command in (["inspect", expanded.prefix], ["inspect", expanded.prefix, "--all"], ["verify", expanded.prefix]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            assert main(command) == 1
        assert err.getvalue().startswith("error: checkpoint index") and "'w'" in err.getvalue()


# --- files that are not regular files -------------------------------------------------------------

@pytest.fixture
def no_hang() -> Iterator[None]:
    """Fail (rather than hang the suite) when something blocks for 10 s, e.g. open() of a FIFO."""
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("blocked for 10 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 10)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("kind", ["a FIFO", "a directory"])
def test_special_file_in_place_of_the_index_is_damage_at_once(tmp_path: Path, no_hang: None, kind: str) -> None:
    w = gv.Variable(np.arange(3.0), name="w")
    prefix = gv.Saver([w]).save(tmp_path / "m")
    index = Path(prefix + ".index.json")
    index.unlink()
    os.mkfifo(index) if kind == "a FIFO" else index.mkdir()
    for path in (prefix, prefix + ".safetensors"):
        with pytest.raises(gv.CheckpointCorruptError, match=f"m.index.json: checkpoint index is {kind}.*, not a regular file"):
            gv.CheckpointReader(path)
        assert cli("inspect", path) == 1 and cli("verify", path) == 1


def test_special_file_in_place_of_a_listed_file_is_damage_at_once(tmp_path: Path, no_hang: None) -> None:
    w = gv.Variable(np.arange(3.0), name="w")
    opts = gv.SaveOptions(experimental_variable_policy="save_variable_devices")
    prefix = gv.Saver([w], options=opts).save(tmp_path / "m")
    for name in ("m.devices.json", "m.safetensors"):
        saved = tmp_path / (name + ".saved")
        shutil.move(tmp_path / name, saved)
        os.mkfifo(tmp_path / name)
        with pytest.raises(gv.CheckpointCorruptError, match=name):
            gv.CheckpointReader(prefix)
        (tmp_path / name).unlink()
        shutil.move(saved, tmp_path / name)
    assert gv.CheckpointReader(prefix).get_tensor("w").tolist() == [0.0, 1.0, 2.0]


# --- tensors larger than host memory --------------------------------------------------------------

from conftest import HUGE, huge_file  # noqa: E402 - shared with test_stformat.py


@pytest.fixture
def huge(tmp_path: Path) -> Iterator[Path]:
    path = huge_file(tmp_path / "huge.safetensors")
    yield path
    path.unlink()


def test_reader_tensor_larger_than_host_memory_is_resource_exhausted(huge: Path) -> None:
    ckpt = gv.CheckpointReader(huge)
    assert ckpt.get_variable_to_shape_map() == {"big": (HUGE,)}
    with pytest.raises(gv.ResourceExhaustedError, match=rf"tensor 'big' .*{huge}.*out of memory"):
        ckpt.get_tensor("big")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(["inspect", str(huge), "--all"]) == 1
    assert err.getvalue().startswith("error: ") and "'big'" in err.getvalue()


def test_load_checkpoint_of_a_tensor_larger_than_host_memory_is_resource_exhausted(huge: Path) -> None:
    with pytest.raises(gv.ResourceExhaustedError, match=rf"(?s)'big'.*{huge}"):
        gv.load_checkpoint(huge)
