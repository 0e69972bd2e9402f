"""Crash safety: a saving process SIGKILLed at random points never leaves a half-valid checkpoint.

A child process saves in a loop and prints after each commit; the test kills it at random
moments and then checks the folder the way a restarted job would see it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import gpuvars as gv

N = 65536  # float32 elements per variable: 4 variables, 1 MiB per checkpoint

CHILD = textwrap.dedent(
    """
    import sys, time, numpy as np, gpuvars as gv
    folder, step, mode, pause = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    n = %d
    # an explicit CPU device: placing on the default device would probe (import) the GPU libraries
    vs = [gv.Variable(np.zeros(n, np.float32), name="v%%d" %% i, device="/cpu:0") for i in range(4)]
    opts = gv.SaveOptions(experimental_variable_policy="save_variable_devices")
    saver = gv.Saver(vs, max_to_keep=3, options=opts)
    print("ready", flush=True)
    while True:
        for v in vs:
            v.assign(np.full(n, step, np.float32))
        if mode == "steps":
            saver.save(folder + "/model.ckpt", global_step=step)
        else:
            saver.save(folder + "/same")
        print(step, flush=True)
        step += 1
        time.sleep(pause)  # "training" between saves
    """
    % N
)

# A child imports the gpuvars this process imported: same interpreter, environment and working directory.
ENV = dict(os.environ)


def run_and_kill(folder: Path, start: int, mode: str, delay: float, pause: float = 0.0) -> tuple[int, list[int]]:
    """Start a saving child, SIGKILL it after ``delay`` seconds of saving; (pid, steps it committed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder), str(start), mode, str(pause)],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()  # reaped: the pid is dead for the next save's stale-temp sweep
    committed = [int(line) for line in proc.stdout.read().split()]
    proc.stdout.close()
    return proc.pid, committed


def check_consistent(prefix: str) -> float:
    """``prefix`` verifies and every variable holds one and the same value (the step it was saved at)."""
    reader = gv.CheckpointReader(prefix)
    assert reader.verify() == [], prefix
    with gv.Registry():
        loaded = gv.load_checkpoint(prefix, verify_first=True)
        values = {float(x) for v in loaded.values() for x in np.unique(v.numpy())}
    assert sorted(loaded) == ["v0", "v1", "v2", "v3"]
    assert len(values) == 1, f"{prefix}: a mix of values {values}"
    value = values.pop()
    if reader.global_step is not None:
        assert value == reader.global_step, prefix
    return value


def committed_prefixes(folder: Path) -> list[str]:
    return sorted(str(folder / n[: -len(".index.json")]) for n in os.listdir(folder) if n.endswith(".index.json"))


def temps_of(folder: Path, pid: int) -> list[str]:
    return [n for n in os.listdir(folder) if f".tmp-{pid}-" in n]


def save_after_crash(folder: Path, dead_pid: int, step: int) -> None:
    """A restarted job's save in the same folder succeeds and sweeps the dead process's temp files."""
    with gv.Registry():
        vs = [gv.Variable(np.full(3, step, np.float32), name=f"v{i}") for i in range(4)]
        gv.Saver(vs, max_to_keep=1).save(folder / "restarted", global_step=step)
    assert temps_of(folder, dead_pid) == []
    assert gv.latest_checkpoint(folder) == str(folder / f"restarted-{step}")
    check_consistent(str(folder / f"restarted-{step}"))


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_half_valid_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(1234)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    saw_temps = 0
    for trial in range(20):
        start = (trial + 1) * 1000
        pid, committed = run_and_kill(folder, start, "steps", rng.uniform(0.0, 0.15))
        saw_temps += bool(temps_of(folder, pid))
        latest = gv.latest_checkpoint(folder)
        if committed:
            assert latest is not None and os.path.basename(latest).startswith("model.ckpt-")
            step = int(latest.rsplit("-", 1)[1])
            assert committed[-1] <= step <= committed[-1] + 1  # the state file may be one commit ahead of the print
        if latest is not None:
            check_consistent(latest)
        for prefix in committed_prefixes(folder):  # no committed checkpoint is half-valid
            check_consistent(prefix)
        save_after_crash(folder, pid, 900_000 + trial)
    assert saw_temps > 0, "no kill landed inside a save; the test exercised nothing"


@pytest.mark.slow
def test_sigkill_while_saving_over_the_same_prefix(tmp_path: Path) -> None:
    rng = random.Random(99)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    prefix = str(folder / "same")
    before: float | None = None
    outcomes = set()
    for trial in range(16):
        start = (trial + 1) * 1000
        pid, committed = run_and_kill(folder, start, "same", rng.uniform(0.0, 0.1), pause=0.006)
        last = committed[-1] if committed else start - 1
        if os.path.exists(prefix + ".index.json"):
            value = check_consistent(prefix)  # the new whole checkpoint (never the old index with new data)
            assert value == before or start <= value <= last + 1, (value, before, start, last)
            outcomes.add("whole")
            before = value
        else:
            outcomes.add("absent")
            with pytest.raises(gv.CheckpointNotFoundError):
                gv.load_checkpoint(prefix)
            before = None
        save_after_crash(folder, pid, 900_000 + trial)
    assert outcomes == {"whole", "absent"}
