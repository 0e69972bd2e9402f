"""Write faults survived: a disk that fills (RLIMIT_FSIZE), a folder that turns read-only, a
folder replaced by a file; and host memory that stays flat over many saves.

Each fault comes during the second save of a Saver whose first save committed, for a
blocking save and for a ``blocking=False`` save whose error is collected from
``fut.result()``, the next ``save()``, ``wait_until_finished()`` or ``close()``. Every time:
a :class:`gv.CheckpointWriteError` (a CheckpointError and an OSError with the errno) naming
the prefix and the checkpoint file, never a hidden temporary; nothing lost (the first
checkpoint restores verified, ``latest_checkpoint`` and the ``checkpoint`` state file are
byte-for-byte unchanged, the Saver still lists only it); no temporary file left; and the
Saver saves again once the fault is gone. The faults that need a process of their own (a
file-size limit, another user) run in children of the fork server (tests/fault_child.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import gpuvars as gv
from conftest import fault_cases, has_async_save
from fault_child import ForkServer  # the fork_server fixture (conftest)

# How the error of the failing save reaches the caller.
HOWS = [
    "blocking",
    pytest.param("result", marks=pytest.mark.skipif(not has_async_save(), reason="no Saver.save(blocking=False) yet")),
    pytest.param("next-save", marks=pytest.mark.skipif(not has_async_save(), reason="no Saver.save(blocking=False) yet")),
    pytest.param("wait", marks=pytest.mark.skipif(not has_async_save(), reason="no Saver.save(blocking=False) yet")),
    pytest.param("close", marks=pytest.mark.skipif(not has_async_save(), reason="no Saver.save(blocking=False) yet")),
]

# The second save, made to fail, and the way its error reaches the caller: shared by the
# children below and this process. Returns (how it was raised, the error).
ATTEMPT = textwrap.dedent(
    """
    def attempt(saver, prefix, how):
        if how == "blocking":
            try:
                saver.save(prefix, global_step=2)
            except gv.CheckpointError as exc:
                return "save", exc
            raise AssertionError("the blocking save did not fail")
        try:
            fut = saver.save(prefix, global_step=2, blocking=False)
        except gv.CheckpointError as exc:  # a failure found before the call returned
            saver.wait_until_finished(timeout=60)  # nothing in flight, nothing to raise again
            return "at-call", exc
        try:
            if how == "result":
                fut.result(timeout=60)
            elif how == "next-save":
                saver.save(prefix, global_step=3)  # waits for step 2, raises its error, does not start
            elif how == "wait":
                saver.wait_until_finished(timeout=60)
            elif how == "close":
                saver.close()
        except gv.CheckpointError as exc:
            assert fut.done()
            if how != "close":
                saver.wait_until_finished(timeout=60)  # the error was raised once: not again
            return how, exc
        raise AssertionError(f"the save did not fail ({how})")
    """
)
exec(ATTEMPT)  # defines attempt() here too


def report(where: str, exc: BaseException) -> dict[str, Any]:
    return {"where": where, "type": type(exc).__name__, "errno": getattr(exc, "errno", None), "message": str(exc),
            "is_oserror": isinstance(exc, OSError), "is_write_error": isinstance(exc, gv.CheckpointWriteError)}


def check_error(r: dict[str, Any], prefix: str, how: str, file: str, errnos: tuple[int, ...]) -> None:
    """A CheckpointWriteError raised where ``how`` says, naming ``prefix`` and ``file``."""
    assert r["is_write_error"] and r["is_oserror"], r
    assert r["where"] in (how, "at-call") if how != "blocking" else r["where"] == "save", r
    assert f"'{prefix}'" in r["message"] and file in r["message"], r["message"]
    assert ".tmp-" not in r["message"], r["message"]  # the checkpoint's file, not a hidden temporary
    assert r["errno"] in errnos, r


def check_nothing_lost(folder: Path, first: str, state_before: bytes, failed: list[str]) -> None:
    """The first checkpoint restores verified, the state file is unchanged, no temporary file is
    left and nothing of the failed saves is there."""
    names = os.listdir(folder)
    assert [n for n in names if ".tmp-" in n] == [], names
    for prefix in failed:
        base = os.path.basename(prefix)
        assert [n for n in names if n.startswith(base + ".")] == [], (base, names)
    assert (folder / "checkpoint").read_bytes() == state_before
    assert gv.latest_checkpoint(folder) == first
    assert gv.CheckpointReader(first).verify() == []


# --- disk full and read-only folder: in a child process ----------------------------------------------

CHILD = ATTEMPT + textwrap.dedent(
    """
    import errno, json, os, resource, signal
    import numpy as np
    import gpuvars as gv

    folder, fault, how = argv
    if fault == "fsize-index":  # many small variables: the data file fits, the index does not
        values = [np.full((), i, np.float32) for i in range(3000)]
    else:
        values = [np.arange(1 << 18, dtype=np.float32) + i for i in range(2)]  # 1 MiB each
    vs = [gv.Variable(v, name=f"layer_{i:05d}/w", device="/cpu:0") for i, v in enumerate(values)]
    saver = gv.Saver(vs, max_to_keep=1)
    first = saver.save(folder + "/m", global_step=1)
    state = open(folder + "/checkpoint", "rb").read()
    for v in vs:
        v.assign(np.zeros(v.shape, np.float32))

    if fault.startswith("fsize"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (320 << 10, hard))  # no file may grow past 320 KiB

        def lift():
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    else:
        os.chmod(folder, 0o555)
        if os.geteuid() == 0:  # root writes anywhere: save as nobody (every thread: glibc's setxid)
            os.setegid(65534)
            os.seteuid(65534)
        try:
            open(folder + "/probe", "wb").close()
        except PermissionError:
            pass
        else:
            os.unlink(folder + "/probe")
            say("skip: a file could be created in a folder of mode 0555 (uid %d)" % os.geteuid())
            raise SystemExit(0)

        def lift():
            if os.getuid() == 0:
                os.seteuid(0)
                os.setegid(0)
            os.chmod(folder, 0o755)

    where, exc = attempt(saver, folder + "/m", how)
    out = {"where": where, "type": type(exc).__name__, "errno": exc.errno, "message": str(exc),
           "is_oserror": isinstance(exc, OSError), "is_write_error": isinstance(exc, gv.CheckpointWriteError),
           "last": saver.last_checkpoints, "latest": gv.latest_checkpoint(folder),
           "state_unchanged": open(folder + "/checkpoint", "rb").read() == state}
    saver.restore(first, verify_first=True)  # nothing lost, in the failing process too
    out["restored"] = all(float(v.numpy().ravel()[-1]) == float(x.ravel()[-1]) for v, x in zip(vs, values))
    lift()
    if how != "close":  # the Saver is not wedged: the next save commits
        out["after"] = saver.save(folder + "/m", global_step=4)
        out["after_latest"] = gv.latest_checkpoint(folder)
    say("result " + json.dumps(out))
    """
)


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder every user may enter (the read-only case saves as nobody when run as root)."""
    top = Path(tempfile.mkdtemp(prefix="gpuvars-faults-"))
    os.chmod(top, 0o755)
    (top / "ckpt").mkdir(mode=0o755)
    yield top / "ckpt"
    os.chmod(top / "ckpt", 0o755)
    shutil.rmtree(top)


def run_child(fork_server: ForkServer, folder: Path, fault: str, how: str) -> dict[str, Any]:
    lines = fork_server.exec(CHILD, str(folder), fault, how)
    skips = [x for x in lines if x.startswith("skip: ")]
    if skips:
        pytest.skip(skips[0][len("skip: "):])
    results = [x for x in lines if x.startswith("result ")]
    assert len(results) == 1, lines
    out: dict[str, Any] = json.loads(results[0][len("result "):])
    return out


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE turns writes past the limit into EFBIG on Linux")
@pytest.mark.parametrize("fault, file", [("fsize-data", "m-2.safetensors"), ("fsize-index", "m-2.index.json")],
                         ids=["data-file", "index"])
@pytest.mark.parametrize("how", HOWS)
def test_disk_full_keeps_the_previous_checkpoint(fork_server: ForkServer, shared_folder: Path, fault: str,
                                                 file: str, how: str) -> None:
    r = run_child(fork_server, shared_folder, fault, how)
    check_child(r, shared_folder, how, file, (errno.EFBIG,))


@pytest.mark.skipif(not hasattr(os, "seteuid"), reason="needs POSIX users")
@pytest.mark.parametrize("how", HOWS)
def test_read_only_folder_keeps_the_previous_checkpoint(fork_server: ForkServer, shared_folder: Path, how: str) -> None:
    r = run_child(fork_server, shared_folder, "readonly", how)
    check_child(r, shared_folder, how, "m-2.safetensors", (errno.EACCES, errno.EPERM))


def check_child(r: dict[str, Any], folder: Path, how: str, file: str, errnos: tuple[int, ...]) -> None:
    first = str(folder / "m-1")
    check_error(r, str(folder / "m-2"), how, file, errnos)
    assert r["last"] == [first] and r["latest"] == first, r  # the Saver and the folder still name m-1 ...
    assert r["state_unchanged"] and r["restored"], r  # ... byte for byte, and it restores verified
    if how == "close":
        assert sorted(os.listdir(folder)) == ["checkpoint", "m-1.index.json", "m-1.safetensors"]
        assert gv.CheckpointReader(first).verify() == []
    else:  # the save after the fault was lifted committed, and max_to_keep=1 then retired m-1
        assert r["after"] == r["after_latest"] == str(folder / "m-4"), r
        assert sorted(os.listdir(folder)) == ["checkpoint", "m-4.index.json", "m-4.safetensors"]


# --- the folder replaced by a file: in this process ---------------------------------------------------


@pytest.mark.parametrize("how", HOWS)
def test_folder_replaced_by_a_file_keeps_the_previous_checkpoint(tmp_path: Path, how: str) -> None:
    folder = tmp_path / "run"
    values = [np.arange(1000, dtype=np.float32) + i for i in range(3)]
    vs = [gv.Variable(x, name=f"v{i}") for i, x in enumerate(values)]
    saver = gv.Saver(vs, max_to_keep=1)
    first = saver.save(folder / "m", global_step=1)
    state_before = (folder / "checkpoint").read_bytes()
    for v in vs:
        v.assign(np.zeros(1000, np.float32))
    moved = tmp_path / "run.moved"
    folder.rename(moved)  # e.g. a cleanup job or an operator moved the run away ...
    folder.write_text("not a folder")  # ... and something wrote a file of its name
    where, exc = attempt(saver, str(folder / "m"), how)
    r = report("save" if how == "blocking" else where, exc)
    check_error(r, str(folder / "m-2"), how, str(folder), (errno.ENOTDIR, errno.EEXIST))
    assert folder.read_text() == "not a folder"  # the file in the way is untouched
    assert saver.last_checkpoints == [first]
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []
    folder.unlink()
    moved.rename(folder)  # the run is back: nothing of it was lost
    check_nothing_lost(folder, first, state_before, [str(folder / "m-2"), str(folder / "m-3")])
    saver.restore(first, verify_first=True)
    assert all(np.array_equal(v.numpy(), x) for v, x in zip(vs, values))
    if how != "close":
        assert saver.save(folder / "m", global_step=4) == gv.latest_checkpoint(folder) == str(folder / "m-4")
        assert sorted(os.listdir(folder)) == ["checkpoint", "m-4.index.json", "m-4.safetensors"]


# --- host memory over many saves: in a child process --------------------------------------------------

RSS_CHILD = textwrap.dedent(
    """
    import json, os
    import numpy as np
    import gpuvars as gv

    folder, blocking, saves = argv[0], argv[1] == "1", int(argv[2])

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(field)

    n = 1 << 19  # 4 variables of 2 MiB: a leak of one variable per save is 100 MiB over 50 saves
    vs = [gv.Variable(np.zeros(n, np.float32), name=f"v{i}", device="/cpu:0") for i in range(4)]
    saver = gv.Saver(vs, max_to_keep=2)

    def save(step):
        for v in vs:
            v.assign(np.full(n, step, np.float32))
        if blocking:
            saver.save(folder + "/m", global_step=step)
        else:
            fut = saver.save(folder + "/m", global_step=step, blocking=False)
            for v in vs:  # mutated before the writer got to them: copied, then the copies must go
                v.assign_add(np.ones(n, np.float32))
            return fut

    for step in range(5):  # warm up: the writer, its buffers, the allocator's pools
        save(step)
    saver.wait_until_finished() if not blocking else None
    base = status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS now: the peak from here on
        hwm = True
    except OSError:
        hwm = False
    samples = []
    for step in range(100, 100 + saves):
        save(step)
        samples.append(status("VmRSS"))
    if not blocking:
        saver.wait_until_finished()
    samples.append(status("VmRSS"))
    say("result " + json.dumps({"base": base, "max": max(samples), "every10": samples[::10],  # say() keeps 3000 chars
                                "peak": status("VmHWM") if hwm else None, "latest": gv.latest_checkpoint(folder)}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc/self/status (Linux)")
@pytest.mark.parametrize("blocking", [
    pytest.param(True, id="blocking"),
    pytest.param(False, id="async", marks=pytest.mark.skipif(not has_async_save(), reason="no Saver.save(blocking=False) yet")),
])
def test_rss_stays_flat_over_50_saves(fork_server: ForkServer, tmp_path: Path, blocking: bool) -> None:
    saves = fault_cases(50)
    lines = fork_server.exec(RSS_CHILD, str(tmp_path), "1" if blocking else "0", str(saves), timeout=600)
    (line,) = [x for x in lines if x.startswith("result ")]
    r = json.loads(line[len("result "):])
    assert r["latest"] == str(tmp_path / f"m-{99 + saves}")
    growth = r["max"] - r["base"]
    mib = 1 << 20
    assert growth <= 64 * mib, f"VmRSS grew {growth / mib:.1f} MiB over {saves} saves (every 10th: {r['every10']})"
    if r["peak"] is not None:
        assert r["peak"] - r["base"] <= 64 * mib, f"VmHWM is {(r['peak'] - r['base']) / mib:.1f} MiB over the start"
