"""How a device tensor that is not host memory streams to the writer (the JAX-on-GPU path of
``_transfer._device_chunks``), exercised with JAX CPU arrays: blocks of whole rows, each a
slice along axis 0 (no whole-tensor copy on the device), whose bytes concatenate to the
tensor's, for scalars, empty tensors, rows bigger than a chunk and odd row counts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gpuvars import config
from gpuvars.checkpoint import _transfer
from gpuvars.placement import resolve

jax = pytest.importorskip("jax")


@pytest.fixture
def jax_cpu() -> Any:
    config.set_cpu_backend("jax")
    return resolve("/cpu:0")


@pytest.mark.parametrize("shape, chunk, blocks", [
    ((), 16, 1),  # a scalar: one element
    ((0, 3), 16, 0),  # no rows: nothing to write
    ((7, 3), 24, 4),  # 12-byte rows, 2 a chunk: 2 + 2 + 2 + 1
    ((3, 10), 16, 3),  # a 40-byte row is bigger than a chunk: one row each
    ((5,), 8, 3),  # 1-d: rows are elements, 2 a chunk
    ((4, 0), 16, 1),  # empty rows: one empty block
])
def test_device_chunks_are_row_blocks_with_the_tensors_bytes(jax_cpu: Any, monkeypatch: pytest.MonkeyPatch,
                                                              shape: tuple[int, ...], chunk: int, blocks: int) -> None:
    monkeypatch.setattr(_transfer, "CHUNK_BYTES", chunk)
    host = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    value = jax.device_put(host, jax.devices("cpu")[0])
    chunks = list(_transfer._device_chunks(jax_cpu, value, "saving 'w'"))
    assert len(chunks) == blocks
    assert all(isinstance(c, np.ndarray) and c.ndim == 1 and c.dtype == np.float32 for c in chunks)
    got = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    np.testing.assert_array_equal(got, host.reshape(-1))
