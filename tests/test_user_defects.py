"""Defects found by trying the library as a demanding TF / JAX / PyTorch user would.

Each test pins one defect of the "house in order" issue (the variable and distribution
half; the checkpoint half lives beside the checkpoint tests) and failed before its fix.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest

import gpuvars as gv

DEVICES = ["/cpu:0", "/cpu:1", "/cpu:2", "/cpu:3"]


# --- Python ints out of range -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.uint8, np.uint32])
def test_python_int_out_of_range_is_refused_not_wrapped(dtype: type) -> None:
    v = gv.Variable(np.zeros(1, dtype), name="v")
    info = np.iinfo(dtype)
    for bad in (int(info.max) + 1, int(info.min) - 1, 2**40):
        with pytest.raises(gv.InvalidArgumentError, match=rf"variable 'v'.*Python integer {bad} is out of range"):
            v.assign([bad])
        with pytest.raises(gv.InvalidArgumentError, match="out of range"):
            v.assign_add(bad)
    assert v.numpy().tolist() == [0]  # nothing was written
    v.assign([int(info.max)])  # Python ints that fit go into any integer dtype (as in numpy and TF)
    assert v.numpy().tolist() == [int(info.max)]
    with pytest.raises(gv.InvalidArgumentError, match="cannot cast a value of dtype float32"):
        v.assign([1.5])


def test_python_int_out_of_range_at_creation_and_in_scatter() -> None:
    with pytest.raises(gv.InvalidArgumentError, match=r"variable 'c'.*2147483648 is out of range for the variable's dtype int32"):
        gv.Variable([2**31], name="c", dtype=np.int32)
    v = gv.Variable(np.zeros((3,), np.int16), name="v")
    with pytest.raises(gv.InvalidArgumentError, match=r"scatter_update on variable 'v'.*70000 is out of range"):
        v.scatter_update([0], [70000])
    assert gv.global_variables() == [v]  # the failed constructor registered nothing


# --- copy, deepcopy, pickle ---------------------------------------------------------------------


def test_deepcopy_gives_an_independent_registered_variable(cpu_backend: str) -> None:
    v = gv.Variable(np.arange(3.0, dtype=np.float32), name="w", shape=(None,), trainable=False)
    d = copy.deepcopy(v)
    assert d is not v and isinstance(d, gv.Variable)
    assert d.name == "w_1" and d.device == v.device and d.dtype == v.dtype
    assert d.declared_shape == (None,) and d.trainable is False
    d.assign_add(np.ones(3, np.float32))
    assert v.numpy().tolist() == [0.0, 1.0, 2.0] and d.numpy().tolist() == [1.0, 2.0, 3.0]
    assert [x.name for x in gv.global_variables()] == ["w", "w_1"]
    # a deferred variable copies its initializer, not a value
    lazy = gv.Variable(gv.ones([2]), name="lazy")
    twin = copy.deepcopy(lazy)
    assert not twin.initialized
    twin.initializer()
    assert twin.numpy().tolist() == [1.0, 1.0] and not lazy.initialized


def test_copy_copy_is_the_same_handle() -> None:
    v = gv.Variable([1.0], name="v")
    assert copy.copy(v) is v  # TF: a variable is a handle; copy.copy never makes a silent twin
    assert len(gv.global_variables()) == 1


def test_pickle_refuses_with_a_reason_and_an_alternative() -> None:
    v = gv.Variable([1.0], name="v")
    with pytest.raises(gv.SerializationError, match=r"variable 'v' cannot be pickled: gpuvars never uses pickle.*gv.Saver"):
        pickle.dumps(v)
    assert isinstance(gv.SerializationError("x"), TypeError)  # what pickle users catch
    s = gv.ShardedVariable(np.arange(4.0), 2, name="s")
    with pytest.raises(gv.SerializationError):
        pickle.dumps(s)


def test_deepcopy_of_a_mirrored_variable_is_a_clear_error(four_cpus: str) -> None:
    with gv.MirroredStrategy(DEVICES[:2]).scope():
        m = gv.Variable([1.0], name="m")
    with pytest.raises(gv.InvalidArgumentError, match="copy.deepcopy of the MirroredVariable 'm' is not supported"):
        copy.deepcopy(m)


# --- quiet inf/nan, snapshots ------------------------------------------------------------------------


def test_scatter_div_by_zero_is_quiet_inf_and_nan(cpu_backend: str) -> None:
    v = gv.Variable(np.array([[1.0, 0.0], [2.0, 3.0]], np.float32), name="v")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's RuntimeWarning must not leak
        v.scatter_div([0], np.zeros((1, 2), np.float32))
    row = v.numpy()[0]
    assert np.isposinf(row[0]) and np.isnan(row[1])
    assert v.numpy()[1].tolist() == [2.0, 3.0]


def test_indexing_is_a_snapshot(cpu_backend: str) -> None:
    v = gv.Variable(np.zeros((2, 3), np.float32), name="v")
    row, cell, head = v[0], v[0, 1], v[:1]
    v.assign_add(np.ones((2, 3), np.float32))
    assert np.asarray(row).tolist() == [0.0, 0.0, 0.0]
    assert float(cell) == 0.0 and np.asarray(head).tolist() == [[0.0, 0.0, 0.0]]
    if cpu_backend == "numpy":
        assert np.asarray(row).flags.writeable  # a private copy, not a read-only view
        assert not np.shares_memory(np.asarray(row), v.value())


# --- distribution --------------------------------------------------------------------------------------


def test_mirrored_variable_called_directly_is_a_clear_error() -> None:
    for cls in (gv.MirroredVariable, gv.SyncOnReadVariable):
        with pytest.raises(gv.InvalidArgumentError, match=rf"gv.{cls.__name__} is not constructed directly.*scope\(\)"):
            cls(np.zeros(3), name="w")


def test_mirrored_write_from_another_device_is_judged_like_a_plain_one(four_cpus: str) -> None:
    src = gv.Variable(np.ones(2, np.float32), name="src", device="/cpu:0")
    plain = gv.Variable(np.zeros(2, np.float32), name="plain", device="/cpu:1")
    with gv.MirroredStrategy(["/cpu:1", "/cpu:2"]).scope():
        m = gv.Variable(np.zeros(2, np.float32), name="m")
        s = gv.Variable(np.zeros(2, np.float32), name="s", synchronization=gv.VariableSynchronization.ON_READ,
                        aggregation=gv.VariableAggregation.SUM)
    sharded = gv.ShardedVariable(np.zeros(4, np.float32), 2, name="sh", devices=["/cpu:1", "/cpu:2"])
    src4 = gv.Variable(np.ones(4, np.float32), name="src4", device="/cpu:0")
    with gv.config.transfer_guard("disallow"):
        for target, what in [(plain, "variable 'plain'"), (m, "mirrored variable 'm'"),
                             (s, "sync-on-read variable 's'")]:
            with pytest.raises(gv.TransferGuardError, match=rf"assign to {what} on .*variable 'src' on /cpu:0"):
                target.assign(src)
        with pytest.raises(gv.TransferGuardError, match=r"sharded variable 'sh' on /cpu:1, /cpu:2"):
            sharded.assign(src4)
        # host values into host variables are never transfers; explicit copies always pass
        m.assign(np.ones(2, np.float32))
        m.assign(gv.copy_to(src, "/cpu:1"))
        sharded.assign(np.ones(4, np.float32))
    assert m.components_agree() and m.numpy().tolist() == [1.0, 1.0]


def test_sharded_scatter_validates_updates(cpu_backend: str) -> None:
    s = gv.ShardedVariable(np.zeros((6, 2), np.float32), 3, name="emb")
    with pytest.raises(gv.InvalidArgumentError, match=r"scatter_update on sharded variable 'emb'.*shape \(3,\), expected \(2, 2\)"):
        s.scatter_update([0, 5], np.ones(3, np.float32))  # wrong size: was a raw numpy error
    with pytest.raises(gv.InvalidArgumentError, match=r"shape \(4,\), expected \(2, 2\)"):
        s.scatter_update([0, 5], np.ones(4, np.float32))  # same size, wrong shape: was silently reshaped
    with pytest.raises(gv.InvalidArgumentError, match=r"cannot cast a value of dtype complex64"):
        s.scatter_add([1], np.ones((1, 2), np.complex64))
    with pytest.raises(gv.InvalidArgumentError, match=r"index 6 is out of range \[0, 6\)"):
        s.scatter_add([6], np.ones((1, 2), np.float32))
    with pytest.raises(gv.InvalidArgumentError, match="indices must be integers"):
        s.scatter_add(np.array([1.0]), np.ones((1, 2), np.float32))
    assert not s.numpy().any()
    s.scatter_add(np.array([[0], [5]]), np.ones((2, 1, 2), np.float32))
    assert s.numpy()[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_sharded_variable_is_a_first_class_registry_member(cpu_backend: str) -> None:
    s = gv.ShardedVariable(np.arange(4, dtype=np.float32), 2, name="s")
    w = gv.Variable(gv.zeros([2]), name="w")
    assert gv.global_variables() == [s, w] and isinstance(s, gv.RegistryMember)
    gv.global_variables_initializer().run()  # raised before
    assert w.initialized and s.initialized and gv.report_uninitialized_variables() == []
    s.initializer()  # its shards hold concrete values: a no-op, as for an eager variable
    assert s.numpy().tolist() == [0.0, 1.0, 2.0, 3.0]
    assert gv.is_variable_initialized(s)


def test_variables_made_in_a_scope_by_a_sharded_variable_stay_plain(four_cpus: str) -> None:
    with gv.MirroredStrategy(DEVICES[:2]).scope():
        s = gv.ShardedVariable(np.arange(4, dtype=np.float32), 2, name="s")
    assert all(type(v) is gv.Variable for v in s.variables)


# --- the error boundary ---------------------------------------------------------------------------------


def test_host_out_of_memory_is_resource_exhausted_naming_the_variable() -> None:
    v = gv.Variable(gv.zeros([1 << 42]), name="huge", device="/cpu:0")  # 16 TiB: numpy refuses at once
    with pytest.raises(gv.ResourceExhaustedError, match=r"initializing variable 'huge' ran out of memory on /cpu:0"):
        v.initializer()
    assert not v.initialized
