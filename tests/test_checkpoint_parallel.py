"""The threaded I/O path (large checkpoints): same results, same damage handling.

The threshold is lowered so small test checkpoints take the parallel path.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as hs

import gpuvars as gv
from gpuvars.checkpoint import _parallel


@pytest.fixture(autouse=True)
def parallel_always(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_parallel, "MIN_PARALLEL_BYTES", 0)
    monkeypatch.setattr(_parallel, "THREADS", 3)


@given(hs.lists(hs.integers(0, 1000), max_size=40), hs.integers(1, 6))
def test_split_keeps_order_and_everything(sizes: list[int], parts: int) -> None:
    items = list(range(len(sizes)))
    runs = _parallel.split(items, sizes, parts)
    assert [i for r in runs for i in r] == items
    assert len(runs) <= max(1, parts) and all(runs)


def _model(n: int = 7) -> list[gv.Variable]:
    return [gv.Variable(np.full((100, 9), k, np.float32), name=f"v{k}") for k in range(n)]


def test_parallel_restore_fills_every_variable_in_place(tmp_path) -> None:
    vs = _model()
    saver = gv.Saver()
    prefix = saver.save(str(tmp_path / "m"))
    buffers = [v.value().__array_interface__["data"][0] for v in vs]
    for v in vs:
        v.assign(np.zeros((100, 9), np.float32))
    saver.restore(prefix)
    for k, v in enumerate(vs):
        assert (v.numpy() == k).all()
    assert [v.value().__array_interface__["data"][0] for v in vs] == buffers
    assert gv.CheckpointReader(prefix).verify() == []


def test_parallel_restore_damage_marks_started_variables(tmp_path) -> None:
    vs = _model()
    saver = gv.Saver()
    prefix = saver.save(str(tmp_path / "m"))
    from gpuvars.checkpoint import _stformat as st

    with st.SafetensorsReader(prefix + ".safetensors") as r:
        begin = r.tensors["v5"].begin
    with open(prefix + ".safetensors", "r+b") as f:
        f.seek(begin + 7)
        byte = f.read(1)
        f.seek(begin + 7)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert gv.CheckpointReader(prefix).verify() == ["v5"]
    with pytest.raises(gv.CheckpointCorruptError, match="v5") as info:
        saver.restore(prefix)
    assert "marked uninitialized" in str(info.value)
    assert not vs[5].initialized  # the damaged one is never left holding a mix
    # verify_first leaves everything untouched
    for k, v in enumerate(vs):
        v.assign(np.full((100, 9), -1, np.float32))
    with pytest.raises(gv.CheckpointCorruptError, match="nothing was restored"):
        saver.restore(prefix, verify_first=True)
    assert all(v.initialized and (v.numpy() == -1).all() for v in vs)
