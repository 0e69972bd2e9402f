"""gv.optim on GPUs: the CuPy kernels and the JAX-GPU jit follow the published rules, slots
live on the variable's GPU, a save in flight keeps the values of its call, and the JAX path
never deletes an array someone else holds (no buffer donation). Run by ``bash bench/gpu.sh``."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpuvars as gv
from gpuvars import config
from gpuvars.checkpoint import _stformat
from test_optim import CASES, _problem

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name, make, ref", CASES, ids=[c[0] for c in CASES])
def test_gpu_optimizers_follow_the_published_rules(gpu_lib: str, name: str, make: Any, ref: Any) -> None:
    p0, grads = _problem(hash(name) % 1000)
    w = gv.Variable(p0.astype(np.float32), name="w", device="/gpu:0")
    opt = make()
    p, state = p0.copy(), {}
    for t, g in enumerate(grads, start=1):
        opt.apply_gradients([(g.astype(np.float32), w)])  # a host gradient: an implicit copy to the GPU
        p = ref(p, g, state, t)
    np.testing.assert_allclose(w.numpy(), p, rtol=2e-5, atol=2e-5)
    for s in opt.get_slot_names():
        assert opt.get_slot(w, s).device == "/gpu:0" and opt.get_slot(w, s).backend == gpu_lib


def test_gpu_gradients_of_the_gpus_own_library(gpu_lib: str) -> None:
    w = gv.Variable(np.ones(1 << 20, np.float32), name="w", device="/gpu:0")
    g = gv.copy_to(np.full(1 << 20, 0.5, np.float32), "/gpu:0")  # already on the GPU: no transfer
    opt = gv.optim.SGD(0.1, momentum=0.9)
    with config.transfer_guard("disallow"):
        opt.apply_gradients([(g, w)])
    assert float(w.numpy()[0]) == pytest.approx(0.95)


def test_an_async_save_keeps_the_gpu_values_of_its_call_across_optimizer_steps(gpu_lib: str, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real = _stformat.SafetensorsWriter.write

    def held(self: Any, name: str, data: object) -> None:
        assert gate.wait(60)
        real(self, name, data)

    monkeypatch.setattr(_stformat.SafetensorsWriter, "write", held)
    w = gv.Variable(np.ones(1 << 20, np.float32), name="w", device="/gpu:0")
    opt = gv.optim.Adam(0.1)
    opt.apply_gradients([(np.ones(1 << 20, np.float32), w)])
    before = {v.name: v.numpy() for v in [w, *opt.variables()]}
    fut = gv.Saver().save(tmp_path / "m", blocking=False)
    for _ in range(3):
        opt.apply_gradients([(np.ones(1 << 20, np.float32), w)])  # JAX: no donation, the save's arrays stay
    gate.set()
    with gv.CheckpointReader(fut.result()) as reader:
        reader.verify()
        for name, value in before.items():
            np.testing.assert_array_equal(reader.get_tensor(name), value)


def test_a_jax_gpu_optimizer_step_deletes_no_array_anyone_holds(gpu_lib: str) -> None:
    """Donation would delete the caller's array a variable adopted, a value() kept from before
    the step, and fail outright on a buffer two variables share."""
    if gpu_lib != "jax":
        pytest.skip("CuPy updates in place: nothing is donated or rebound")
    import jax

    mine = jax.device_put(np.ones(1024, np.float32), jax.devices("gpu")[0])
    a = gv.Variable(mine, name="a", device="/gpu:0")  # may adopt the caller's array as it is
    b = gv.Variable(np.zeros(1024, np.float32), name="b", device="/gpu:0")
    b.assign(a.value())  # two variables on one buffer
    kept = a.value()
    gv.optim.Adam(0.1).apply_gradients([(np.ones(1024, np.float32), a), (np.ones(1024, np.float32), b)])
    np.testing.assert_array_equal(np.asarray(mine), 1.0)
    np.testing.assert_array_equal(np.asarray(kept), 1.0)
    assert float(a.numpy()[0]) == pytest.approx(0.9) and float(b.numpy()[0]) == pytest.approx(0.9)
