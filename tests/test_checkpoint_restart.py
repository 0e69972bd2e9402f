"""A restarted job's Saver: it adopts the folder's kept checkpoints (TF2's CheckpointManager)
or is told them (TF1's ``recover_last_checkpoints``), so ``max_to_keep`` spans restarts."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpuvars as gv


def job(max_to_keep: int | None = 2, **kwargs: Any) -> tuple[gv.Saver, list[gv.Variable]]:
    """A fresh process's model and Saver (variables kept by the caller)."""
    vs = [gv.Variable(np.ones(3, np.float32), name="w")]
    return gv.Saver(vs, max_to_keep=max_to_keep, **kwargs), vs


def indexes(folder: Path) -> list[str]:
    return sorted(n[: -len(".index.json")] for n in os.listdir(folder) if n.endswith(".index.json"))


def test_restarted_saver_adopts_the_kept_checkpoints(tmp_path: Path) -> None:
    """Regression: the new Saver's max_to_keep never deleted the previous run's checkpoints
    and its first save dropped them from the state file."""
    with gv.Registry():
        saver, _vs = job()
        p1, p2 = (saver.save(tmp_path / "m", global_step=s) for s in (1, 2))
    with gv.Registry():  # the restarted job
        saver, _vs = job()
        p3 = saver.save(tmp_path / "m", global_step=3)
        assert saver.last_checkpoints == [p2, p3]
        cs = gv.get_checkpoint_state(tmp_path)
        assert cs is not None and cs.all_model_checkpoint_paths == [p2, p3]
        assert indexes(tmp_path) == ["m-2", "m-3"]
        p4 = saver.save(tmp_path / "m", global_step=4)
        assert indexes(tmp_path) == ["m-3", "m-4"] and saver.last_checkpoints == [p3, p4]
    assert not os.path.exists(p1 + ".safetensors")


def test_adoption_skips_checkpoints_whose_files_are_gone(tmp_path: Path) -> None:
    with gv.Registry():
        saver, _vs = job(max_to_keep=5)
        p1, p2 = (saver.save(tmp_path / "m", global_step=s) for s in (1, 2))
    os.unlink(p1 + ".index.json")
    with gv.Registry():
        saver, _vs = job(max_to_keep=5)
        p3 = saver.save(tmp_path / "m", global_step=3)
        assert saver.last_checkpoints == [p2, p3]


def test_adoption_carries_the_keep_every_n_hours_clock(tmp_path: Path) -> None:
    with gv.Registry():
        saver, _vs = job(max_to_keep=1)
        saver.save(tmp_path / "m", global_step=1)
    before = gv.get_checkpoint_state(tmp_path)
    assert before is not None
    with gv.Registry():
        saver, _vs = job(max_to_keep=1)
        saver.save(tmp_path / "m", global_step=2)
    after = gv.get_checkpoint_state(tmp_path)
    assert after is not None and after.last_preserved_timestamp == before.last_preserved_timestamp


def test_adoption_of_a_damaged_state_file_starts_afresh_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with gv.Registry():
        saver, _vs = job()
        saver.save(tmp_path / "m", global_step=1)
    (tmp_path / "checkpoint").write_text("{")
    with gv.Registry(), caplog.at_level(logging.WARNING, logger="gpuvars"):
        saver, _vs = job()
        p2 = saver.save(tmp_path / "m", global_step=2)
    assert "not valid JSON" in caplog.text and "starts a new list" in caplog.text
    assert saver.last_checkpoints == [p2] and gv.latest_checkpoint(tmp_path) == p2


def test_recover_last_checkpoints_from_the_state(tmp_path: Path) -> None:
    with gv.Registry():
        saver, _vs = job(max_to_keep=None)
        ps = [saver.save(tmp_path / "m", global_step=s) for s in range(1, 5)]
    with gv.Registry():
        saver, _vs = job(max_to_keep=3)
        cs = gv.get_checkpoint_state(tmp_path)
        assert cs is not None
        saver.recover_last_checkpoints(cs.all_model_checkpoint_paths[1:] + [str(tmp_path / "m-99")])  # a missing one is skipped
        assert saver.last_checkpoints == ps[1:]
        p5 = saver.save(tmp_path / "m", global_step=5)
        assert saver.last_checkpoints == [ps[2], ps[3], p5]
        assert indexes(tmp_path) == ["m-1", "m-3", "m-4", "m-5"]  # m-1 was not in the recovered list: not ours to delete
        with pytest.raises(gv.InvalidArgumentError, match="checkpoint_paths"):
            saver.recover_last_checkpoints("m-1")  # type: ignore[arg-type]
