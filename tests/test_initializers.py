"""Deferred initial values: initializers, seeds, init ops, ``initialized_value()``
expressions, callables and the uninitialized-variable reports."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import gpuvars as gv
from conftest import jax_device_of, needs_jax
from gpuvars import initializers

BIG = (400, 500)  # 200k draws: means within ~0.01 of the truth


def init_all() -> None:
    gv.global_variables_initializer()()


# --- the initializers ---------------------------------------------------------------------


def test_deferred_variables_allocate_nothing(cpu_backend: str) -> None:
    made = [
        gv.Variable(gv.zeros([3, 2]), name="z"),
        gv.Variable(gv.ones([4]), name="o"),
        gv.Variable(gv.constant(2.5, shape=[2]), name="c"),
        gv.Variable(gv.random_normal([784, 200], stddev=0.35), name="n"),
        gv.Variable(gv.truncated_normal([5]), name="t"),
        gv.Variable(gv.random_uniform([5], minval=-1, maxval=1), name="u"),
        gv.Variable(gv.initializers.GlorotUniform(), shape=(3, 3), name="g"),
        gv.Variable(lambda: np.ones(2, np.float32), name="f"),
    ]
    for v in made:
        assert not v.initialized and v._storage is None
        assert not gv.is_variable_initialized(v)
    assert gv.report_uninitialized_variables() == ["z", "o", "c", "n", "t", "u", "g", "f"]
    init_all()
    assert gv.report_uninitialized_variables() == []
    assert all(v.initialized for v in made)


def test_constant_initializers(cpu_backend: str) -> None:
    z = gv.Variable(gv.zeros([3, 2]), name="z")
    o = gv.Variable(gv.ones([4], dtype=np.int32), name="o")
    c = gv.Variable(gv.constant([1.0, 2.0], shape=[3, 2]), name="c")
    k = gv.Variable(gv.constant(7), shape=[2], name="k")
    init_all()
    assert z.dtype == np.float32 and z.numpy().tolist() == [[0, 0]] * 3
    assert o.dtype == np.int32 and o.numpy().tolist() == [1, 1, 1, 1]
    assert c.shape == (3, 2) and c.numpy().tolist() == [[1.0, 2.0]] * 3
    assert k.dtype == np.float32 and k.numpy().tolist() == [7.0, 7.0]


def test_constant_shape_mismatch() -> None:
    v = gv.Variable(gv.constant([1.0, 2.0, 3.0]), shape=None, name="v")
    assert v.shape == (3,)
    bad = gv.Variable(gv.constant([1.0, 2.0, 3.0], shape=[2, 2]), name="bad")
    with pytest.raises(gv.InvalidArgumentError, match=r"value of shape \(3,\) does not broadcast to shape \(2, 2\)"):
        bad.initializer()


def test_explicit_dtype_beats_the_initializers() -> None:
    v = gv.Variable(gv.zeros([2]), name="v", dtype=np.float64)
    w = gv.Variable(gv.random_normal([2]), name="w", dtype=np.float16)
    init_all()
    assert v.dtype == np.float64 and v.numpy().dtype == np.float64
    assert w.dtype == np.float16 and w.numpy().dtype == np.float16


def test_random_initializers_need_a_float_dtype() -> None:
    with pytest.raises(gv.InvalidArgumentError, match=r"variable 'v': RandomNormal draws floats; dtype int32 is not a float type"):
        gv.Variable(gv.random_normal([3]), name="v", dtype=np.int32)
    with pytest.raises(gv.InvalidArgumentError, match="GlorotUniform draws floats; dtype int8"):
        gv.Variable(gv.initializers.GlorotUniform(), shape=[2, 2], dtype=np.int8, name="g")


def test_initializer_shape_rules() -> None:
    with pytest.raises(gv.InvalidArgumentError, match=r"variable 'g': the initializer GlorotUniform needs a fully defined shape= \(got <any>\)"):
        gv.Variable(gv.initializers.GlorotUniform(), name="g")
    with pytest.raises(gv.InvalidArgumentError, match=r"needs a fully defined shape= \(got \(None, 3\)\)"):
        gv.Variable(gv.initializers.HeNormal(), shape=(None, 3), name="h")
    with pytest.raises(gv.InvalidArgumentError, match=r"initializer's shape \(2, 3\) is not compatible with the supplied shape \(3, 3\)"):
        gv.Variable(gv.zeros([2, 3]), shape=(3, 3), name="z")
    # a partially free declared shape accepts the initializer's own shape
    v = gv.Variable(gv.ones([2, 3]), shape=(None, 3), name="v")
    assert v.declared_shape == (None, 3) and v.shape == (2, 3)
    v.initializer()
    v.assign(np.zeros((5, 3), np.float32))
    v.initializer()  # the initializer draws its own shape again
    assert v.shape == (2, 3) and v.numpy().tolist() == [[1.0] * 3] * 2


def test_glorot_uniform_bounds_and_variance() -> None:
    fan_in, fan_out = BIG
    v = gv.Variable(gv.initializers.GlorotUniform(seed=1), shape=BIG, name="g")
    init_all()
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    x = v.numpy()
    assert x.min() >= -limit and x.max() <= limit
    assert x.min() < -0.99 * limit and x.max() > 0.99 * limit
    assert abs(x.var() - 2.0 / (fan_in + fan_out)) < 0.02 * 2.0 / (fan_in + fan_out)


@pytest.mark.parametrize(
    ("init", "std"),
    [
        (lambda: gv.initializers.HeNormal(seed=2), math.sqrt(2.0 / BIG[0])),
        (lambda: gv.initializers.GlorotNormal(seed=2), math.sqrt(2.0 / sum(BIG))),
        (lambda: gv.initializers.LecunNormal(seed=2), math.sqrt(1.0 / BIG[0])),
        (lambda: gv.initializers.HeUniform(seed=2), math.sqrt(2.0 / BIG[0])),
        (lambda: gv.initializers.VarianceScaling(3.0, "fan_out", "untruncated_normal", seed=2), math.sqrt(3.0 / BIG[1])),
    ],
)
def test_variance_scaling_statistics(init: Any, std: float) -> None:
    v = gv.Variable(init(), shape=BIG, name="v")
    v.initializer()
    x = v.numpy()
    assert abs(x.mean()) < 0.02 * std * 10
    assert abs(x.std() - std) < 0.02 * std


def test_truncated_normal_within_two_stddev(cpu_backend: str) -> None:
    v = gv.Variable(gv.truncated_normal(list(BIG), mean=3.0, stddev=0.5, seed=4), name="t")
    v.initializer()
    x = v.numpy()
    assert x.min() >= 2.0 and x.max() <= 4.0
    assert abs(x.mean() - 3.0) < 0.01
    assert abs(x.std() - 0.5 * 0.8796) < 0.01


def test_normal_and_uniform_statistics(cpu_backend: str) -> None:
    n = gv.Variable(gv.random_normal(list(BIG), mean=-1.0, stddev=2.0, seed=5), name="n")
    u = gv.Variable(gv.random_uniform(list(BIG), minval=2.0, maxval=4.0, seed=5), name="u")
    init_all()
    x, y = n.numpy(), u.numpy()
    assert abs(x.mean() + 1.0) < 0.02 and abs(x.std() - 2.0) < 0.02
    assert y.min() >= 2.0 and y.max() < 4.0 and abs(y.mean() - 3.0) < 0.01


def test_initializer_argument_checks() -> None:
    with pytest.raises(gv.InvalidArgumentError, match="RandomUniform needs minval < maxval, got 1 and 1"):
        gv.random_uniform([2], minval=1, maxval=1)
    with pytest.raises(gv.InvalidArgumentError, match="VarianceScaling: scale must be > 0"):
        gv.initializers.VarianceScaling(scale=0)
    with pytest.raises(gv.InvalidArgumentError, match="mode must be fan_in, fan_out or fan_avg, got 'fan'"):
        gv.initializers.VarianceScaling(mode="fan")
    with pytest.raises(gv.InvalidArgumentError, match="distribution must be"):
        gv.initializers.VarianceScaling(distribution="normal")
    with pytest.raises(gv.InvalidArgumentError, match=r"Zeros: shape must be non-negative ints, got \[-1\]"):
        gv.zeros([-1])
    with pytest.raises(gv.InvalidArgumentError, match="Zeros: shape must be a sequence of ints"):
        gv.zeros("ab")  # type: ignore[arg-type]
    with pytest.raises(gv.InvalidArgumentError, match="Ones: 'floaty' is not a dtype"):
        gv.ones([2], dtype="floaty")
    with pytest.raises(gv.InvalidArgumentError, match="Constant: value must be numeric"):
        gv.constant(object())
    with pytest.raises(gv.InvalidArgumentError, match="seed must be an int or None, got 1.5"):
        gv.random_normal([2], seed=1.5)  # type: ignore[arg-type]


def test_get_by_name() -> None:
    g = gv.initializers.get("glorot_uniform")
    assert type(g) is gv.initializers.GlorotUniform
    assert repr(g) == "GlorotUniform(seed=None, scale=1.0, mode='fan_avg', distribution='uniform')"
    assert type(gv.initializers.get("HeNormal")) is gv.initializers.HeNormal
    same = gv.initializers.Zeros()
    assert gv.initializers.get(same) is same
    with pytest.raises(gv.InvalidArgumentError, match=r"unknown initializer 'glorot'; known: \['constant', 'glorot_normal'"):
        gv.initializers.get("glorot")
    with pytest.raises(gv.InvalidArgumentError, match="unknown initializer 3"):
        gv.initializers.get(3)  # type: ignore[arg-type]


def test_keras_style_call_returns_host_numpy_without_fixing_devices() -> None:
    out = gv.initializers.HeNormal(seed=1)((3, 4))
    assert type(out) is np.ndarray and out.shape == (3, 4) and out.dtype == np.float32
    assert gv.initializers.Ones()([2], dtype=np.int8).tolist() == [1, 1]
    assert gv.zeros([2])().tolist() == [0.0, 0.0]  # its own shape
    with pytest.raises(gv.InvalidArgumentError, match=r"HeNormal\(\) needs a shape"):
        gv.initializers.HeNormal()()
    gv.config.set_logical_devices("cpu", 2)  # the table is still open
    assert gv.list_devices()[:2] == ["/cpu:0", "/cpu:1"]


# --- seeds --------------------------------------------------------------------------------------


def _draw_model() -> list[np.ndarray[Any, Any]]:
    with gv.Registry():
        a = gv.Variable(gv.random_normal([5]), name="a")
        b = gv.Variable(gv.initializers.GlorotUniform(), shape=[3, 3], name="b")
        c = gv.Variable(gv.random_uniform([4], seed=9), name="c")
        init_all()
        return [a.numpy(), b.numpy(), c.numpy()]


def test_global_seed_makes_fresh_registries_identical() -> None:
    gv.set_random_seed(1234)
    first = _draw_model()
    gv.set_random_seed(1234)
    second = _draw_model()
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x, y)
    gv.set_random_seed(4321)
    third = _draw_model()
    assert not np.array_equal(first[0], third[0])


def test_op_seed_alone_is_reproducible() -> None:
    gv.set_random_seed(None)
    a = gv.Variable(gv.random_normal([6], seed=7), name="a")
    b = gv.Variable(gv.random_normal([6], seed=7), name="b")
    c = gv.Variable(gv.random_normal([6], seed=8), name="c")
    d = gv.Variable(gv.random_normal([6]), name="d")
    e = gv.Variable(gv.random_normal([6]), name="e")
    init_all()
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())
    assert not np.array_equal(d.numpy(), e.numpy())  # no seed at all: OS entropy


def test_negative_and_huge_seeds() -> None:
    gv.set_random_seed(-5)
    v = gv.Variable(gv.random_normal([3], seed=-(2**62)), name="v")
    w = gv.Variable(gv.random_normal([3], seed=2**70), name="w")
    init_all()
    assert np.all(np.isfinite(v.numpy())) and np.all(np.isfinite(w.numpy()))
    with pytest.raises(gv.InvalidArgumentError, match="seed must be an int or None, got True"):
        gv.set_random_seed(True)  # type: ignore[arg-type]


def test_reruns_of_the_init_op_draw_new_values(cpu_backend: str) -> None:
    gv.set_random_seed(3)
    v = gv.Variable(gv.random_normal([8], seed=1), name="v")
    op = v.initializer
    op()
    first = v.numpy()
    op.run()
    second = v.numpy()
    init_all()
    third = v.numpy()
    assert not np.array_equal(first, second) and not np.array_equal(second, third)


# --- init ops and initialized_value() ------------------------------------------------------------


def test_initialized_value_relation_holds_after_every_run(cpu_backend: str) -> None:
    w = gv.Variable(gv.random_normal([784, 20], stddev=0.35), name="weights")
    w2 = gv.Variable(w.initialized_value() * 2.0, name="w2")
    w3 = gv.Variable(np.exp(w.initialized_value()) + w2.initialized_value(), name="w3")
    assert not w2.initialized and w2.shape == (784, 20) and w2.dtype == np.float32
    assert w3.shape == (784, 20) and w3.dtype == np.float32
    previous = None
    for _ in range(3):
        init_all()
        x = w.numpy()
        np.testing.assert_array_equal(w2.numpy(), 2.0 * x)
        np.testing.assert_allclose(w3.numpy(), np.exp(x) + 2.0 * x, rtol=1e-5)
        assert previous is None or not np.array_equal(previous, x)
        previous = x


def test_variables_initializer_order_independence() -> None:
    base = gv.Variable(gv.random_uniform([4]), name="base")
    derived = gv.Variable(base.initialized_value() + 1.0, name="derived")
    top = gv.Variable(derived.initialized_value() * derived.initialized_value(), name="top")
    op = gv.variables_initializer([top, derived, base])
    assert op.name == "init" and "init" in repr(op)
    op()
    np.testing.assert_allclose(derived.numpy(), base.numpy() + 1.0)
    np.testing.assert_allclose(top.numpy(), derived.numpy() ** 2, rtol=1e-6)


def test_initialized_outside_dependency_uses_its_current_value() -> None:
    base = gv.Variable(np.array([1.0, 2.0], np.float32), name="base")  # eager: not in any init op
    derived = gv.Variable(base.initialized_value() * 10, name="derived")
    base.assign([3.0, 4.0])
    gv.variables_initializer([derived])()
    assert derived.numpy().tolist() == [30.0, 40.0]
    base.assign([5.0, 6.0])
    init_all()  # base's initializer is a no-op: its current value is used again
    assert base.numpy().tolist() == [5.0, 6.0]
    assert derived.numpy().tolist() == [50.0, 60.0]


def test_uninitialized_outside_dependency_initializes_nothing() -> None:
    base = gv.Variable(gv.zeros([2]), name="base")
    other = gv.Variable(gv.ones([2]), name="other")
    derived = gv.Variable(base.initialized_value() * 2, name="derived")
    with pytest.raises(gv.UninitializedVariableError, match=r"variable 'derived' is initialized from 'base'.*'base' is not initialized and is not part of this init op"):
        gv.variables_initializer([other, derived])()
    assert not other.initialized and not derived.initialized
    with pytest.raises(gv.UninitializedVariableError, match="'base' is not initialized"):
        derived.initializer()


def test_dependency_cycle_is_reported() -> None:
    a = gv.Variable(gv.zeros([2]), name="a")
    b = gv.Variable(a.initialized_value() + 1, name="b")
    # The public API cannot build a cycle (a variable's initial value is fixed before
    # any variable can refer to it), so this test closes one through private fields.
    a._init = b.initialized_value() * 2
    a._deps = (b,)
    with pytest.raises(gv.InvalidArgumentError, match=r"initial values form a dependency cycle: (a -> b -> a|b -> a -> b)"):
        init_all()
    assert not a.initialized and not b.initialized


def test_eager_initializer_is_a_no_op(cpu_backend: str) -> None:
    v = gv.Variable([1.0, 2.0], name="v")
    v.assign([5.0, 6.0])
    op = v.initializer
    assert op.name == "v/Assign" and repr(op) == "<gpuvars.Op 'v/Assign'>"
    op()
    init_all()
    assert v.numpy().tolist() == [5.0, 6.0]


def test_report_and_is_initialized_with_lists() -> None:
    a = gv.Variable(gv.zeros([1]), name="a")
    b = gv.Variable(1.0, name="b")
    assert gv.report_uninitialized_variables([a, b]) == ["a"]
    assert gv.report_uninitialized_variables([b]) == []
    assert gv.is_variable_initialized(b) and not gv.is_variable_initialized(a)
    with pytest.raises(gv.InvalidArgumentError, match="is_variable_initialized expects a Variable, got ndarray"):
        gv.is_variable_initialized(np.zeros(1))  # type: ignore[arg-type]
    with pytest.raises(gv.InvalidArgumentError, match="variables_initializer expects Variables, got str"):
        gv.variables_initializer([a, "b"])  # type: ignore[list-item]


def test_global_initializer_takes_the_variables_alive_at_the_call() -> None:
    a = gv.Variable(gv.ones([1]), name="a")
    op = gv.global_variables_initializer()
    later = gv.Variable(gv.ones([1]), name="later")
    op()
    assert a.initialized and not later.initialized


def test_init_op_holds_variables_weakly() -> None:
    import gc
    import weakref

    a = gv.Variable(gv.ones([1]), name="a")
    op = gv.global_variables_initializer()
    ref = weakref.ref(a)
    del a
    gc.collect()
    assert ref() is None
    op()  # nothing left to do


def test_expression_is_deferred() -> None:
    w = gv.Variable(gv.zeros([2, 3], dtype=np.int32), name="w")
    e = w.initialized_value()
    assert e.shape == (2, 3) and e.dtype == np.int32
    assert (e / 2).dtype == np.float64 and (e + np.ones(3, np.float32)).dtype == np.float64
    assert (-e < 1).dtype == np.bool_
    assert "deferred expression over ['w']" in repr(e * 2)
    with pytest.raises(TypeError, match="no truth value until an init op runs"):
        bool(e)
    with pytest.raises(TypeError, match="it has no value until an init op runs"):
        np.asarray(e)
    f = gv.Variable(lambda: np.zeros(2), name="f")
    assert (f.initialized_value() + 1).shape is None and f.initialized_value().dtype is None
    both = w.initialized_value() + w.initialized_value() * gv.Variable(2, name="two").initialized_value()
    assert [v.name for v in both.variables()] == ["w", "two"]


def test_expression_dtype_follows_the_explicit_dtype() -> None:
    w = gv.Variable(gv.ones([2]), name="w")
    d = gv.Variable(w.initialized_value() * 3, name="d", dtype=np.float16)
    init_all()
    assert d.dtype == np.float16 and d.numpy().tolist() == [3.0, 3.0]


def test_expression_across_devices(four_cpus: str) -> None:
    w = gv.Variable(gv.random_normal([3]), name="w", device="/cpu:1")
    w2 = gv.Variable(w.initialized_value() * 2, name="w2", device="/cpu:2")
    init_all()
    assert w2.device == "/cpu:2"
    np.testing.assert_array_equal(w2.numpy(), 2 * w.numpy())
    if four_cpus == "jax":
        import jax

        assert jax_device_of(w.value()) == jax.devices("cpu")[1]
        assert jax_device_of(w2.value()) == jax.devices("cpu")[2]


@needs_jax
def test_random_draws_happen_on_the_variables_device() -> None:
    import jax

    gv.config.set_cpu_backend("jax")
    v = gv.Variable(gv.random_normal([4]), name="v", device="/cpu:3")
    g = gv.Variable(gv.initializers.GlorotUniform(), shape=[2, 2], name="g", device="/cpu:2")
    init_all()
    assert jax_device_of(v.value()) == jax.devices("cpu")[3]
    assert jax_device_of(g.value()) == jax.devices("cpu")[2]


# --- callables ----------------------------------------------------------------------------------


def test_zero_argument_callable(cpu_backend: str) -> None:
    calls = []

    def make() -> list[float]:
        calls.append(1)
        return [1.0, 2.0, 3.0]

    v = gv.Variable(make, name="v")
    assert not v.initialized and v.declared_shape is None and calls == []
    with pytest.raises(gv.UninitializedVariableError, match="no known shape"):
        _ = v.shape
    init_all()
    assert v.dtype == np.float32 and v.shape == (3,) and v.declared_shape == (3,)
    assert v.numpy().tolist() == [1.0, 2.0, 3.0] and calls == [1]


def test_callable_shape_is_fixed_at_first_init() -> None:
    sizes = iter([3, 4])
    v = gv.Variable(lambda: np.zeros(next(sizes), np.float32), name="v")
    v.initializer()
    with pytest.raises(gv.InvalidArgumentError, match=r"initializing variable 'v': the initial value's shape \(4,\) is not compatible with the declared shape \(3,\)"):
        v.initializer()
    assert v.shape == (3,)


def test_callable_with_validate_shape_false_may_change_shape() -> None:
    sizes = iter([3, 4])
    v = gv.Variable(lambda: np.zeros(next(sizes), np.float32), name="v", validate_shape=False)
    v.initializer()
    v.initializer()
    assert v.shape == (4,)


def test_callable_with_declared_shape_and_dtype() -> None:
    v = gv.Variable(lambda: [[1, 2]], name="v", shape=(None, 2), dtype=np.float64)
    assert v.dtype == np.float64
    v.initializer()
    assert v.numpy().dtype == np.float64 and v.shape == (1, 2)
    bad = gv.Variable(lambda: [1.5], name="bad", dtype=np.int32)
    with pytest.raises(gv.InvalidArgumentError, match="float32 to the variable's dtype int32"):
        bad.initializer()


class KerasLike:
    """A Keras-style initializer object of another library: called as init(shape, dtype)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any]] = []

    def __call__(self, shape: Any, dtype: Any = None) -> np.ndarray[Any, Any]:
        self.calls.append((shape, dtype))
        return np.full(shape, 0.5, dtype=dtype)


def test_keras_style_initializer_objects_need_shape() -> None:
    init = KerasLike()
    with pytest.raises(gv.InvalidArgumentError, match=r"variable 'k': the initializer KerasLike needs a fully defined shape="):
        gv.Variable(init, name="k")
    with pytest.raises(gv.InvalidArgumentError, match="needs a fully defined shape"):
        gv.Variable(gv.initializers.RandomNormal(), name="r")
    k = gv.Variable(init, name="k", shape=[2, 3])
    assert k.dtype == np.float32 and k.shape == (2, 3) and not k.initialized
    k.initializer()
    assert init.calls == [((2, 3), np.dtype(np.float32))]
    assert k.numpy().tolist() == [[0.5] * 3] * 2

    def plain(shape: Any, dtype: Any) -> np.ndarray[Any, Any]:
        return np.ones(shape, dtype)

    p = gv.Variable(plain, name="p", shape=[2], dtype=np.float16)
    p.initializer()
    assert p.numpy().dtype == np.float16 and p.numpy().tolist() == [1.0, 1.0]


def test_initializer_classes_are_callables_with_their_own_shape() -> None:
    # an Initializer with its own shape needs no shape= (it is not a bare Keras object)
    v = gv.Variable(initializers.RandomUniform(shape=[3], seed=1), name="v")
    assert v.shape == (3,)
