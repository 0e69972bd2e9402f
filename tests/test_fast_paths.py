"""The fast paths of the fixed-costs issue, on the cases they could get wrong: the one-pass
scatter bounds check, JAX's compiled (cached) updates and scatters, and strategy.run on
persistent replica threads with a one-wait rendezvous.

Every check compares against plain numpy computing the same thing; nothing is mocked.
"""

from __future__ import annotations

import contextvars
import gc
import threading
import time
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import gpuvars as gv
from conftest import jax_device_of, needs_jax
from gpuvars.variable import scatter_indices

DEVICES = ["/cpu:0", "/cpu:1", "/cpu:2", "/cpu:3"]
BF16 = np.dtype(ml_dtypes.bfloat16)


def _jax_cpu(i: int) -> Any:
    import jax

    return jax.devices("cpu")[i]


# --- scatter_indices: one bounds check ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32, np.uint64])
def test_scatter_indices_accepts_every_integer_dtype(dtype: Any) -> None:
    flat = scatter_indices(np.array([[0, 3], [7, 3]], dtype=dtype), 8, "op")
    assert flat.dtype == np.int64 and flat.tolist() == [0, 3, 7, 3]


@pytest.mark.parametrize(
    ("indices", "bad"),
    [([0, -1, 2], -1), ([8], 8), ([3, 9, -4], 9), (np.array([2**63 + 5], np.uint64), 2**63 + 5),
     (np.array([-128], np.int8), -128), ([2**40], 2**40)],
)
def test_scatter_indices_names_the_first_bad_index(indices: Any, bad: int) -> None:
    with pytest.raises(gv.InvalidArgumentError, match=rf"op: index {bad} is out of range \[0, 8\)"):
        scatter_indices(np.asarray(indices), 8, "op")


@pytest.mark.parametrize("count", [64, 65, 5000])  # both sides of the small/large split
def test_scatter_indices_many(count: int) -> None:
    idx = np.arange(count, dtype=np.int64) % 50
    assert scatter_indices(idx, 50, "op").tolist() == idx.tolist()
    for bad in (-3, 50):
        wrong = idx.copy()
        wrong[count - 2] = bad
        wrong[count - 1] = 99  # later bad indices are not the one named
        with pytest.raises(gv.InvalidArgumentError, match=rf"index {bad} is out of range \[0, 50\)"):
            scatter_indices(wrong, 50, "op")


def test_scatter_indices_edges() -> None:
    assert scatter_indices(np.array([], np.int64), 0, "op").size == 0  # empty: nothing to check
    assert scatter_indices(np.zeros((0, 3), np.int32), 5, "op").shape == (0,)
    assert scatter_indices(np.int64(4), 5, "op").tolist() == [4]  # 0-d index
    assert scatter_indices([4, 0], 5, "op").tolist() == [4, 0]  # a list
    with pytest.raises(gv.InvalidArgumentError, match="index 0 is out of range"):
        scatter_indices(np.array([0]), 0, "op")  # no rows at all
    strided = np.arange(20, dtype=np.int64)[::5]  # non-contiguous: [0, 5, 10, 15]
    assert scatter_indices(strided, 16, "op").tolist() == [0, 5, 10, 15]
    with pytest.raises(gv.InvalidArgumentError, match="index 15 is out of range"):
        scatter_indices(strided, 15, "op")
    transposed = np.array([[0, 1], [2, 3]], np.int32).T
    assert scatter_indices(transposed, 4, "op").tolist() == [0, 2, 1, 3]
    with pytest.raises(gv.InvalidArgumentError, match="indices must be integers"):
        scatter_indices(np.array([1.0]), 4, "op")


def test_scatter_indices_does_not_write_into_the_callers_array() -> None:
    idx = np.array([3, 1], np.int64)
    flat = scatter_indices(idx, 4, "op")
    flat_u = scatter_indices(np.array([3, 1], np.uint8), 4, "op")
    assert idx.tolist() == [3, 1] and flat.tolist() == [3, 1] and flat_u.tolist() == [3, 1]


# --- scatter through a variable, on numpy and JAX ----------------------------------------------------


def _expected(op: str, base: np.ndarray, idx: np.ndarray, upd: np.ndarray) -> np.ndarray:
    out = base.copy()
    if op == "update":
        out[idx] = upd
    else:
        ufunc = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.true_divide,
                 "min": np.minimum, "max": np.maximum}[op]
        ufunc.at(out, idx, upd)
    return out


@pytest.mark.parametrize("op", ["update", "add", "sub", "mul", "div", "min", "max"])
def test_scatter_with_duplicate_indices(cpu_backend: str, op: str) -> None:
    base = np.arange(1.0, 7.0, dtype=np.float32)
    idx = np.array([1, 4, 1, 1], np.int64)
    upd = np.array([2.0, 3.0, 2.0, 2.0], np.float32)  # duplicates carry equal values for "update"
    v = gv.Variable(base, name="v")
    getattr(v, f"scatter_{op}")(idx, upd)
    np.testing.assert_allclose(v.numpy(), _expected(op, base, idx, upd), rtol=1e-6)


def test_scatter_2d_rows_non_contiguous_and_empty(cpu_backend: str) -> None:
    base = np.arange(12, dtype=np.float32).reshape(4, 3)
    v = gv.Variable(base, name="v")
    upd = np.arange(100, 112, dtype=np.float32).reshape(3, 4).T[:2]  # non-contiguous (2, 3)
    v.scatter_update(np.array([3, 0]), upd)
    want = base.copy()
    want[[3, 0]] = upd
    np.testing.assert_array_equal(v.numpy(), want)
    v.scatter_add(np.zeros(0, np.int64), np.zeros((0, 3), np.float32))  # empty: no change
    np.testing.assert_array_equal(v.numpy(), want)
    v.scatter_add(np.array([[1, 1], [2, 1]]), np.ones((2, 2, 3), np.float32))  # 2-d indices
    want[1] += 3
    want[2] += 1
    np.testing.assert_array_equal(v.numpy(), want)


def test_scatter_out_of_range_leaves_the_variable_unchanged(cpu_backend: str) -> None:
    v = gv.Variable(np.zeros(4, np.float32), name="v")
    for bad in (4, -1):
        with pytest.raises(gv.InvalidArgumentError, match=rf"scatter_update on variable 'v': index {bad} is out of range"):
            v.scatter_update(np.array([0, bad]), np.ones(2, np.float32))
    np.testing.assert_array_equal(v.numpy(), np.zeros(4))


def test_scatter_bfloat16_and_integer_storage(cpu_backend: str) -> None:
    v = gv.Variable(np.zeros(5, BF16), name="b")
    v.scatter_add(np.array([0, 0, 3]), np.array([1.5, 1.5, -2.0], BF16))
    assert v.dtype == BF16
    np.testing.assert_array_equal(v.numpy().astype(np.float32), [3.0, 0, 0, -2.0, 0])
    i = gv.Variable(np.array([10, 20, 30], np.int32), name="i")
    i.scatter_sub(np.array([2, 2]), np.array([5, 5], np.int32))
    i.scatter_max(np.array([0]), np.array([15], np.int32))
    assert i.numpy().tolist() == [15, 20, 20] and i.dtype == np.int32


# --- JAX: compiled, cached updates ----------------------------------------------------------------------


@needs_jax
def test_jax_updates_keep_dtype_device_and_values() -> None:
    gv.config.set_cpu_backend("jax")
    gv.config.set_logical_devices("cpu", 4)
    for dtype in (np.float32, BF16, np.int32, np.uint8, np.float16):
        v = gv.Variable(np.arange(6).astype(dtype), name="v", device="/cpu:2")
        want = np.arange(6).astype(dtype)
        v.assign_add(np.full(6, 3, dtype))
        v.assign_sub(np.ones(6, dtype))
        want = want + np.full(6, 3, dtype) - np.ones(6, dtype)
        v.scatter_add(np.array([5, 5]), np.ones(2, dtype))
        want[5] += 2
        np.testing.assert_array_equal(v.numpy(), want.astype(dtype))
        assert v.dtype == np.dtype(dtype) and v.value().dtype == np.dtype(dtype)
        assert jax_device_of(v.value()) == _jax_cpu(2)


@needs_jax
def test_jax_zero_d_and_empty_variables() -> None:
    gv.config.set_cpu_backend("jax")
    s = gv.Variable(np.float32(2.0), name="s")
    s.assign_add(np.float32(0.5))
    s.assign_sub(np.float32(1.0))
    assert s.shape == () and float(s.numpy()) == 1.5
    with pytest.raises(gv.InvalidArgumentError, match="scalar variable has no rows"):
        s.scatter_update(np.array([0]), np.ones(1, np.float32))
    e = gv.Variable(np.zeros((0, 3), np.float32), name="e")
    e.assign_add(np.zeros((0, 3), np.float32))
    e.scatter_add(np.zeros(0, np.int64), np.zeros((0, 3), np.float32))
    assert e.shape == (0, 3)
    with pytest.raises(gv.InvalidArgumentError, match="index 0 is out of range"):
        e.scatter_update(np.array([0]), np.ones((1, 3), np.float32))


@needs_jax
def test_jax_compiled_updates_follow_a_reshaped_variable() -> None:
    # the compiled functions are cached per shape and dtype: a dynamic-shape assign that
    # changes the shape must get a new executable, not the old one's result shape
    gv.config.set_cpu_backend("jax")
    v = gv.Variable(np.zeros(4, np.float32), name="v", shape=(None,))
    v.assign_add(np.ones(4, np.float32))
    v.scatter_add(np.array([1]), np.ones(1, np.float32))
    v.assign(np.arange(7, dtype=np.float32))
    v.assign_add(np.ones(7, np.float32))
    v.scatter_update(np.array([6, 0]), np.array([-1, -2], np.float32))
    np.testing.assert_array_equal(v.numpy(), [-2, 2, 3, 4, 5, 6, -1])
    w = gv.Variable(np.zeros((2, 2), np.float32), name="w", validate_shape=False)
    w.assign_add(np.ones((2, 2), np.float32))
    w.assign(np.ones((3, 1), np.float32))
    w.assign_sub(np.full((3, 1), 2.0, np.float32))
    w.scatter_add(np.array([2]), np.ones((1, 1), np.float32))
    np.testing.assert_array_equal(w.numpy(), [[-1], [-1], [0]])


@needs_jax
def test_jax_updates_never_delete_an_array_someone_holds() -> None:
    # no buffer donation: the value read before an update stays readable afterwards
    gv.config.set_cpu_backend("jax")
    v = gv.Variable(np.arange(4, dtype=np.float32), name="v")
    held = v.value()
    v.assign_add(np.ones(4, np.float32))
    v.scatter_update(np.array([0]), np.array([9], np.float32))
    np.testing.assert_array_equal(np.asarray(held), [0, 1, 2, 3])
    assert not held.is_deleted()
    np.testing.assert_array_equal(v.numpy(), [9, 2, 3, 4])


@needs_jax
def test_jax_updates_from_a_non_contiguous_host_value_and_a_jax_value() -> None:
    import jax

    gv.config.set_cpu_backend("jax")
    v = gv.Variable(np.zeros((3, 2), np.float32), name="v")
    v.assign_add(np.arange(12, dtype=np.float32).reshape(2, 6).T[::2])  # strided (3, 2)
    v.assign_add(jax.device_put(np.ones((3, 2), np.float32), _jax_cpu(0)))
    np.testing.assert_array_equal(v.numpy(), np.arange(12, dtype=np.float32).reshape(2, 6).T[::2] + 1)


# --- strategy.run on persistent threads -------------------------------------------------------------------


@pytest.fixture
def strategy(four_cpus: str) -> gv.MirroredStrategy:
    return gv.MirroredStrategy(DEVICES)


def _replica_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("gpuvars-replica-") and "file" not in t.name]


def test_run_reuses_its_threads_and_replica_0_runs_on_the_caller(strategy: gv.MirroredStrategy) -> None:
    first = strategy.run(lambda: threading.get_ident()).values
    second = strategy.run(lambda: threading.get_ident()).values
    assert first == second and len(set(first)) == 4
    assert first[0] == threading.get_ident()
    assert strategy.run(lambda: gv.get_replica_context().replica_id_in_sync_group).values == (0, 1, 2, 3)
    assert gv.get_replica_context() is None  # the caller's context is untouched afterwards


_probe: contextvars.ContextVar[str] = contextvars.ContextVar("probe", default="unset")


def test_each_run_sees_the_callers_context_at_call_time(strategy: gv.MirroredStrategy) -> None:
    def seen() -> tuple[str, str, str, Any]:
        return (_probe.get(), gv.get_strategy() is strategy, gv.global_variables()[0].name, gv.get_replica_context())

    with gv.Registry():
        keep_a = gv.Variable(1.0, name="first_registry")
        token = _probe.set("a")
        out_a = strategy.run(seen).values
        _probe.reset(token)
    with gv.Registry():
        keep_b = gv.Variable(1.0, name="second_registry")
        token = _probe.set("b")
        out_b = strategy.run(seen).values
        _probe.reset(token)
    assert [o[:3] for o in out_a] == [("a", True, "first_registry")] * 4
    assert [o[:3] for o in out_b] == [("b", True, "second_registry")] * 4
    assert [o[3].replica_id_in_sync_group for o in out_b] == [0, 1, 2, 3]
    del keep_a, keep_b

    def set_it() -> None:  # a replica's own changes stay in that call
        _probe.set("replica")

    strategy.run(set_it)
    assert strategy.run(lambda: _probe.get()).values == ("unset",) * 4


def test_run_sees_the_callers_device_scope(strategy: gv.MirroredStrategy) -> None:
    def where() -> str | None:
        spec = gv.devices.current_device_spec("probe", "x")
        return None if spec is None else spec.to_string()

    with gv.device("/job:ps/task:3"):
        inside = strategy.run(where).values
    outside = strategy.run(where).values
    assert inside == ("/job:ps/task:3",) * 4
    assert outside == (None,) * 4


def test_run_reraises_a_replica_exception_and_stays_usable(strategy: gv.MirroredStrategy) -> None:
    with strategy.scope():
        w = gv.Variable(np.zeros(2, np.float32), name="w", aggregation=gv.VariableAggregation.SUM)

    def step(fail: int) -> None:
        if gv.get_replica_context().replica_id_in_sync_group == fail:
            raise KeyError(f"replica {fail}")
        w.assign_add(np.ones(2, np.float32))  # the others wait at the rendezvous, then give up

    for fail in (0, 3):
        with pytest.raises(KeyError, match=f"replica {fail}"):
            strategy.run(step, args=(fail,))
    strategy.run(lambda: w.assign_add(np.ones(2, np.float32)))  # a later call is unaffected
    for c in w.values:
        np.testing.assert_array_equal(c.numpy(), [4, 4])

    def combine_fails() -> Any:  # the combine step raising reaches every replica, then the caller
        return gv.get_replica_context()._exchange(1, lambda values: 1 // 0)

    with pytest.raises(ZeroDivisionError):
        strategy.run(combine_fails)
    assert strategy.run(lambda: 7).values == (7,) * 4


def test_many_collectives_in_one_run_with_one_wait_each(strategy: gv.MirroredStrategy) -> None:
    # a fast replica reaching the next collective must not overwrite a slot or result
    # another replica still needs
    def step() -> list[float]:
        ctx = gv.get_replica_context()
        rid = ctx.replica_id_in_sync_group
        out = []
        for k in range(200):
            if rid == (k % 4):
                time.sleep(0)  # shuffle who arrives last
            total = ctx.all_reduce("sum", np.full(1, float(rid + k), np.float32))
            out.append(float(np.asarray(total)[0]))
        return out

    for values in strategy.run(step).values:
        assert values == [float(6 + 4 * k) for k in range(200)]


def test_concurrent_and_nested_runs_do_not_deadlock(strategy: gv.MirroredStrategy) -> None:
    # one variable per calling thread: concurrent unsynchronized updates of one JAX
    # variable (read, compute, rebind) may lose updates, with or without a strategy
    with strategy.scope():
        ws = [gv.Variable(np.zeros(1, np.float32), name=f"w{k}", aggregation=gv.VariableAggregation.SUM) for k in range(3)]
    errors: list[BaseException] = []

    def caller(w: gv.Variable) -> None:
        try:
            for _ in range(25):
                strategy.run(lambda: w.assign_add(np.ones(1, np.float32)))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(w,)) for w in ws]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "concurrent strategy.run calls deadlocked"
    assert not errors
    for w in ws:
        for c in w.values:  # 25 runs x 4 replicas of 1
            np.testing.assert_array_equal(c.numpy(), [100.0])

    def nested() -> Any:
        return strategy.run(lambda: gv.get_replica_context().replica_id_in_sync_group).values

    out = strategy.run(nested).values
    assert out == ((0, 1, 2, 3),) * 4


def test_replica_threads_end_with_the_strategy(four_cpus: str) -> None:
    before = set(_replica_threads())
    strategy = gv.MirroredStrategy(DEVICES)
    strategy.run(lambda: None)
    mine = [t for t in _replica_threads() if t not in before]
    assert len(mine) == 3 and all(t.daemon for t in mine)
    del strategy
    gc.collect()
    for t in mine:
        t.join(10)
    assert not any(t.is_alive() for t in mine)


def test_replica_threads_end_after_a_failed_run(four_cpus: str) -> None:
    # a replica's exception (with its traceback) must not keep the strategy alive in a thread
    before = set(_replica_threads())
    strategy = gv.MirroredStrategy(DEVICES)
    with pytest.raises(ValueError):
        strategy.run(lambda: (_ for _ in ()).throw(ValueError("boom")))
    mine = [t for t in _replica_threads() if t not in before]
    del strategy
    gc.collect()
    for t in mine:
        t.join(10)
    assert mine and not any(t.is_alive() for t in mine)


def test_one_replica_runs_inline_without_threads(cpu_backend: str) -> None:
    strategy = gv.MirroredStrategy(["/cpu:0"])
    assert strategy.run(lambda: threading.get_ident()) == threading.get_ident()
    assert strategy._pool is None
