"""Variable: creation, dtypes and shapes, names, placement and co-location, in-place
updates, views and snapshots, operators, scatter ops and uninitialized reads.

Most tests run on both CPU backends (``cpu_backend``: numpy, JAX's CPU devices); the
multi-device ones on four logical CPUs (``four_cpus``).
"""

from __future__ import annotations

import gc
import operator
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import gpuvars as gv
from conftest import jax_device_of, needs_jax

BF16 = np.dtype(ml_dtypes.bfloat16)


def ptr(v: gv.Variable) -> int:
    """The address of a host variable's buffer."""
    return int(v.value().__array_interface__["data"][0])


def jax_cpu(i: int) -> Any:
    import jax

    return jax.devices("cpu")[i]


def x64_off() -> bool:
    import jax

    return not jax.config.jax_enable_x64


# --- creation ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.uint16, np.int32, np.bool_, np.complex64, BF16])
def test_creation_from_numpy_keeps_dtype(cpu_backend: str, dtype: Any) -> None:
    arr = np.arange(6).reshape(2, 3).astype(dtype)
    v = gv.Variable(arr, name="v")
    assert v.dtype == np.dtype(dtype) and v.shape == (2, 3)
    np.testing.assert_array_equal(v.numpy(), arr)
    assert v.initialized and v.backend == cpu_backend


def test_creation_from_numpy_float64_and_int64(cpu_backend: str) -> None:
    for arr in (np.ones(3, np.float64), np.ones(3, np.int64)):
        if cpu_backend == "jax" and x64_off():
            with pytest.raises(gv.InvalidArgumentError, match=rf"variable 'v' on /cpu:0: JAX would store {arr.dtype} as"):
                gv.Variable(arr, name="v")
            assert gv.global_variables() == []
        else:
            assert gv.Variable(arr, name="v").dtype == arr.dtype


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (1.5, np.float32),
        ([1.0, 2.0], np.float32),
        ([[1, 2], [3, 4.5]], np.float32),
        (3, np.int32),
        ([1, 2, 3], np.int32),
        (True, np.bool_),
        ([True, False], np.bool_),
        (1 + 2j, np.complex64),
        (np.float16(2.0), np.float16),
        (np.float64(2.0), np.float64),
    ],
)
def test_python_values_get_tf_default_dtypes(value: Any, dtype: Any) -> None:
    v = gv.Variable(value, name="v")
    assert v.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(v.numpy(), np.asarray(value, dtype=dtype))


def test_lists_of_narrow_float_scalars_keep_their_dtype() -> None:
    v = gv.Variable([ml_dtypes.bfloat16(1.5), ml_dtypes.bfloat16(2.0)], name="v")
    assert v.dtype == BF16 and v.numpy().tolist() == [1.5, 2.0]
    with pytest.raises(gv.InvalidArgumentError, match="cannot convert bytes"):
        gv.Variable(b"ab", name="b")


def test_big_python_ints_become_int64() -> None:
    v = gv.Variable([1, 2**40], name="v")
    assert v.dtype == np.int64
    assert v.numpy()[1] == 2**40
    assert gv.Variable(2**31, name="b").dtype == np.int64
    assert gv.Variable(-(2**31), name="c").dtype == np.int32


def test_non_numeric_values_are_rejected() -> None:
    with pytest.raises(gv.InvalidArgumentError, match=r"cannot convert str 'abc' to a numeric array"):
        gv.Variable("abc", name="v")
    with pytest.raises(gv.InvalidArgumentError, match="cannot convert list"):
        gv.Variable([[1, 2], [3]], name="v")
    with pytest.raises(gv.InvalidArgumentError, match=r"initial_value must be given"):
        gv.Variable(name="v")
    assert gv.global_variables() == []


@needs_jax
def test_creation_from_a_jax_array(cpu_backend: str) -> None:
    import jax.numpy as jnp

    src = jnp.arange(4, dtype=jnp.int16)
    v = gv.Variable(src, name="v")
    assert v.dtype == np.int16 and v.backend == cpu_backend
    np.testing.assert_array_equal(v.numpy(), [0, 1, 2, 3])
    assert isinstance(v.value(), np.ndarray) == (cpu_backend == "numpy")


def test_creation_from_another_variable_copies(cpu_backend: str) -> None:
    a = gv.Variable(np.arange(3, dtype=np.float32), name="a")
    b = gv.Variable(a, name="b")
    assert b.dtype == np.float32 and b.name == "b"
    a.assign([7.0, 7.0, 7.0])
    np.testing.assert_array_equal(b.numpy(), [0.0, 1.0, 2.0])
    if cpu_backend == "numpy":
        assert not np.shares_memory(np.asarray(a), np.asarray(b))
    c = gv.Variable(a, name="c", dtype=np.float16)
    assert c.dtype == np.float16


def test_creation_from_an_uninitialized_variable_names_it() -> None:
    a = gv.Variable(gv.zeros([2]), name="source")
    with pytest.raises(gv.UninitializedVariableError, match="uninitialized value source"):
        gv.Variable(a, name="b")


# --- dtypes ---------------------------------------------------------------------------------


def test_dtype_same_kind_casts(cpu_backend: str) -> None:
    v = gv.Variable(np.ones(2), name="v", dtype=np.float32)  # float64 -> float32
    assert v.dtype == np.float32
    v.assign(np.array([0.5, 1.5], np.float64))
    v.assign([1, 2])  # int -> float
    v.assign_add(np.array([True, False]))
    np.testing.assert_array_equal(v.numpy(), [2.0, 2.0])
    w = gv.Variable([1, 2], name="w", dtype=np.float32)
    assert w.dtype == np.float32
    h = gv.Variable(np.ones(2, np.float32), name="h", dtype=BF16)  # float32 -> bfloat16
    h.assign(np.array([0.5, 2.0], np.float32))
    assert h.dtype == BF16 and h.numpy().tolist() == [0.5, 2.0]


def test_float_into_int_is_rejected_naming_both(cpu_backend: str) -> None:
    with pytest.raises(gv.InvalidArgumentError, match=r"variable 'v'.*dtype float32 to the variable's dtype int32"):
        gv.Variable(1.5, name="v", dtype=np.int32)
    v = gv.Variable([1, 2], name="v")
    with pytest.raises(gv.InvalidArgumentError, match=r"assign to variable 'v': cannot cast a value of dtype float32 to the variable's dtype int32"):
        v.assign([1.5, 2.5])
    with pytest.raises(gv.InvalidArgumentError, match=r"add to variable 'v'.*float64 to the variable's dtype int32"):
        v.assign_add(np.ones(2))
    with pytest.raises(gv.InvalidArgumentError, match=r"scatter_add on variable 'v'.*float32 to the variable's dtype int32"):
        v.scatter_add([0], [0.5])
    np.testing.assert_array_equal(v.numpy(), [1, 2])


def test_complex_into_float_is_rejected_naming_both(cpu_backend: str) -> None:
    v = gv.Variable([1.0, 2.0], name="v")
    with pytest.raises(gv.InvalidArgumentError, match=r"dtype complex64 to the variable's dtype float32"):
        v.assign(np.array([1j, 2j], np.complex64))
    with pytest.raises(gv.InvalidArgumentError, match=r"dtype complex64 to the variable's dtype float32"):
        gv.Variable(np.ones(2, np.complex64), name="c", dtype=np.float32)


def test_bad_dtype_argument() -> None:
    with pytest.raises(gv.InvalidArgumentError, match=r"variable 'v': 'floaty' is not a dtype"):
        gv.Variable(1.0, name="v", dtype="floaty")


# --- shapes -----------------------------------------------------------------------------------


def test_shape_none_fixes_the_shape(cpu_backend: str) -> None:
    v = gv.Variable(np.zeros(3, np.float32), name="w")
    assert v.shape == (3,) and v.declared_shape == (3,)
    with pytest.raises(gv.InvalidArgumentError) as info:
        v.assign(np.zeros(2, np.float32))
    text = str(info.value)
    assert "variable 'w'" in text and "(3,)" in text and "(2,)" in text
    np.testing.assert_array_equal(v.numpy(), [0, 0, 0])


@pytest.mark.parametrize("op", ["assign", "assign_add", "assign_sub"])
def test_no_silent_broadcast(cpu_backend: str, op: str) -> None:
    v = gv.Variable(np.zeros((2, 3), np.float32), name="v")
    for value in (1.0, np.ones(3, np.float32), np.ones((1, 3), np.float32)):
        with pytest.raises(gv.InvalidArgumentError, match=r"Cannot \w+ value to variable 'v': shape mismatch.*\(2, 3\)"):
            getattr(v, op)(value)
    np.testing.assert_array_equal(v.numpy(), np.zeros((2, 3)))


def test_partially_free_shape(cpu_backend: str) -> None:
    v = gv.Variable(np.zeros((2, 3), np.float32), name="v", shape=(None, 3))
    assert v.declared_shape == (None, 3) and v.shape == (2, 3)
    v.assign(np.ones((5, 3), np.float32))  # dim 0 is free: reallocates
    assert v.shape == (5, 3)
    np.testing.assert_array_equal(v.numpy(), np.ones((5, 3)))
    with pytest.raises(gv.InvalidArgumentError, match=r"variable shape \(5, 3\) \(declared \(None, 3\)\) and the value shape \(2, 4\)"):
        v.assign(np.ones((2, 4), np.float32))
    with pytest.raises(gv.InvalidArgumentError, match="shape mismatch"):
        v.assign_add(np.ones((2, 3), np.float32))  # only assign may change the shape
    if cpu_backend == "numpy":
        before = ptr(v)
        v.assign(np.zeros((5, 3), np.float32))
        assert ptr(v) == before  # same shape again: in place


def test_validate_shape_false_allows_any_shape(cpu_backend: str) -> None:
    v = gv.Variable(np.zeros(2, np.float32), name="v", validate_shape=False)
    assert v.declared_shape is None
    v.assign(np.ones((3, 4), np.float32))
    assert v.shape == (3, 4)
    v.assign(5.0)
    assert v.shape == ()


def test_shape_argument_checked_at_creation() -> None:
    with pytest.raises(gv.InvalidArgumentError, match=r"initial value's shape \(2, 3\) is not compatible with the explicitly supplied shape \(3, 3\)"):
        gv.Variable(np.zeros((2, 3)), name="v", shape=(3, 3))
    with pytest.raises(gv.InvalidArgumentError, match="shape must be a sequence of ints or None"):
        gv.Variable(1.0, name="v", shape="abc")
    with pytest.raises(gv.InvalidArgumentError, match="shape dims must be >= 0 or None"):
        gv.Variable(1.0, name="v", shape=(-1,))
    v = gv.Variable(np.zeros((2, 3)), name="ok", shape=[2, None])
    assert v.declared_shape == (2, None)


# --- names and the registry ---------------------------------------------------------------


def test_names_are_uniquified_case_insensitively() -> None:
    a = gv.Variable(1.0, name="w")
    b = gv.Variable(1.0, name="W")
    c = gv.Variable(1.0, name="w")
    assert [a.name, b.name, c.name] == ["w", "W_1", "w_2"]
    d, e = gv.Variable(1.0), gv.Variable(1.0)
    assert (d.name, e.name) == ("Variable", "Variable_1")
    assert [v.name for v in gv.global_variables()] == ["w", "W_1", "w_2", "Variable", "Variable_1"]
    f = gv.Variable(1.0, name="w_1")  # an explicit name that a suffix could have produced
    assert f.name == "w_1_1"  # w_1 is taken case-insensitively by W_1


def test_registry_holds_variables_weakly(fresh_state: gv.Registry) -> None:
    a = gv.Variable(1.0, name="w")
    b = gv.Variable(2.0, name="keep")
    assert fresh_state.get("W") is a
    del a
    gc.collect()
    assert gv.global_variables() == [b]
    assert fresh_state.get("w") is None
    c = gv.Variable(3.0, name="w")
    assert c.name == "w"  # the name is free again
    assert len(fresh_state) == 2 and list(fresh_state) == [b, c]


def test_registry_isolation_and_nesting() -> None:
    outer = gv.Variable(1.0, name="w")
    with gv.Registry() as inner:
        a = gv.Variable(1.0, name="w")
        assert a.name == "w" and gv.global_variables() == [a]
        with gv.Registry() as innermost:
            b = gv.Variable(1.0, name="w")
            assert gv.global_variables() == [b] and list(innermost) == [b]
        with inner:  # re-entering the same registry
            c = gv.Variable(1.0, name="w")
        assert c.name == "w_1"
        assert gv.global_variables() == [a, c]
    assert gv.global_variables() == [outer]


def test_failed_creation_frees_its_name() -> None:
    with pytest.raises(gv.InvalidArgumentError):
        gv.Variable("bad", name="w")
    assert gv.Variable(1.0, name="w").name == "w"


@pytest.mark.parametrize("name", ["", " w", "a b", "w:0", "_private", "x" * 0, "é", 3])
def test_invalid_names_are_rejected(name: Any) -> None:
    with pytest.raises(gv.InvalidArgumentError, match=r"invalid variable name"):
        gv.Variable(1.0, name=name)
    assert gv.global_variables() == []


@pytest.mark.parametrize("name", ["w", "layer1/kernel", "a.b-c_d", "0", ".hidden"])
def test_valid_names(name: str) -> None:
    assert gv.Variable(1.0, name=name).name == name


def test_trainable_and_synchronization_rules() -> None:
    a = gv.Variable(1.0, name="a")
    b = gv.Variable(1.0, name="b", trainable=False)
    c = gv.Variable(1.0, name="c", synchronization=gv.VariableSynchronization.ON_READ,
                    aggregation=gv.VariableAggregation.SUM)
    assert (a.trainable, b.trainable, c.trainable) == (True, False, False)
    assert c.synchronization is gv.VariableSynchronization.ON_READ and c.aggregation is gv.VariableAggregation.SUM
    assert gv.trainable_variables() == [a]
    assert gv.global_variables() == [a, b, c]
    with pytest.raises(gv.InvalidArgumentError, match=r"variable 'd': synchronization=ON_READ can only be set for non-trainable"):
        gv.Variable(1.0, name="d", trainable=True, synchronization=gv.VariableSynchronization.ON_READ)
    with pytest.raises(gv.InvalidArgumentError, match="trainable must be a bool, got 1"):
        gv.Variable(1.0, name="d", trainable=1)  # type: ignore[arg-type]
    with pytest.raises(gv.InvalidArgumentError, match="synchronization must be a gv.VariableSynchronization"):
        gv.Variable(1.0, name="d", synchronization="ON_READ")  # type: ignore[arg-type]
    with pytest.raises(gv.InvalidArgumentError, match="aggregation must be a gv.VariableAggregation"):
        gv.Variable(1.0, name="d", aggregation="sum")  # type: ignore[arg-type]
    with pytest.raises(gv.InvalidArgumentError, match="validate_shape must be a bool"):
        gv.Variable(1.0, name="d", validate_shape=None)  # type: ignore[arg-type]


# --- placement and co-location --------------------------------------------------------------


def test_device_scope_and_explicit_device(four_cpus: str) -> None:
    with gv.device("/cpu:1"):
        a = gv.Variable(np.zeros(2, np.float32), name="a")
        b = gv.Variable(np.zeros(2, np.float32), name="b", device="/cpu:2")  # explicit beats the scope
        with gv.device("/cpu:3"):
            c = gv.Variable(np.zeros(2, np.float32), name="c")
        with gv.device(None):
            d = gv.Variable(np.zeros(2, np.float32), name="d")
    assert [a.device, b.device, c.device, d.device] == ["/cpu:1", "/cpu:2", "/cpu:3", "/cpu:0"]
    assert b.physical_device.index == 2
    if four_cpus == "jax":
        assert [jax_device_of(v.value()) for v in (a, b, c, d)] == [jax_cpu(i) for i in (1, 2, 3, 0)]


def test_device_spec_object_and_device_function(four_cpus: str) -> None:
    v = gv.Variable(1.0, name="v", device=gv.DeviceSpec(device_type="CPU", device_index=2))
    assert v.device == "/cpu:2"
    with gv.device(lambda op: "/cpu:3" if op.type == "Variable" else None):
        w = gv.Variable(1.0, name="w")
    assert w.device == "/cpu:3"


@pytest.mark.parametrize(
    "update",
    [
        lambda v: v.assign(np.full(4, 2.0, np.float32)),
        lambda v: v.assign([1.0, 2.0, 3.0, 4.0]),
        lambda v: v.assign_add(np.ones(4, np.float32)),
        lambda v: v.assign_sub([1.0, 1.0, 1.0, 1.0]),
        lambda v: v.scatter_update([1, 3], [5.0, 6.0]),
        lambda v: v.scatter_add(np.array([0, 0]), np.array([1.0, 1.0], np.float32)),
        lambda v: v.scatter_sub([2], [1.0]),
        lambda v: v.scatter_mul([2], [3.0]),
        lambda v: v.scatter_div([2], [2.0]),
        lambda v: v.scatter_min([0], [-9.0]),
        lambda v: v.scatter_max([0], [9.0]),
    ],
    ids=["assign", "assign_list", "assign_add", "assign_sub", "scatter_update", "scatter_add",
         "scatter_sub", "scatter_mul", "scatter_div", "scatter_min", "scatter_max"],
)
def test_updates_stay_on_the_variables_device_under_a_conflicting_scope(four_cpus: str, update: Any) -> None:
    v = gv.Variable(np.arange(4, dtype=np.float32), name="v", device="/cpu:1")
    before = ptr(v) if four_cpus == "numpy" else None
    expected = np.arange(4, dtype=np.float32)
    ref = gv.Variable(expected, name="ref", device="/cpu:1")
    update(ref)
    expected = ref.numpy()
    with gv.device("/cpu:3"):
        update(v)
        update(v)
    ref_again = gv.Variable(expected, name="ref2", device="/cpu:1")
    update(ref_again)
    assert v.device == "/cpu:1"
    np.testing.assert_array_equal(v.numpy(), ref_again.numpy())
    if four_cpus == "numpy":
        assert ptr(v) == before  # the same buffer, written in place
    else:
        assert jax_device_of(v.value()) == jax_cpu(1)
        assert v.value().committed


@needs_jax
def test_jax_storage_is_rebound_on_the_same_device() -> None:
    gv.config.set_cpu_backend("jax")
    v = gv.Variable(np.zeros(3, np.float32), name="v", device="/cpu:2")
    old = v.value()
    v.assign_add(np.ones(3, np.float32))
    assert v.value() is not old
    np.testing.assert_array_equal(np.asarray(old), [0, 0, 0])  # the old array is immutable
    assert jax_device_of(v.value()) == jax_cpu(2)


# --- in place, views and snapshots ---------------------------------------------------------


def test_numpy_updates_keep_the_same_buffer() -> None:
    v = gv.Variable(np.zeros((4, 2), np.float32), name="v")
    before = ptr(v)
    v.assign(np.ones((4, 2), np.float32))  # the fast path
    v.assign(np.ones((4, 2), np.float64))  # a cast
    v.assign([[1.0, 2.0]] * 4)
    v.assign_add(np.ones((4, 2), np.float32))
    v.assign_sub(np.ones((4, 2)))
    v.scatter_update([0], [[5.0, 5.0]])
    v.scatter_add([1, 1], np.ones((2, 2), np.float32))
    v.scatter_max([2], [[7.0, 0.0]])
    assert ptr(v) == before
    np.testing.assert_array_equal(v.numpy(), [[5, 5], [3, 4], [7, 2], [1, 2]])
    v.assign(v)  # self-assign
    v.assign(v.value())
    assert ptr(v) == before


def test_value_is_a_read_only_live_view() -> None:
    v = gv.Variable(np.zeros(3, np.float32), name="v")
    view = v.value()
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 1.0
    v.assign([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(view, [1.0, 2.0, 3.0])  # live
    snap, host = v.read_value(), v.numpy()
    v.assign_add(np.ones(3, np.float32))
    np.testing.assert_array_equal(snap, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(host, [1.0, 2.0, 3.0])
    snap[0] = 100.0  # snapshots are the caller's
    assert v.numpy()[0] == 2.0


def test_snapshots_on_each_backend(cpu_backend: str) -> None:
    v = gv.Variable(np.zeros(2, np.float32), name="v")
    snap, host = v.read_value(), v.numpy()
    v.assign([5.0, 6.0])
    np.testing.assert_array_equal(np.asarray(snap), [0.0, 0.0])
    assert type(host) is np.ndarray and host.tolist() == [0.0, 0.0]


def test_np_asarray_is_no_copy_on_host() -> None:
    v = gv.Variable(np.arange(3, dtype=np.float32), name="v")
    arr = np.asarray(v)
    assert np.shares_memory(arr, v.value()) and not arr.flags.writeable
    copy = np.array(v)
    assert not np.shares_memory(copy, v.value()) and copy.flags.writeable
    assert np.asarray(v, dtype=np.float64).dtype == np.float64
    v.assign([9.0, 9.0, 9.0])
    assert arr.tolist() == [9.0, 9.0, 9.0]


@needs_jax
def test_np_asarray_of_a_jax_variable() -> None:
    gv.config.set_cpu_backend("jax")
    v = gv.Variable(np.arange(3, dtype=np.float32), name="v")
    np.testing.assert_array_equal(np.asarray(v), [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match=r"variable 'v' lives on /cpu:0; a host array needs a copy"):
        np.asarray(v, copy=False)


def test_dlpack_round_trip(cpu_backend: str) -> None:
    v = gv.Variable(np.arange(4, dtype=np.float32), name="v")
    out = np.from_dlpack(v)
    np.testing.assert_array_equal(out, [0.0, 1.0, 2.0, 3.0])
    # a consumer may ignore DLPack's read-only flag (torch does): a host variable exports a
    # snapshot, so writing through the import can never rewrite the variable
    if cpu_backend == "numpy":  # (JAX arrays are immutable: sharing them is safe)
        assert not np.shares_memory(out, v.value())
    v.assign([4.0, 3.0, 2.0, 1.0])
    assert out.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert v.__dlpack_device__()[0] == 1  # kDLCPU


def test_torch_from_dlpack_cannot_write_through_a_host_variable() -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed (the dlpack aliasing check needs it)")
    v = gv.Variable(np.arange(4, dtype=np.float32), name="v", device="/cpu:0")
    t = torch.from_dlpack(v)
    t.add_(100)
    assert v.numpy().tolist() == [0.0, 1.0, 2.0, 3.0]


@needs_jax
def test_dlpack_into_jax(cpu_backend: str) -> None:
    import jax.numpy as jnp

    v = gv.Variable(np.arange(4, dtype=np.float32), name="v")
    j = jnp.from_dlpack(v)
    np.testing.assert_array_equal(np.asarray(j), [0.0, 1.0, 2.0, 3.0])
    v.assign([9.0, 9.0, 9.0, 9.0])
    # JAX arrays are immutable: a host variable hands JAX a snapshot, never its buffer
    np.testing.assert_array_equal(np.asarray(j), [0.0, 1.0, 2.0, 3.0])


# --- operators and Python protocols -----------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (lambda v: v + 1, [2.0, 3.0]),
        (lambda v: 1 + v, [2.0, 3.0]),
        (lambda v: v - 1, [0.0, 1.0]),
        (lambda v: 10 - v, [9.0, 8.0]),
        (lambda v: v * 2, [2.0, 4.0]),
        (lambda v: 2 * v, [2.0, 4.0]),
        (lambda v: v / 2, [0.5, 1.0]),
        (lambda v: 2 / v, [2.0, 1.0]),
        (lambda v: v // 2, [0.0, 1.0]),
        (lambda v: v % 2, [1.0, 0.0]),
        (lambda v: v**2, [1.0, 4.0]),
        (lambda v: 2**v, [2.0, 4.0]),
        (lambda v: -v, [-1.0, -2.0]),
        (lambda v: +v, [1.0, 2.0]),
        (lambda v: abs(-v), [1.0, 2.0]),
        (lambda v: v < 2, [True, False]),
        (lambda v: v <= 2, [True, True]),
        (lambda v: v > 1, [False, True]),
        (lambda v: v >= 2, [False, True]),
        (lambda v: v + v, [2.0, 4.0]),
        (lambda v: np.ones(2, np.float32) + v, [2.0, 3.0]),
        (lambda v: v[1], 2.0),
        (lambda v: np.exp(v), np.exp([1.0, 2.0])),
    ],
)
def test_operators_read_the_value(cpu_backend: str, fn: Any, expected: Any) -> None:
    v = gv.Variable([1.0, 2.0], name="v")
    np.testing.assert_allclose(np.asarray(fn(v)), np.asarray(expected, dtype=np.asarray(expected).dtype), rtol=1e-6)
    v.assign([3.0, 4.0])
    assert np.asarray(v + 0).tolist() == [3.0, 4.0]  # reads the current value


def test_matmul(cpu_backend: str) -> None:
    v = gv.Variable(np.eye(2, dtype=np.float32) * 2, name="v")
    m = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(v @ m), m * 2)
    np.testing.assert_array_equal(np.asarray(m @ v), m * 2)
    np.testing.assert_array_equal(np.asarray(v @ v), np.eye(2) * 4)


def test_variables_are_hashable_and_compared_by_identity() -> None:
    a = gv.Variable([1.0], name="a")
    b = gv.Variable([1.0], name="b")
    assert a != b and a == a and len({a, b}) == 2


def test_scalar_protocols(cpu_backend: str) -> None:
    f = gv.Variable(2.5, name="f")
    i = gv.Variable(3, name="i")
    assert float(f) == 2.5 and int(i) == 3 and bool(i) is True
    assert [10, 20, 30, 40][i] == 40
    with pytest.raises(TypeError, match=r"len\(\) of a scalar variable 'f'"):
        len(f)
    assert len(gv.Variable(np.zeros((4, 2), np.float32), name="m")) == 4


def test_repr(cpu_backend: str) -> None:
    v = gv.Variable([1.0, 2.0], name="w")
    text = repr(v)
    assert text.startswith("<gpuvars.Variable 'w' shape=(2,) dtype=float32 device=/cpu:0")
    assert "[1. 2.]" in text
    u = gv.Variable(gv.zeros([3]), name="u")
    assert repr(u).endswith("uninitialized>")


# --- scatter --------------------------------------------------------------------------------------

SCATTERS = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.true_divide,
    "min": np.minimum,
    "max": np.maximum,
}


@pytest.mark.parametrize("op", sorted(SCATTERS))
def test_scatter_ops_with_repeated_indices(cpu_backend: str, op: str) -> None:
    start = np.array([[1.0, 2.0], [4.0, -8.0], [0.5, 3.0]], np.float32)
    indices = [2, 0, 2, 2]
    updates = np.array([[2.0, 0.5], [4.0, 4.0], [0.25, 2.0], [-1.0, 8.0]], np.float32)
    expected = start.copy()
    SCATTERS[op].at(expected, indices, updates)
    v = gv.Variable(start, name="v")
    assert getattr(v, f"scatter_{op}")(indices, updates) is v
    np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6)


def test_scatter_update_and_index_shapes(cpu_backend: str) -> None:
    v = gv.Variable(np.zeros((4, 2), np.float32), name="v")
    v.scatter_update(np.array([[3], [1]]), np.array([[[1.0, 2.0]], [[3.0, 4.0]]], np.float32))
    np.testing.assert_array_equal(v.numpy(), [[0, 0], [3, 4], [0, 0], [1, 2]])
    v.scatter_update(2, [7.0, 7.0])  # a scalar index takes a row
    np.testing.assert_array_equal(v.numpy()[2], [7, 7])
    v.scatter_add(np.array([], np.int64), np.zeros((0, 2), np.float32))  # nothing to do
    vec = gv.Variable(np.zeros(3, np.int32), name="vec")
    vec.scatter_add([0, 0, 2], [1, 1, 5])
    np.testing.assert_array_equal(vec.numpy(), [2, 0, 5])


def test_scatter_errors(cpu_backend: str) -> None:
    v = gv.Variable(np.zeros((4, 2), np.float32), name="v")
    with pytest.raises(gv.InvalidArgumentError, match=r"scatter_add on variable 'v': index 5 is out of range \[0, 4\)"):
        v.scatter_add([1, 5], np.ones((2, 2), np.float32))
    with pytest.raises(gv.InvalidArgumentError, match=r"index -1 is out of range \[0, 4\)"):
        v.scatter_update([-1], np.ones((1, 2), np.float32))
    with pytest.raises(
        gv.InvalidArgumentError,
        match=r"scatter_update on variable 'v': updates must have shape indices.shape \+ variable.shape\[1:\] = \(2, 2\), got \(2, 3\)",
    ):
        v.scatter_update([0, 1], np.ones((2, 3), np.float32))
    with pytest.raises(gv.InvalidArgumentError, match=r"got \(2,\)"):
        v.scatter_add([0, 1], [1.0, 1.0])  # no broadcasting of updates either
    with pytest.raises(gv.InvalidArgumentError, match=r"scatter_mul on variable 'v': indices must be integers, got dtype float64"):
        v.scatter_mul([0.0, 1.0], np.ones((2, 2), np.float32))
    with pytest.raises(gv.InvalidArgumentError, match="indices must be integers, got dtype bool"):
        v.scatter_update([True, False], np.ones((2, 2), np.float32))
    np.testing.assert_array_equal(v.numpy(), np.zeros((4, 2)))
    s = gv.Variable(1.0, name="s")
    with pytest.raises(gv.InvalidArgumentError, match=r"scatter_update on variable 's': a scalar variable has no rows"):
        s.scatter_update([0], [1.0])


# --- uninitialized variables -------------------------------------------------------------------------


def test_reading_an_uninitialized_variable_names_it(cpu_backend: str) -> None:
    v = gv.Variable(gv.zeros([3]), name="weights")
    assert not v.initialized and v._storage is None
    assert v.shape == (3,) and v.dtype == np.float32
    for read in (v.value, v.read_value, v.numpy, lambda: np.asarray(v), lambda: v + 1,
                 lambda: v.assign_add(np.ones(3, np.float32)), lambda: v.assign_sub([1.0, 1.0, 1.0]),
                 lambda: v.scatter_add([0], [1.0])):
        with pytest.raises(gv.UninitializedVariableError, match=r"uninitialized value weights: variable 'weights' on /cpu:0"):
            read()
    assert not v.initialized


def test_assign_initializes_a_deferred_variable(cpu_backend: str) -> None:
    v = gv.Variable(gv.random_normal([3]), name="v")
    with pytest.raises(gv.InvalidArgumentError, match=r"variable shape \(3,\) \(declared \(3,\)\) and the value shape \(2,\)"):
        v.assign([1.0, 2.0])  # the declared shape binds before the first value too
    assert not v.initialized
    v.assign([1.0, 2.0, 3.0])
    assert v.initialized and v.numpy().tolist() == [1.0, 2.0, 3.0] and v.dtype == np.float32
    if cpu_backend == "numpy":
        assert v.value().flags.c_contiguous


def test_assign_initializes_a_deferred_callable() -> None:
    v = gv.Variable(lambda: np.zeros(4, np.int16), name="v")
    assert v.declared_shape is None
    with pytest.raises(gv.UninitializedVariableError, match="variable 'v' has no known shape until it is initialized"):
        _ = v.shape
    with pytest.raises(gv.UninitializedVariableError, match="variable 'v' has no known dtype until it is initialized"):
        _ = v.dtype
    v.assign([1, 2, 3])  # the first value fixes dtype (int32: a Python int list) and shape
    assert v.dtype == np.int32 and v.declared_shape == (3,)
    with pytest.raises(gv.InvalidArgumentError, match="shape mismatch"):
        v.assign([1, 2])


def test_ndim_and_size(cpu_backend: str) -> None:
    v = gv.Variable(np.zeros((2, 3), np.float32), name="v")
    assert (v.ndim, v.size, v.nbytes) == (2, 6, 24)
    u = gv.Variable(lambda: np.zeros(2), name="u")
    with pytest.raises(gv.UninitializedVariableError, match="variable 'u' has no known shape"):
        u.size  # noqa: B018


def test_arithmetic_result_types(cpu_backend: str) -> None:
    v = gv.Variable([1.0, 2.0], name="v")
    out = v * 2
    if cpu_backend == "numpy":
        assert type(out) is np.ndarray
    else:
        assert jax_device_of(out) == jax_cpu(0)
    assert operator.index(gv.Variable(2, name="i")) == 2
