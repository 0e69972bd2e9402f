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
        lambda d: d["s"].update(kind="mirrored", components=[{"device": "/cpu:0"}, {"device": "/cpu:0"}]),
    ],
    ids=["component-device", "component-null", "rows-string", "components-object", "kind-list", "kind-disagrees"],
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


# --- write failures: a CheckpointError that is an OSError, naming the prefix and file -------------------


def _write_error() -> type[BaseException]:
    cls = getattr(gv, "CheckpointWriteError", None)
    assert cls is not None, "gv.CheckpointWriteError is missing"
    assert issubclass(cls, gv.CheckpointError) and issubclass(cls, OSError)
    return cls  # type: ignore[no-any-return]


def test_save_under_a_regular_file_is_a_checkpoint_write_error(saved: tuple[gv.Saver, str], tmp_path: Path) -> None:
    saver, prefix = saved
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(_write_error(), match=r"'.*afile/m-2'.*afile") as info:
        saver.save(tmp_path / "afile" / "m", global_step=2)
    assert info.value.errno in (errno.EEXIST, errno.ENOTDIR)
    assert gv.latest_checkpoint(tmp_path) == prefix and saver.last_checkpoints == [prefix]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc: a folder no one may create files in")
def test_save_into_a_folder_without_permission_is_a_checkpoint_write_error(saved: tuple[gv.Saver, str]) -> None:
    saver, _ = saved  # tests run as root: chmod stops no one, /proc stops root too
    with pytest.raises(_write_error(), match=r"'/proc/gpuvars-test-m'.*gpuvars-test-m\.safetensors") as info:
        saver.save("/proc/gpuvars-test-m")
    assert ".tmp-" not in str(info.value)  # the file it names is the checkpoint's, not a hidden temporary
    assert not os.path.exists("/proc/gpuvars-test-m.index.json")


def test_state_file_that_cannot_be_replaced_is_a_checkpoint_write_error(tmp_path: Path) -> None:
    saver = model()
    (tmp_path / "checkpoint").mkdir()
    with pytest.raises(_write_error(), match=r"'.*m-1' was committed.*checkpoint state file '.*checkpoint'"):
        saver.save(tmp_path / "m", global_step=1)
    with gv.Registry():
        assert sorted(gv.load_checkpoint(tmp_path / "m-1")) == ["v0", "v1"]


def _expand_saver() -> gv.Saver:
    s = gv.ShardedVariable(np.arange(6.0, dtype=np.float32), 2, name="s")
    _KEPT.append(s)
    return gv.Saver([s], options=gv.SaveOptions(experimental_variable_policy="expand_distributed_variables"))


def test_long_prefix_commits_every_replica_file(tmp_path: Path) -> None:
    """Regression: a replica file whose writer failed to start (here: a temporary name
    too long for the file system) was left out silently and the index committed without it."""
    base = "m" * 205  # every final name fits in 255 bytes; the old temporary names of replica files did not
    prefix = _expand_saver().save(tmp_path / base)
    index = json.loads(Path(prefix + ".index.json").read_text())
    replicas = sorted(n for n in index["files"] if ".replica-" in n)
    assert replicas == [f"{base}.replica-0-of-2.safetensors", f"{base}.replica-1-of-2.safetensors"]
    assert [c["file"] for c in index["variables"]["s"]["components"]] == replicas


def test_replica_file_that_cannot_be_created_fails_the_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpuvars.checkpoint import _atomic

    saver = _expand_saver()
    first = saver.save(tmp_path / "m", global_step=1)
    real = _atomic.temp_path

    def no_space_for_replica_1(path: str, writer: Any = None) -> str:
        if "replica-1-of-2" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, writer)

    monkeypatch.setattr(_atomic, "temp_path", no_space_for_replica_1)
    with pytest.raises(_write_error(), match=r"'.*m-2'.*m-2\.replica-1-of-2\.safetensors.*No space left") as info:
        saver.save(tmp_path / "m", global_step=2)
    assert info.value.errno == errno.ENOSPC
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("m-2")) == []
    assert gv.latest_checkpoint(tmp_path) == first


# A disk that fills (RLIMIT_FSIZE) and a read-only folder: tests/test_checkpoint_faults.py, for blocking
# and asynchronous saves.


# --- host memory: a valid file too big to hold is ResourceExhaustedError naming file and key ----------


MEMORY_CHILD = textwrap.dedent(
    """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (16 << 30, resource.RLIM_INFINITY))  # 16 GiB of address space
    import numpy as np
    import gpuvars as gv
    path = sys.argv[1]
    for how in ("load_checkpoint", "restore"):
        with gv.Registry():
            try:
                if how == "load_checkpoint":
                    gv.load_checkpoint(path)
                else:
                    v = gv.Variable(np.zeros(1, np.uint8), name="huge", validate_shape=False)
                    gv.Saver([v]).restore(path)
            except gv.ResourceExhaustedError as exc:
                print(how, "ResourceExhaustedError:", exc)
            except BaseException as exc:
                print(how, "other:", type(exc).__name__, exc)
            else:
                print(how, "no error")
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="needs sparse files and RLIMIT_AS")
def test_restore_target_too_big_for_host_memory_is_resource_exhausted(tmp_path: Path) -> None:
    nbytes = 64 << 30  # a sparse file: the disk holds only its header
    header = json.dumps({"huge": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + nbytes)
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(path)], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    for how, line in zip(("load_checkpoint", "restore"), lines):
        assert line.startswith(f"{how} ResourceExhaustedError:"), line
        assert "'huge'" in line and "big.safetensors" in line, line


# --- the weak registry: say why a Saver finds nothing ------------------------------------------------


def test_saver_with_no_live_variables_says_the_registry_is_weak() -> None:
    gv.Variable(np.ones(2, np.float32), name="w")  # not kept: it leaves the registry at once
    gc.collect()
    with pytest.raises(gv.InvalidArgumentError, match=r"No variables to save.*weakly.*keep a reference.*var_list"):
        gv.Saver()
    with pytest.raises(gv.InvalidArgumentError, match=r"^No variables to save$"):
        gv.Saver([])  # an explicit empty list: nothing to explain
