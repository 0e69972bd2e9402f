"""The second round of fixed-cost fast paths, on the cases they skip or could get wrong:

- the host scatter fast path (fancy-index assignment under the lock, the storage's row
  shape cached): 0-d and empty variables and indices, bfloat16, non-contiguous operands,
  duplicate indices, negative / out-of-range / uint64 >= 2**63 indices, broadcasting refused,
  a reshaped storage, a save in flight;
- the device fast paths (JAX on its CPU devices): an update whose operand already lives on
  the variable's device, a scatter with device indices and updates;
- ``load_checkpoint`` building plain variables directly (``variable.make_deferred``) and
  passing its parsed index to the restore; a restore into the existing buffer.

Every check compares against plain numpy computing the same thing; nothing is mocked.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import gpuvars as gv
from conftest import needs_jax

BF16 = np.dtype(ml_dtypes.bfloat16)


def _jax_cpu(i: int) -> Any:
    import jax

    return jax.devices("cpu")[i]


# --- host scatter ----------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["update", "add", "sub", "mul", "div", "min", "max"])
@pytest.mark.parametrize("idx_dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64])
def test_host_scatter_matches_numpy(op: str, idx_dtype: Any) -> None:
    init = np.arange(1, 9, dtype=np.float32)
    v = gv.Variable(init, name="v", device="/cpu:0")
    storage = v.value()
    idx = np.array([6, 1, 6, 3], idx_dtype)  # a duplicate
    upd = np.array([2.0, 3.0, 2.0, 5.0], np.float32)  # equal values at the duplicate for "update"
    getattr(v, f"scatter_{op}")(idx, upd)
    want = init.copy()
    if op == "update":
        want[idx] = upd
    else:
        ufunc = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.true_divide,
                 "min": np.minimum, "max": np.maximum}[op]
        ufunc.at(want, idx.astype(np.int64), upd)
    np.testing.assert_array_equal(v.numpy(), want)
    assert np.shares_memory(v.value(), storage)  # updated in place


def test_host_scatter_duplicates_accumulate() -> None:
    v = gv.Variable(np.zeros(4, np.float32), name="v", device="/cpu:0")
    v.scatter_add(np.array([2, 2, 2, 0]), np.ones(4, np.float32))
    np.testing.assert_array_equal(v.numpy(), [1, 0, 3, 0])


@pytest.mark.parametrize("bad", [-1, -4, 4, 2**31])
@pytest.mark.parametrize("op", ["update", "add"])
def test_host_scatter_bad_index_names_it_and_changes_nothing(op: str, bad: int) -> None:
    v = gv.Variable(np.arange(4, dtype=np.float32), name="w", device="/cpu:0")
    with pytest.raises(gv.InvalidArgumentError,
                       match=rf"scatter_{op} on variable 'w': index {bad} is out of range \[0, 4\)"):
        getattr(v, f"scatter_{op}")(np.array([0, bad, 1], np.int64), np.ones(3, np.float32))
    np.testing.assert_array_equal(v.numpy(), np.arange(4))


def test_host_scatter_refuses_uint64_past_int64() -> None:
    # numpy would cast such an index to a negative intp and write the last rows
    v = gv.Variable(np.zeros(4, np.float32), name="w", device="/cpu:0")
    for bad in (2**64 - 1, 2**63):
        with pytest.raises(gv.InvalidArgumentError, match=rf"index {bad} is out of range \[0, 4\)"):
            v.scatter_update(np.array([bad], np.uint64), np.ones(1, np.float32))
    np.testing.assert_array_equal(v.numpy(), np.zeros(4))
    v.scatter_update(np.array([3], np.uint64), np.ones(1, np.float32))
    np.testing.assert_array_equal(v.numpy(), [0, 0, 0, 1])


def test_host_scatter_many_indices() -> None:
    # past the small-count bounds check: a reduction over the indices
    v = gv.Variable(np.zeros(100, np.float32), name="w", device="/cpu:0")
    idx = np.arange(1000, dtype=np.int64) % 100
    v.scatter_add(idx, np.ones(1000, np.float32))
    np.testing.assert_array_equal(v.numpy(), np.full(100, 10.0))
    idx[500] = -2
    with pytest.raises(gv.InvalidArgumentError, match=r"index -2 is out of range \[0, 100\)"):
        v.scatter_add(idx, np.ones(1000, np.float32))
    np.testing.assert_array_equal(v.numpy(), np.full(100, 10.0))


def test_host_scatter_edges() -> None:
    scalar = gv.Variable(np.float32(1.0), name="s", device="/cpu:0")
    for idx, upd in ((np.array([0]), np.ones(1, np.float32)), (np.zeros(0, np.int64), np.zeros(0, np.float32))):
        with pytest.raises(gv.InvalidArgumentError, match="scatter_update on variable 's': a scalar variable has no rows"):
            scalar.scatter_update(idx, upd)
    assert scalar.numpy() == 1.0

    empty = gv.Variable(np.zeros((0, 3), np.float32), name="e", device="/cpu:0")
    empty.scatter_update(np.zeros(0, np.int64), np.zeros((0, 3), np.float32))  # nothing to do
    with pytest.raises(gv.InvalidArgumentError, match=r"index 0 is out of range \[0, 0\)"):
        empty.scatter_update(np.array([0]), np.zeros((1, 3), np.float32))

    v = gv.Variable(np.zeros((4, 3), np.float32), name="m", device="/cpu:0")
    v.scatter_update(np.zeros(0, np.int64), np.zeros((0, 3), np.float32))
    np.testing.assert_array_equal(v.numpy(), np.zeros((4, 3)))


def test_host_scatter_non_contiguous_operands() -> None:
    v = gv.Variable(np.zeros((6, 2), np.float32), name="m", device="/cpu:0")
    idx = np.array([0, 9, 2, 9, 4], np.int64)[::2]  # [0, 2, 4] viewed with a stride
    assert not idx.flags.c_contiguous
    upd = np.arange(12, dtype=np.float32).reshape(2, 6).T[::2]  # (3, 2), not C-contiguous
    assert not upd.flags.c_contiguous
    v.scatter_update(idx, upd)
    want = np.zeros((6, 2), np.float32)
    want[idx] = upd
    np.testing.assert_array_equal(v.numpy(), want)
    strided_idx = np.array([5, 9, 1, 9], np.int64)[::2]  # [5, 1], strided
    v.scatter_add(strided_idx, np.ones((2, 2), np.float32))
    want[[5, 1]] += 1
    np.testing.assert_array_equal(v.numpy(), want)


def test_host_scatter_bfloat16() -> None:
    v = gv.Variable(np.zeros(4, BF16), name="b", device="/cpu:0")
    v.scatter_update(np.array([1, 3]), np.array([1.5, -2.0], BF16))
    v.scatter_add(np.array([1, 1]), np.array([0.25, 0.25], BF16))
    assert v.dtype == BF16
    np.testing.assert_array_equal(v.numpy().astype(np.float32), [0, 2.0, 0, -2.0])


def test_host_scatter_refuses_a_broadcast_and_a_bad_dtype() -> None:
    v = gv.Variable(np.zeros((4, 3), np.float32), name="m", device="/cpu:0")
    for upd in (np.ones((1, 3), np.float32), np.ones((2, 1), np.float32), np.ones(3, np.float32)):
        with pytest.raises(gv.InvalidArgumentError, match=r"updates must have shape .* = \(2, 3\)"):
            v.scatter_update(np.array([0, 1]), upd)
    with pytest.raises(gv.InvalidArgumentError, match="float"):
        gv.Variable(np.zeros(4, np.int32), name="i", device="/cpu:0").scatter_update(
            np.array([0]), np.array([1.5], np.float32))
    v.scatter_update(np.array([0, 1]), np.ones((2, 3), np.float64))  # float64 -> float32: same_kind
    np.testing.assert_array_equal(v.numpy()[:2], np.ones((2, 3)))
    assert np.asarray(v).dtype == np.float32


def test_host_scatter_after_the_storage_changes_shape() -> None:
    # the cached row shape belongs to one buffer: a reshaping assign replaces it
    v = gv.Variable(np.zeros((2, 3), np.float32), name="d", shape=(None, None), device="/cpu:0")
    v.scatter_update(np.array([1]), np.ones((1, 3), np.float32))
    v.assign(np.zeros((3, 2), np.float32))
    with pytest.raises(gv.InvalidArgumentError, match=r"= \(1, 2\)"):
        v.scatter_update(np.array([1]), np.ones((1, 3), np.float32))
    v.scatter_update(np.array([2]), np.ones((1, 2), np.float32))
    np.testing.assert_array_equal(v.numpy(), [[0, 0], [0, 0], [1, 1]])


def test_host_scatter_waits_for_a_save_in_flight(tmp_path: Any, gate: threading.Event) -> None:
    v = gv.Variable(np.arange(4, dtype=np.float32), name="v", device="/cpu:0")
    saver = gv.Saver([v])
    fut = saver.save(str(tmp_path / "m"), blocking=False)
    assert not fut.done()  # the writer is held at the gate: nothing of v is written yet
    v.scatter_update(np.array([0, 3]), np.array([10.0, 30.0], np.float32))  # captures the old bytes first
    v.scatter_add(np.array([1, 1]), np.ones(2, np.float32))
    gate.set()
    prefix = fut.result(timeout=60)
    np.testing.assert_array_equal(v.numpy(), [10, 3, 2, 30])
    with gv.Registry():
        np.testing.assert_array_equal(gv.load_checkpoint(prefix)["v"].numpy(), np.arange(4))


# --- device fast paths (JAX CPU) ---------------------------------------------------------------------


@needs_jax
def test_jax_update_with_an_array_on_the_device() -> None:
    import jax

    gv.config.set_cpu_backend("jax")
    v = gv.Variable(np.arange(4, dtype=np.float32), name="j", device="/cpu:0")
    held = v.value()
    d = jax.device_put(np.ones(4, np.float32), _jax_cpu(0))
    v.assign_add(d)
    v.assign_sub(d * 3)
    np.testing.assert_array_equal(v.numpy(), np.arange(4) - 2)
    np.testing.assert_array_equal(np.asarray(held), np.arange(4))  # the old array is not donated
    v.assign(d)
    np.testing.assert_array_equal(v.numpy(), np.ones(4))
    # another dtype or shape takes the general path: a cast, or the shape error
    v.assign_add(jax.device_put(np.ones(4, np.int32), _jax_cpu(0)))
    assert v.dtype == np.float32
    np.testing.assert_array_equal(v.numpy(), np.full(4, 2.0))
    with pytest.raises(gv.InvalidArgumentError, match=r"Cannot add value to variable 'j': shape mismatch"):
        v.assign_add(jax.device_put(np.ones(3, np.float32), _jax_cpu(0)))
    b = gv.Variable(np.zeros(3, BF16), name="b", device="/cpu:0")
    b.assign_add(jax.device_put(np.full(3, 1.5, BF16), _jax_cpu(0)))
    np.testing.assert_array_equal(b.numpy().astype(np.float32), np.full(3, 1.5))


@needs_jax
def test_jax_update_from_another_device_is_still_judged() -> None:
    import jax

    gv.config.set_cpu_backend("jax")
    gv.config.set_logical_devices("cpu", 2)  # conftest started JAX with 4 CPU devices
    v = gv.Variable(np.zeros(4, np.float32), name="j", device="/cpu:0")
    d = jax.device_put(np.ones(4, np.float32), _jax_cpu(1))
    with gv.config.transfer_guard("disallow"):
        with pytest.raises(gv.TransferGuardError, match="implicit device-to-device copy"):
            v.assign_add(d)
        with pytest.raises(gv.TransferGuardError, match="implicit device-to-device copy"):
            v.scatter_update(jax.device_put(np.array([0]), _jax_cpu(1)), jax.device_put(np.ones(1, np.float32), _jax_cpu(1)))
    v.assign_add(d)  # allowed by default: copied to /cpu:0
    assert next(iter(v.value().devices())) == _jax_cpu(0)
    np.testing.assert_array_equal(v.numpy(), np.ones(4))


@needs_jax
@pytest.mark.parametrize("op", ["update", "add", "sub", "mul", "div", "min", "max"])
def test_jax_scatter_with_device_operands(op: str) -> None:
    import jax

    gv.config.set_cpu_backend("jax")
    dev = _jax_cpu(0)
    init = np.arange(1, 9, dtype=np.float32)
    v = gv.Variable(init, name="j", device="/cpu:0")
    idx = np.array([6, 1, 6, 3], np.int32)
    upd = np.array([2.0, 3.0, 2.0, 5.0], np.float32)
    getattr(v, f"scatter_{op}")(jax.device_put(idx, dev), jax.device_put(upd, dev))
    want = init.copy()
    if op == "update":
        want[idx] = upd
    else:
        ufunc = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.true_divide,
                 "min": np.minimum, "max": np.maximum}[op]
        ufunc.at(want, idx, upd)
    np.testing.assert_allclose(v.numpy(), want, rtol=1e-6)
    assert next(iter(v.value().devices())) == dev


@needs_jax
def test_jax_scatter_device_edges() -> None:
    import jax

    gv.config.set_cpu_backend("jax")
    dev = _jax_cpu(0)
    put = lambda a: jax.device_put(a, dev)  # noqa: E731
    v = gv.Variable(np.zeros((4, 2), np.float32), name="j", device="/cpu:0")
    held = v.value()
    for bad in (-1, 4):
        with pytest.raises(gv.InvalidArgumentError,
                           match=rf"scatter_update on variable 'j': index {bad} is out of range \[0, 4\)"):
            v.scatter_update(put(np.array([0, bad], np.int32)), put(np.ones((2, 2), np.float32)))
    np.testing.assert_array_equal(v.numpy(), np.zeros((4, 2)))
    v.scatter_add(put(np.zeros(0, np.int32)), put(np.zeros((0, 2), np.float32)))  # empty
    v.scatter_add(put(np.array([2, 2], np.uint32)), put(np.ones((2, 2), np.float32)))  # duplicates, unsigned
    np.testing.assert_array_equal(v.numpy(), [[0, 0], [0, 0], [2, 2], [0, 0]])
    np.testing.assert_array_equal(np.asarray(held), np.zeros((4, 2)))  # a held value stays as it was
    with pytest.raises(gv.InvalidArgumentError, match=r"updates must have shape .* = \(2, 2\)"):
        v.scatter_update(put(np.array([0, 1], np.int32)), put(np.ones((1, 2), np.float32)))
    scalar = gv.Variable(np.float32(1.0), name="s", device="/cpu:0")
    with pytest.raises(gv.InvalidArgumentError, match="a scalar variable has no rows"):
        scalar.scatter_update(put(np.array([0], np.int32)), put(np.ones(1, np.float32)))
    b = gv.Variable(np.zeros(3, BF16), name="b", device="/cpu:0")
    b.scatter_update(put(np.array([2], np.int32)), put(np.array([1.5], BF16)))
    np.testing.assert_array_equal(b.numpy().astype(np.float32), [0, 0, 1.5])


# --- load_checkpoint and restore ---------------------------------------------------------------------


def _save(tmp_path: Any, arrays: dict[str, np.ndarray], **kw: Any) -> str:
    with gv.Registry():
        vs = [gv.Variable(a, name=k, device="/cpu:0", trainable=(k != "frozen")) for k, a in arrays.items()]
        return gv.Saver(vs, **kw).save(str(tmp_path / "m"))


ARRAYS = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3),
    "scalar": np.array(3.5, np.float64),
    "empty": np.zeros((0, 4), np.int32),
    "bf": np.array([1.5, -2.0], BF16),
    "frozen": np.arange(3, dtype=np.int64),
}


def test_load_builds_plain_variables_as_gv_variable_does(tmp_path: Any) -> None:
    prefix = _save(tmp_path, ARRAYS)
    existing = gv.Variable(np.zeros(1, np.float32), name="w", device="/cpu:0")
    loaded = gv.load_checkpoint(prefix)
    assert set(loaded) == set(ARRAYS)
    for key, want in ARRAYS.items():
        var = loaded[key]
        assert type(var) is gv.Variable and var.device == "/cpu:0"
        assert var.dtype == want.dtype and var.shape == want.shape and var.declared_shape == want.shape
        np.testing.assert_array_equal(var.numpy(), want)
        assert var.trainable is (key != "frozen")
    assert loaded["w"].name == "w_1" and existing.name == "w"  # uniquified, key stable
    assert {v.name for v in gv.global_variables()} >= {"w", "w_1", "scalar", "empty", "bf", "frozen"}
    loaded["w"].assign(np.ones((2, 3), np.float32))
    gv.global_variables_initializer()()  # the initializer re-reads the checkpoint
    np.testing.assert_array_equal(loaded["w"].numpy(), ARRAYS["w"])
    with pytest.raises(gv.InvalidArgumentError, match="shape mismatch"):
        loaded["w"].assign(np.ones((3, 3), np.float32))  # the shape is fixed


def test_load_placement_by_argument_scope_and_device_function(tmp_path: Any) -> None:
    gv.config.set_logical_devices("cpu", 2)
    prefix = _save(tmp_path, {f"v{i}": np.full(2, i, np.float32) for i in range(4)})
    assert {v.device for v in gv.load_checkpoint(prefix, device="/cpu:1").values()} == {"/cpu:1"}
    with gv.Registry(), gv.device("/cpu:1"):
        assert {v.device for v in gv.load_checkpoint(prefix).values()} == {"/cpu:1"}
    picked: list[str] = []

    def by_name(op: Any) -> str:
        picked.append(op.name)
        return "/cpu:1" if op.name in ("v1", "v3") else "/cpu:0"

    with gv.Registry(), gv.device(by_name):
        loaded = gv.load_checkpoint(prefix)
    assert {k: v.device for k, v in loaded.items()} == {"v0": "/cpu:0", "v1": "/cpu:1", "v2": "/cpu:0", "v3": "/cpu:1"}
    assert sorted(picked) == ["v0", "v1", "v2", "v3"]  # asked once per variable


def test_load_with_saved_devices_soft_placement_warns_once(tmp_path: Any) -> None:
    gv.config.set_logical_devices("cpu", 2)
    with gv.Registry():
        vs = [gv.Variable(np.full(2, i, np.float32), name=f"v{i}", device=f"/cpu:{i % 2}") for i in range(4)]
        prefix = gv.Saver(vs, options=gv.SaveOptions(
            experimental_variable_policy=gv.VariablePolicy.SAVE_VARIABLE_DEVICES)).save(str(tmp_path / "m"))
    loaded = gv.load_checkpoint(prefix)
    assert {k: v.device for k, v in loaded.items()} == {"v0": "/cpu:0", "v1": "/cpu:1", "v2": "/cpu:0", "v3": "/cpu:1"}
    assert loaded.moved == {}
    with gv.Registry(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moved = gv.load_checkpoint(prefix, device_map={"/cpu:1": "/gpu:7"})
    assert [type(w.message) for w in caught] == [gv.PlacementWarning]
    assert moved.moved == {"v1": ("/cpu:1", "/cpu:0"), "v3": ("/cpu:1", "/cpu:0")}
    np.testing.assert_array_equal(moved["v3"].numpy(), np.full(2, 3))


def test_load_inside_a_strategy_scope_still_uses_its_creator(tmp_path: Any) -> None:
    gv.config.set_logical_devices("cpu", 2)
    prefix = _save(tmp_path, {"w": np.arange(3, dtype=np.float32)})
    strategy = gv.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        loaded = gv.load_checkpoint(prefix)
    w = loaded["w"]
    assert type(w).__name__ == "MirroredVariable"
    assert [c.device for c in w.values] == ["/cpu:0", "/cpu:1"]
    for c in w.values:
        np.testing.assert_array_equal(c.numpy(), np.arange(3))


def test_failed_load_leaves_nothing_registered(tmp_path: Any) -> None:
    prefix = _save(tmp_path, {"a": np.arange(64, dtype=np.float32), "b": np.ones(64, np.float32)})
    data = prefix + ".safetensors"
    with open(data, "r+b") as f:  # flip the last data byte: a checksum failure in the streaming pass
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    before = {v.name for v in gv.global_variables()}
    with pytest.raises(gv.CheckpointCorruptError, match="checksum"):
        gv.load_checkpoint(prefix)
    assert {v.name for v in gv.global_variables()} == before


def test_restore_writes_the_existing_buffer_and_keeps_views_valid(tmp_path: Any) -> None:
    arrays = {f"t{i}": np.full(16, i, np.float32) for i in range(40)}  # enough for a run of small tensors
    with gv.Registry():
        vs = [gv.Variable(a, name=k, device="/cpu:0") for k, a in arrays.items()]
        saver = gv.Saver(vs)
        prefix = saver.save(str(tmp_path / "m"))
        views = [v.value() for v in vs]
        for v in vs:
            v.assign(np.zeros(16, np.float32))
        saver.restore(prefix)
        for v, view, (k, a) in zip(vs, views, arrays.items()):
            np.testing.assert_array_equal(v.numpy(), a)
            np.testing.assert_array_equal(view, a)  # the same buffer, restored in place
            assert np.shares_memory(v.value(), view) and not view.flags.writeable
        v = vs[0]
        v.scatter_update(np.array([0]), np.array([7.0], np.float32))  # the fast path still sees this buffer
        assert views[0][0] == 7.0


@needs_jax
def test_jax_restore_adopts_its_host_buffer_and_keeps_every_dtype(tmp_path: Any) -> None:
    # the restore reads into an aligned private host buffer that JAX takes over through DLPack
    # (bfloat16 and bool, which DLPack lacks or not every importer takes, are copied instead)
    gv.config.set_cpu_backend("jax")
    arrays = {
        "f": np.arange(3 << 16, dtype=np.float32).reshape(3, -1),
        "bf": np.array([1.5, -2.0, 3.0], BF16),
        "flag": np.array([True, False]),
        "empty": np.zeros((0, 5), np.int32),
        "scalar": np.array(2.5, np.float32),
        "i8": np.arange(-3, 3, dtype=np.int8),
    }
    vs = {k: gv.Variable(a, name=k) for k, a in arrays.items()}
    held = vs["f"].value()
    saver = gv.Saver(list(vs.values()))
    prefix = saver.save(str(tmp_path / "m"))
    for v in vs.values():
        v.assign(np.zeros(v.shape, v.dtype))
    saver.restore(prefix)
    for key, want in arrays.items():
        got = vs[key].value()
        assert vs[key].backend == "jax" and next(iter(got.devices())) == _jax_cpu(0)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(held), arrays["f"])  # the old value, still intact
    vs["f"].assign_add(np.ones(arrays["f"].shape, np.float32))  # the adopted buffer updates as any other
    np.testing.assert_array_equal(vs["f"].numpy(), arrays["f"] + 1)
