"""The files around the tensors: temporary names and their cleanup, the folder's state file,
special files where a checkpoint file should be, device maps, write failures, and host
memory running out during a restore.

Every error here is a CheckpointError (or, for memory, a ResourceExhaustedError) naming
the prefix or file and, where there is one, the key; none may hang.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import xxhash

import gpuvars as gv

SUBPROCESS_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    "OPENBLAS_NUM_THREADS": "1",
}

_KEPT: list[Any] = []


@pytest.fixture(autouse=True)
def _release_kept() -> Any:
    yield
    _KEPT.clear()


def model(n: int = 2) -> gv.Saver:
    _KEPT.extend([gv.Variable(np.arange(4, dtype=np.float32) + i, name=f"v{i}") for i in range(n)])
    return gv.Saver(list(_KEPT))


def returns_promptly(fn: Callable[[], Any], fifos: list[Path], timeout: float = 10.0) -> Any:
    """``fn()``, failing the test if it has not returned within ``timeout`` seconds (a blocked
    open or read of a FIFO); the FIFOs then get a writer that closes at once, so the stuck
    thread can end."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test below
            box["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        deadline = time.monotonic() + 10
        while t.is_alive() and time.monotonic() < deadline:
            for fifo in fifos:
                os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
            t.join(0.1)
        pytest.fail(f"{fn} did not return within {timeout} s (blocked on a FIFO?)")
    if "exc" in box:
        raise box["exc"]
    return box.get("result")


# --- temporary files: names that carry their writer, removal only when provably stale --------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_names_carry_host_pid_and_start_time(tmp_path: Path) -> None:
    from gpuvars.checkpoint import _atomic, _stformat

    me = _atomic.this_writer()
    assert me.pid == os.getpid() and me.machine and len(me.machine) == 8
    if os.path.exists("/proc/self/stat"):
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        assert me.start == start
    name = os.path.basename(_atomic.temp_path(str(tmp_path / "m.index.json")))
    assert name.startswith(f".m.index.json.tmp-{os.getpid()}-") and _atomic.parse_temp(name) == me
    with _stformat.SafetensorsWriter(tmp_path / "d.safetensors", [("x", np.float32, (2,))]) as w:
        assert os.path.dirname(w.temp_path) == str(tmp_path)  # one naming for every writer
        assert _atomic.parse_temp(os.path.basename(w.temp_path)) == me
    long = "x" * 250
    name = os.path.basename(_atomic.temp_path(str(tmp_path / long)))
    assert len(os.fsencode(name)) <= 255 and _atomic.parse_temp(name) == me
    (tmp_path / name).write_bytes(b"")  # the system takes the name


def test_stale_temp_cleanup_spares_writers_on_other_hosts(tmp_path: Path) -> None:
    """Regression: a writer on another host sharing the folder lost its temporary files
    whenever its pid happened not to run here."""
    from gpuvars.checkpoint import _atomic

    saver = model(1)
    me = _atomic.this_writer()
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other_host = dataclasses.replace(me, pid=dead, host="node7", machine="0badf00d")
        names = {
            "other host, same-looking dead pid": _atomic.temp_path(str(tmp_path / "m-1.safetensors"), other_host),
            "older gpuvars (no host in the name)": str(tmp_path / f".m-1.index.json.tmp-{dead}-0123456789abcdef"),
            "this host, live writer": _atomic.temp_path(str(tmp_path / "m-2.safetensors"), dataclasses.replace(
                me, pid=live.pid, start=_atomic._proc_start(live.pid) or 0)),
            "this process": _atomic.temp_path(str(tmp_path / "m-3.safetensors")),
        }
        stale = {
            "this host, dead pid": _atomic.temp_path(str(tmp_path / "m-4.safetensors"), dataclasses.replace(me, pid=dead)),
            "other host, untouched for two days": _atomic.temp_path(str(tmp_path / "m-5.safetensors"), other_host),
            "older gpuvars, untouched for two days": str(tmp_path / f".m-5.index.json.tmp-{dead}-abcd"),
        }
        if me.start:  # needs /proc: the pid now names a process that started at another time
            stale["this host, pid reused"] = _atomic.temp_path(
                str(tmp_path / "m-6.safetensors"), dataclasses.replace(me, pid=live.pid, start=1))
        for path in [*names.values(), *stale.values()]:
            Path(path).write_bytes(b"partial")
        old = time.time() - 2 * 86400
        for key in ("other host, untouched for two days", "older gpuvars, untouched for two days"):
            os.utime(stale[key], (old, old))
        Path(tmp_path / "notes.tmp-1-x").write_bytes(b"not ours")
        saver.save(tmp_path / "m", global_step=9)
        left = set(os.listdir(tmp_path))
        assert {k for k, p in names.items() if os.path.basename(p) not in left} == set()
        assert {k for k, p in stale.items() if os.path.basename(p) in left} == set()
        assert "notes.tmp-1-x" in left
    finally:
        live.kill()
        live.wait()


# --- special files where a checkpoint file should be: prompt CheckpointErrors, never a hang --------


@pytest.fixture
def saved(tmp_path: Path) -> tuple[gv.Saver, str]:
    saver = model()
    return saver, saver.save(tmp_path / "m", global_step=1)


def test_fifo_as_the_state_file_does_not_hang(saved: tuple[gv.Saver, str], tmp_path: Path) -> None:
    state = tmp_path / "checkpoint"
    state.unlink()
    os.mkfifo(state)
    for fn in (gv.latest_checkpoint, gv.get_checkpoint_state):
        with pytest.raises(gv.CheckpointCorruptError, match=r"checkpoint state file '.*checkpoint' is a FIFO"):
            returns_promptly(lambda: fn(tmp_path), [state])


def test_fifo_as_the_index_does_not_hang(saved: tuple[gv.Saver, str], tmp_path: Path) -> None:
    saver, prefix = saved
    index = Path(prefix + ".index.json")
    index.unlink()
    os.mkfifo(index)
    with pytest.raises(gv.CheckpointCorruptError, match=r"'.*m-1\.index\.json' is a FIFO"):
        returns_promptly(lambda: saver.restore(prefix), [index])
    with gv.Registry() as reg:
        with pytest.raises(gv.CheckpointCorruptError, match=r"m-1\.index\.json' is a FIFO"):
            returns_promptly(lambda: gv.load_checkpoint(prefix), [index])
        assert len(reg) == 0


def test_fifo_as_the_device_map_does_not_hang(tmp_path: Path) -> None:
    _KEPT.append(gv.Variable(np.ones(2, np.float32), name="w"))
    opts = gv.SaveOptions(experimental_variable_policy="save_variable_devices")
    prefix = gv.Saver(list(_KEPT), options=opts).save(tmp_path / "m")
    devices = Path(prefix + ".devices.json")
    devices.unlink()
    os.mkfifo(devices)
    with pytest.raises(gv.CheckpointCorruptError, match=r"m\.devices\.json.*(FIFO|bytes)"):
        returns_promptly(lambda: gv.load_checkpoint(prefix), [devices])


@pytest.mark.parametrize("which", ["checkpoint", "m-1.index.json"])
def test_directory_in_place_of_a_json_file(saved: tuple[gv.Saver, str], tmp_path: Path, which: str) -> None:
    saver, prefix = saved
    (tmp_path / which).unlink()
    (tmp_path / which).mkdir()
    if which == "checkpoint":
        for fn in (gv.latest_checkpoint, gv.get_checkpoint_state):
            with pytest.raises(gv.CheckpointCorruptError, match=r"'.*checkpoint' is a directory"):
                fn(tmp_path)
    else:
        with pytest.raises(gv.CheckpointCorruptError, match=r"'.*m-1\.index\.json' is a directory"):
            saver.restore(prefix)
        with pytest.raises(gv.CheckpointCorruptError, match="is a directory"):
            gv.load_checkpoint(prefix)


# --- the folder's state file: every wrong type is damage ---------------------------------------------


STATE_DAMAGE = {
    "no-latest": {"all": []},
    "no-all": {"latest": "m-1"},
    "latest-number": {"latest": 3, "all": []},
    "all-object": {"latest": "m-1", "all": {"prefix": "m-1"}},
    "entry-string": {"latest": "m-1", "all": ["m-1"]},
    "timestamp-string": {"latest": "m-1", "all": [{"prefix": "m-1", "timestamp": "yesterday"}]},
    "timestamp-bool": {"latest": "m-1", "all": [{"prefix": "m-1", "timestamp": True}]},
    "timestamp-missing": {"latest": "m-1", "all": [{"prefix": "m-1"}]},
    "prefix-number": {"latest": "m-1", "all": [{"prefix": 1, "timestamp": 1.0}]},
    "preserved-string": {"latest": "m-1", "all": [], "last_preserved_timestamp": "x"},
    "preserved-list": {"latest": "m-1", "all": [], "last_preserved_timestamp": [1.0]},
    "preserved-null": {"latest": "m-1", "all": [], "last_preserved_timestamp": None},
    "format": {"format": "tensorflow", "latest": "m-1", "all": []},
    "version-newer": {"format": "gpuvars-checkpoint-state", "version": 2, "latest": "m-1", "all": []},
    "version-string": {"format": "gpuvars-checkpoint-state", "version": "1", "latest": "m-1", "all": []},
    "a-list": [],
    "null": None,
}


@pytest.mark.parametrize("name", list(STATE_DAMAGE))
def test_state_file_of_wrong_types_is_damage(saved: tuple[gv.Saver, str], tmp_path: Path, name: str) -> None:
    (tmp_path / "checkpoint").write_text(json.dumps(STATE_DAMAGE[name]))
    for fn in (gv.latest_checkpoint, gv.get_checkpoint_state):
        with pytest.raises(gv.CheckpointCorruptError, match=r"checkpoint state file '.*checkpoint'"):
            fn(tmp_path)


@pytest.mark.parametrize("text", ['{"latest": "m-1", "all": [{"prefix": "m-1", "timestamp": NaN}]}',
                                  '{"latest": "m-1", "all": [], "last_preserved_timestamp": Infinity}'])
def test_state_file_with_non_finite_numbers_is_damage(saved: tuple[gv.Saver, str], tmp_path: Path, text: str) -> None:
    (tmp_path / "checkpoint").write_text(text)
    with pytest.raises(gv.CheckpointCorruptError, match="checkpoint state file"):
        gv.get_checkpoint_state(tmp_path)


# --- device maps: a device string that does not parse is damage, named -------------------------------


def rewrite_devices(prefix: str, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit ``prefix``'s device map and re-record its size and checksum in the index (so only
    the edit is wrong)."""
    dev, idx = Path(prefix + ".devices.json"), Path(prefix + ".index.json")
    obj = json.loads(dev.read_text())
    edit(obj["devices"])
    raw = json.dumps(obj).encode()
    dev.write_bytes(raw)
    index = json.loads(idx.read_text())
    index["files"][dev.name].update(size=len(raw), checksum=xxhash.xxh3_64_hexdigest(raw))
    idx.write_text(json.dumps(index))


@pytest.mark.parametrize("bad", ["/gpu:x:y", "/device:GPU:0/cpu:1", "/job:", 7, None, ["/cpu:0"]])
def test_unparsable_device_in_the_device_map_is_damage(tmp_path: Path, bad: Any) -> None:
    from gpuvars.checkpoint import _format

    w = gv.Variable(np.ones(3, np.float32), name="w")
    _KEPT.append(w)
    opts = gv.SaveOptions(experimental_variable_policy="save_variable_devices")
    saver = gv.Saver([w], options=opts)
    prefix = saver.save(tmp_path / "m")
    rewrite_devices(prefix, lambda d: d["w"].update(device=bad))
    match = r"device map '.*m\.devices\.json'.*'w'"
    with gv.Registry() as reg:
        with pytest.raises(gv.CheckpointCorruptError, match=match):
            gv.load_checkpoint(prefix)
        assert len(reg) == 0
    w.assign([5.0, 5.0, 5.0])
    with pytest.raises(gv.CheckpointCorruptError, match=match):
        saver.restore(prefix)
    assert w.numpy().tolist() == [5.0, 5.0, 5.0]
    with pytest.raises(gv.CheckpointCorruptError, match=match):
        _format.read_devices(_format.read_index(prefix))
    with pytest.raises(gv.CheckpointCorruptError, match=match):
        gv.CheckpointReader(prefix)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["s"]["components"][1].update(device="/gpu:x:y"),
        lambda d: d["s"]["components"][0].update(device=None),
        lambda d: d["s"]["components"][0].update(rows="2"),
        lambda d: d["s"].update(components={"device": "/cpu:0"}),
        lambda d: d["s"].update(kind=["sharded"]),
    ],
    ids=["component-device", "component-null", "rows-string", "components-object", "kind-list"],
)
def test_damaged_component_records_are_damage(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    s = gv.ShardedVariable(np.arange(6.0, dtype=np.float32), 2, name="s")
    _KEPT.append(s)
    opts = gv.SaveOptions(experimental_variable_policy="save_variable_devices")
    prefix = gv.Saver([s], options=opts).save(tmp_path / "m")
    rewrite_devices(prefix, edit)
    with gv.Registry() as reg:
        with pytest.raises(gv.CheckpointCorruptError, match=r"device map '.*m\.devices\.json'.*'s'"):
            gv.load_checkpoint(prefix)
        assert len(reg) == 0

