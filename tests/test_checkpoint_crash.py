"""Crash safety: a saving process SIGKILLed at random points never leaves a half-valid checkpoint.

A child process trains and saves in a loop (blocking saves, and ``blocking=False`` saves
whose variables are mutated right after the call) and reports each commit; the test kills
it with SIGKILL at random moments and then checks the folder the way a restarted job would
see it: ``latest_checkpoint`` restores, every prefix with an index verifies, each tensor
holds the value the child had at a save call, and the next save sweeps the dead writer's
temporary files. The children are forked from a server that imported gpuvars once
(tests/fault_child.py), so a case costs milliseconds. ``GPUVARS_LONG_FAULTS=1`` runs ten
times the cases (see conftest.fault_cases).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

import gpuvars as gv
from conftest import fault_cases, has_async_save, needs_async_save
from fault_child import ForkServer  # the fork_server fixture (conftest)

N = 65536  # float32 elements per variable: 4 variables, 1 MiB per checkpoint


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
    assert value >= 0, f"{prefix} holds {value}: a value assigned after the save call"
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
        vs = [gv.Variable(np.full(N, step, np.float32), name=f"v{i}") for i in range(4)]
        gv.Saver(vs, max_to_keep=1).save(folder / "restarted", global_step=step)
    assert temps_of(folder, dead_pid) == []
    assert gv.latest_checkpoint(folder) == str(folder / f"restarted-{step}")
    check_consistent(str(folder / f"restarted-{step}"))


def restore_latest(folder: Path) -> str | None:
    """What a restarted job does: restore ``latest_checkpoint`` into its variables, verified first."""
    latest = gv.latest_checkpoint(folder)
    if latest is not None:
        with gv.Registry():
            vs = [gv.Variable(np.full(N, -1.0, np.float32), name=f"v{i}") for i in range(4)]
            gv.Saver(vs).restore(latest, verify_first=True)
            values = {float(x) for v in vs for x in np.unique(v.numpy())}
            assert len(values) == 1 and values.pop() >= 0, (latest, values)
    return latest


def delays(rng: random.Random, trial: int, longest: float) -> float:
    """Several delays: right after the start (the first save), and anywhere in later saves."""
    return rng.uniform(0.0, 0.02) if trial % 4 == 0 else rng.uniform(0.0, longest)


MODES = [
    pytest.param(dict(blocking=True), id="blocking"),
    pytest.param(dict(blocking=False, mutate_after=True), id="async-mutated-after-the-call", marks=needs_async_save),
]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_sigkill_during_saves_never_leaves_a_half_valid_checkpoint(
    fork_server: ForkServer, tmp_path: Path, mode: dict[str, bool]
) -> None:
    rng = random.Random(1234)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    saw_temps = 0
    trials = fault_cases(30)
    for trial in range(trials):
        start = (trial + 1) * 1000
        pid, committed = fork_server.run_and_kill(folder, start, "steps", delays(rng, trial, 0.15), n=N, **mode)
        saw_temps += bool(temps_of(folder, pid))
        latest = restore_latest(folder)
        if committed:
            assert latest is not None and os.path.basename(latest).startswith("model.ckpt-")
            step = int(latest.rsplit("-", 1)[1])
            assert committed[-1] <= step <= committed[-1] + 1  # the state file may be one commit ahead of the print
        if latest is not None:
            check_consistent(latest)
        for prefix in committed_prefixes(folder):  # no committed checkpoint is half-valid
            check_consistent(prefix)
        save_after_crash(folder, pid, 900_000 + trial)
    assert saw_temps > trials // 4, f"only {saw_temps} of {trials} kills landed inside a save"


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_sigkill_while_saving_over_the_same_prefix(fork_server: ForkServer, tmp_path: Path, mode: dict[str, bool]) -> None:
    rng = random.Random(99)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    prefix = str(folder / "same")
    before: float | None = None
    outcomes = set()
    for trial in range(fault_cases(24)):
        start = (trial + 1) * 1000
        pid, committed = fork_server.run_and_kill(folder, start, "same", delays(rng, trial, 0.1), n=N, pause=0.006, **mode)
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


def test_fork_server_children_really_save(fork_server: ForkServer, tmp_path: Path) -> None:
    """The harness itself: a child given time commits several checkpoints, each holding its step."""
    pid, committed = fork_server.run_and_kill(tmp_path, 7, "steps", 0.5, n=N, blocking=not has_async_save(), mutate_after=True)
    assert len(committed) >= 3 and committed == list(range(7, 7 + len(committed)))
    on_disk = {check_consistent(p) for p in committed_prefixes(tmp_path)}
    # max_to_keep=3; the kill may land between a commit and its report, or before a deletion
    assert set(committed[-2:]) <= on_disk <= set(committed[-4:]) | {committed[-1] + 1}, (committed, on_disk)
