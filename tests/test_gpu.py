"""GPU placement, co-location, in-place updates, transfers, scatter ops and on-device
random draws, with CuPy and with JAX as the GPU backend.

Every test is marked ``gpu`` (``multi_gpu`` when it needs two devices) and is skipped
where no GPU is usable; each GPU library is also skipped by itself when only the other
one can reach the GPUs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gpuvars_backends as backends
import gpuvars as gv
from conftest import jax_device_of
from gpuvars import config

pytestmark = pytest.mark.gpu

SCATTERS = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.true_divide,
    "min": np.minimum,
    "max": np.maximum,
}


def gpu_count(library: str) -> int:
    return backends.probe(library, "gpu").count


def need_two(library: str) -> None:
    if gpu_count(library) < 2:
        pytest.skip(f"{library} sees {gpu_count(library)} GPU(s); this test needs 2")


def device_index(library: str, array: Any) -> int:
    """The GPU index holding ``array``, asked of its own library."""
    if library == "cupy":
        import cupy

        assert isinstance(array, cupy.ndarray)
        return int(array.device.id)
    import jax

    gpus = jax.devices("gpu")
    return gpus.index(jax_device_of(array))


def data_ptr(array: Any) -> int:
    """The device address of a CuPy array's buffer."""
    return int(array.data.ptr)


# --- placement ------------------------------------------------------------------------------


def test_gpus_are_listed_and_gpu0_is_the_default(gpu_lib: str) -> None:
    devices = gv.list_devices()
    assert "/gpu:0" in devices and devices[0] == "/cpu:0"
    assert len([d for d in devices if d.startswith("/gpu")]) == gpu_count(gpu_lib)
    v = gv.Variable(np.ones(3, np.float32), name="v")
    assert v.device == "/gpu:0" and v.backend == gpu_lib
    assert device_index(gpu_lib, v.value()) == 0


def test_placement_on_gpu0(gpu_lib: str) -> None:
    v = gv.Variable(np.arange(4, dtype=np.float32), name="v", device="/gpu:0")
    assert v.device == "/gpu:0" and v.physical_device.kind == "gpu"
    assert device_index(gpu_lib, v.value()) == 0
    host = v.numpy()
    assert type(host) is np.ndarray and host.tolist() == [0.0, 1.0, 2.0, 3.0]
    np.testing.assert_array_equal(np.asarray(v), host)  # a copy to the host
    with pytest.raises(ValueError, match="a host array needs a copy"):
        np.asarray(v, copy=False)


@pytest.mark.multi_gpu
def test_placement_on_gpu1(gpu_lib: str) -> None:
    need_two(gpu_lib)
    with gv.device("/gpu:1"):
        v = gv.Variable(np.arange(4, dtype=np.float32), name="v")
        w = gv.Variable(gv.zeros([4]), name="w")
    w.initializer()
    assert v.device == w.device == "/gpu:1"
    assert device_index(gpu_lib, v.value()) == 1 and device_index(gpu_lib, w.value()) == 1


def test_missing_gpu_index_falls_back_softly(gpu_lib: str) -> None:
    n = gpu_count(gpu_lib)
    with pytest.warns(gv.PlacementWarning, match=rf"'/gpu:{n}' is not available .* using '/gpu:0' instead"):
        v = gv.Variable(1.0, name="v", device=f"/gpu:{n}")
    assert v.device == "/gpu:0"
    config.set_soft_device_placement(False)
    with pytest.raises(gv.DevicePlacementError, match=rf"'/gpu:{n}' for variable 'w'.*has {n} GPU device"):
        gv.Variable(1.0, name="w", device=f"/gpu:{n}")


# --- in place and co-location ----------------------------------------------------------------------


def test_cupy_updates_in_place() -> None:
    if not backends.probe("cupy", "gpu").usable:
        pytest.skip("CuPy cannot use a GPU here")
    import cupy

    config.set_gpu_backend("cupy")
    v = gv.Variable(np.zeros((4, 2), np.float32), name="v", device="/gpu:0")
    before = data_ptr(v.value())
    v.assign(np.ones((4, 2), np.float32))
    v.assign(cupy.full((4, 2), 2.0, cupy.float32))
    v.assign_add(np.ones((4, 2), np.float32))
    v.assign_sub([[1.0, 1.0]] * 4)
    v.scatter_update([0], [[5.0, 5.0]])
    v.scatter_add([1, 1], np.ones((2, 2), np.float32))
    v.scatter_mul([2, 2], np.full((2, 2), 2.0, np.float32))
    assert data_ptr(v.value()) == before
    np.testing.assert_array_equal(v.numpy(), [[5, 5], [4, 4], [8, 8], [2, 2]])
    snap = v.read_value()
    assert isinstance(snap, cupy.ndarray) and data_ptr(snap) != before
    out = cupy.from_dlpack(v)
    np.testing.assert_array_equal(cupy.asnumpy(out), v.numpy())


def test_jax_updates_rebind_on_the_same_gpu() -> None:
    if not backends.probe("jax", "gpu").usable:
        pytest.skip("JAX cannot use a GPU here")
    config.set_gpu_backend("jax")
    v = gv.Variable(np.zeros(3, np.float32), name="v", device="/gpu:0")
    old = v.value()
    v.assign_add(np.ones(3, np.float32))
    assert v.value() is not old and device_index("jax", v.value()) == 0
    assert v.numpy().tolist() == [1.0, 1.0, 1.0]


def test_updates_ignore_a_conflicting_cpu_scope(gpu_lib: str) -> None:
    v = gv.Variable(np.arange(4, dtype=np.float32), name="v", device="/gpu:0")
    with gv.device("/cpu:0"):
        v.assign_add(np.ones(4, np.float32))
        v.scatter_max([0], [9.0])
        v.assign_sub([1.0, 1.0, 1.0, 1.0])
    assert v.device == "/gpu:0" and device_index(gpu_lib, v.value()) == 0
    assert v.numpy().tolist() == [8.0, 1.0, 2.0, 3.0]


@pytest.mark.multi_gpu
def test_updates_ignore_a_conflicting_gpu_scope(gpu_lib: str) -> None:
    need_two(gpu_lib)
    v = gv.Variable(np.zeros(4, np.float32), name="v", device="/gpu:1")
    before = data_ptr(v.value()) if gpu_lib == "cupy" else None
    with gv.device("/gpu:0"):
        v.assign(np.ones(4, np.float32))
        v.assign_add(np.ones(4, np.float32))
        v.scatter_add([0, 0], [1.0, 1.0])
    assert v.device == "/gpu:1" and device_index(gpu_lib, v.value()) == 1
    assert v.numpy().tolist() == [4.0, 2.0, 2.0, 2.0]
    if gpu_lib == "cupy":
        assert data_ptr(v.value()) == before


# --- transfers ------------------------------------------------------------------------------------


@pytest.mark.multi_gpu
def test_cross_gpu_assign_lands_on_the_destination(gpu_lib: str) -> None:
    need_two(gpu_lib)
    a = gv.Variable(np.zeros(3, np.float32), name="a", device="/gpu:0")
    b = gv.Variable(np.arange(3, dtype=np.float32), name="b", device="/gpu:1")
    a.assign(b)
    assert device_index(gpu_lib, a.value()) == 0
    assert a.numpy().tolist() == [0.0, 1.0, 2.0]
    a.assign_add(b.value())  # a raw array living on /gpu:1
    assert device_index(gpu_lib, a.value()) == 0
    assert a.numpy().tolist() == [0.0, 2.0, 4.0]
    with config.transfer_guard("disallow"):
        with pytest.raises(gv.TransferGuardError, match=r"variable 'a' on /gpu:0: implicit device-to-device copy of variable 'b' on /gpu:1"):
            a.assign(b)
        with pytest.raises(gv.TransferGuardError, match="device-to-device"):
            a.assign_add(b.value())
        a.assign(gv.copy_to(b, "/gpu:0"))  # explicit: allowed
    assert device_index(gpu_lib, a.value()) == 0
    assert a.numpy().tolist() == [0.0, 1.0, 2.0]


def test_host_to_device_refused_under_disallow(gpu_lib: str) -> None:
    v = gv.Variable(np.zeros(3, np.float32), name="v", device="/gpu:0")
    host_var = gv.Variable(np.ones(3, np.float32), name="h", device="/cpu:0")
    with config.transfer_guard("disallow"):
        for value in (np.ones(3, np.float32), [1.0, 2.0, 3.0], host_var):
            with pytest.raises(gv.TransferGuardError, match=r"assign to variable 'v' on /gpu:0: implicit host-to-device copy"):
                v.assign(value)
        with pytest.raises(gv.TransferGuardError, match="host-to-device"):
            v.scatter_update([0], [1.0])
        on_device = gv.copy_to(np.full(3, 7.0, np.float32), "/gpu:0")
        v.assign(on_device)  # already on the device: no transfer
        w = gv.Variable(np.ones(2, np.float32), name="w", device="/gpu:0")  # creation is explicit
    assert v.numpy().tolist() == [7.0, 7.0, 7.0] and w.initialized


def test_host_to_device_is_logged(gpu_lib: str, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    v = gv.Variable(np.zeros(2, np.float32), name="v", device="/gpu:0")
    with caplog.at_level(logging.WARNING, logger="gpuvars"), config.transfer_guard("log"):
        v.assign(np.ones(2, np.float32))
    assert any("implicit host-to-device copy of ndarray from host memory" in r.getMessage() for r in caplog.records)


# --- scatter and random ------------------------------------------------------------------------------


@pytest.mark.parametrize("op", sorted(SCATTERS))
def test_scatter_ops_on_gpu_match_numpy(gpu_lib: str, op: str) -> None:
    start = np.array([[1.0, 2.0], [4.0, -8.0], [0.5, 3.0]], np.float32)
    indices = [2, 0, 2, 2]
    updates = np.array([[2.0, 0.5], [4.0, 4.0], [0.25, 2.0], [-1.0, 8.0]], np.float32)
    expected = start.copy()
    SCATTERS[op].at(expected, indices, updates)
    v = gv.Variable(start, name="v", device="/gpu:0")
    getattr(v, f"scatter_{op}")(indices, updates)
    assert device_index(gpu_lib, v.value()) == 0
    np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["int8", "int16", "uint8", "int64", "float16", "complex64"])
@pytest.mark.parametrize("op", ["add", "sub", "max", "min"])
def test_scatter_with_repeats_in_dtypes_the_atomic_kernels_lack(gpu_lib: str, op: str, dtype: str) -> None:
    """cupyx's atomic scatter_add / min / max refuse these dtypes (a raw TypeError): they go
    round by round instead, with numpy's results."""
    dt = np.dtype(dtype)
    if dt.kind == "c" and op in ("max", "min"):
        pytest.skip("complex numbers have no order (numpy's maximum.at compares them lexically; gpuvars does not test it)")
    if dt == np.int64 and gpu_lib == "jax":
        pytest.skip("JAX without x64 holds no int64 variables")
    start = np.arange(6).reshape(3, 2).astype(dt)
    indices = [2, 0, 2, 2]
    updates = np.array([[2, 1], [4, 4], [1, 2], [3, 5]]).astype(dt)
    expected = start.copy()
    SCATTERS[op].at(expected, indices, updates)
    v = gv.Variable(start, name="v", device="/gpu:0")
    getattr(v, f"scatter_{op}")(indices, updates)
    np.testing.assert_array_equal(v.numpy(), expected)


def test_scatter_update_and_integer_division_on_gpu(gpu_lib: str) -> None:
    v = gv.Variable(np.zeros((4, 2), np.float32), name="v", device="/gpu:0")
    v.scatter_update([3, 1], [[1.0, 2.0], [3.0, 4.0]])
    assert v.numpy().tolist() == [[0, 0], [3, 4], [0, 0], [1, 2]]
    i = gv.Variable(np.array([9, 7, -7, 5], np.int32), name="i", device="/gpu:0")
    i.scatter_div([0, 0, 2, 3], np.array([2, 2, 2, 5], np.int32))
    expected = np.array([9, 7, -7, 5], np.int32)
    np.true_divide.at(expected, [0, 0, 2, 3], np.array([2, 2, 2, 5], np.int32))
    np.testing.assert_array_equal(i.numpy(), expected)


def test_random_initializers_draw_on_the_gpu(gpu_lib: str) -> None:
    gv.set_random_seed(11)
    n = gv.Variable(gv.random_normal([400, 500], mean=1.0, stddev=2.0), name="n", device="/gpu:0")
    t = gv.Variable(gv.truncated_normal([400, 500], stddev=0.5), name="t", device="/gpu:0")
    g = gv.Variable(gv.initializers.GlorotUniform(), shape=(400, 500), name="g", device="/gpu:0")
    gv.global_variables_initializer()()
    for v in (n, t, g):
        assert device_index(gpu_lib, v.value()) == 0 and v.dtype == np.float32
    x, y, z = n.numpy(), t.numpy(), g.numpy()
    assert abs(x.mean() - 1.0) < 0.02 and abs(x.std() - 2.0) < 0.02
    assert np.abs(y).max() <= 1.0
    limit = np.sqrt(6.0 / 900.0)
    assert z.min() >= -limit and z.max() <= limit


@pytest.mark.multi_gpu
def test_random_draws_on_gpu1(gpu_lib: str) -> None:
    need_two(gpu_lib)
    v = gv.Variable(gv.random_uniform([1000]), name="v", device="/gpu:1")
    w = gv.Variable(v.initialized_value() * 2, name="w", device="/gpu:0")
    gv.global_variables_initializer()()
    assert device_index(gpu_lib, v.value()) == 1 and device_index(gpu_lib, w.value()) == 0
    np.testing.assert_array_equal(w.numpy(), 2 * v.numpy())


def test_gpu_backend_random_is_reproducible(gpu_lib: str) -> None:
    backend = backends.get(gpu_lib, "gpu")
    f32 = np.dtype(np.float32)
    a = backend.to_numpy(backend.random("normal", (64,), f32, 5, 0, (0.0, 1.0)))
    b = backend.to_numpy(backend.random("normal", (64,), f32, 5, 0, (0.0, 1.0)))
    np.testing.assert_array_equal(a, b)
    backend.synchronize(0)


@pytest.mark.multi_gpu
def test_gpu_backend_copies_across_devices(gpu_lib: str) -> None:
    need_two(gpu_lib)
    backend = backends.get(gpu_lib, "gpu")
    src = backend.asarray(np.arange(4), np.dtype(np.float32), 1)
    out = backend.asarray(src, np.dtype(np.float64 if gpu_lib == "cupy" else np.float32), 0)
    assert backend.device_of(out) == 0 and backend.device_of(src) == 1
    np.testing.assert_array_equal(backend.to_numpy(out), [0.0, 1.0, 2.0, 3.0])


def test_cupy_refuses_bfloat16() -> None:
    if not backends.probe("cupy", "gpu").usable:
        pytest.skip("CuPy cannot use a GPU here")
    import ml_dtypes

    config.set_gpu_backend("cupy")
    with pytest.raises(gv.InvalidArgumentError, match=r"variable 'b' on /gpu:0: CuPy has no bfloat16 arrays"):
        gv.Variable(np.zeros(2, ml_dtypes.bfloat16), name="b", device="/gpu:0")
