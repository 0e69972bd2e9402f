"""MirroredStrategy, mirrored / sync-on-read / sharded variables on 4 logical CPU devices
(numpy) and 4 JAX CPU devices, following tf.distribute's rules."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import gpuvars as gv

DEVICES = ["/cpu:0", "/cpu:1", "/cpu:2", "/cpu:3"]


@pytest.fixture
def strategy(four_cpus: str) -> gv.MirroredStrategy:
    return gv.MirroredStrategy(DEVICES)


def _device_of(v: gv.Variable) -> str:
    """The device a component's storage is on, as the backend reports it."""
    arr = v.value()
    if hasattr(arr, "devices"):
        return f"/cpu:{next(iter(arr.devices())).id}"
    return v.device


def test_variable_in_scope_is_mirrored_and_a_variable(strategy: gv.MirroredStrategy) -> None:
    with strategy.scope():
        w = gv.Variable(np.arange(4.0, dtype=np.float32), name="w")
    assert isinstance(w, gv.MirroredVariable) and isinstance(w, gv.Variable)
    assert [c.name for c in w.values] == [f"w/replica_{k}" for k in range(4)]
    assert [c.device for c in w.values] == DEVICES
    assert [_device_of(c) for c in w.values] == DEVICES
    assert w.primary is w.values[0]
    # registered once, under the logical name; components are not
    assert [v.name for v in gv.global_variables()] == ["w"]
    # distinct buffers
    storages = [c.value() for c in w.values]
    assert all(not np.shares_memory(np.asarray(a), np.asarray(b)) for a in storages for b in storages if a is not b)
    np.testing.assert_array_equal(w.numpy(), np.arange(4.0))


def test_cross_replica_assign_writes_every_component(strategy: gv.MirroredStrategy) -> None:
    with strategy.scope():
        w = gv.Variable(np.zeros(3, np.float32), name="w")
    w.assign(np.array([1, 2, 3], np.float32))
    w.assign_add(np.ones(3, np.float32))
    for c in w.values:
        np.testing.assert_array_equal(c.numpy(), [2, 3, 4])
    assert w.components_agree()


def test_deferred_initializer_materialized_once_and_copied(strategy: gv.MirroredStrategy) -> None:
    with strategy.scope():
        w = gv.Variable(gv.random_normal([5, 3], seed=7), name="w")
    assert not w.initialized
    gv.global_variables_initializer().run()
    assert w.initialized and w.components_agree()
    assert [_device_of(c) for c in w.values] == DEVICES


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        (gv.VariableAggregation.SUM, 0 + 1 + 2 + 3),
        (gv.VariableAggregation.MEAN, (0 + 1 + 2 + 3) / 4),
        (gv.VariableAggregation.ONLY_FIRST_REPLICA, 0),
    ],
)
def test_replica_context_aggregated_update(strategy: gv.MirroredStrategy, aggregation: gv.VariableAggregation, expected: float) -> None:
    with strategy.scope():
        w = gv.Variable(np.zeros(2, np.float32), name="w", aggregation=aggregation)

    def step() -> None:
        rid = gv.get_replica_context().replica_id_in_sync_group
        w.assign_add(np.full(2, rid, np.float32))

    strategy.run(step)
    for c in w.values:
        np.testing.assert_allclose(c.numpy(), [expected, expected])
    assert [_device_of(c) for c in w.values] == DEVICES


def test_replica_context_none_aggregation_updates_local_copy_only(strategy: gv.MirroredStrategy) -> None:
    with strategy.scope():
        w = gv.Variable(np.zeros(1, np.float32), name="w")
    strategy.run(lambda: w.assign_add(np.full(1, gv.get_replica_context().replica_id_in_sync_group + 1.0, np.float32)))
    assert [float(c.numpy()[0]) for c in w.values] == [1.0, 2.0, 3.0, 4.0]
    assert not w.components_agree()


def test_replica_reads_local_component(strategy: gv.MirroredStrategy) -> None:
    with strategy.scope():
        w = gv.Variable(np.zeros(1, np.float32), name="w")
    for k, c in enumerate(w.values):
        c.assign(np.full(1, k, np.float32))
    out = strategy.run(lambda: float(w.numpy()[0]))
    assert isinstance(out, gv.PerReplica) and out.values == (0.0, 1.0, 2.0, 3.0)
    assert float(w.numpy()[0]) == 0.0  # cross-replica reads the primary


def test_mean_on_int_variable_in_replica_context_is_an_error(strategy: gv.MirroredStrategy) -> None:
    with strategy.scope():
        w = gv.Variable(np.zeros(2, np.int32), name="steps", aggregation=gv.VariableAggregation.MEAN)
    with pytest.raises(gv.InvalidArgumentError, match="non-float variables with VariableAggregation.MEAN"):
        strategy.run(lambda: w.assign_add(np.ones(2, np.int32)))


def test_per_replica_inputs_and_reduce(strategy: gv.MirroredStrategy) -> None:
    data = strategy.experimental_distribute_values_from_function(
        lambda ctx: np.full(3, ctx.replica_id_in_sync_group, np.float32)
    )
    out = strategy.run(lambda x: x * 2, args=(data,))
    np.testing.assert_array_equal(np.asarray(strategy.reduce("SUM", out)), [12, 12, 12])
    np.testing.assert_array_equal(np.asarray(strategy.reduce(gv.ReduceOp.MEAN, out)), [3, 3, 3])
    assert strategy.num_replicas_in_sync == 4


def test_all_reduce_in_replica_context(strategy: gv.MirroredStrategy) -> None:
    out = strategy.run(lambda: gv.get_replica_context().all_reduce("sum", np.ones(2, np.float32)))
    for v in out.values:
        np.testing.assert_array_equal(np.asarray(v), [4, 4])


def test_replicas_run_in_parallel_threads(strategy: gv.MirroredStrategy) -> None:
    names = strategy.run(lambda: threading.current_thread().name)
    assert len(set(names.values)) == 4


def test_failure_in_one_replica_does_not_hang(strategy: gv.MirroredStrategy) -> None:
    with strategy.scope():
        w = gv.Variable(np.zeros(1, np.float32), name="w", aggregation=gv.VariableAggregation.SUM)

    def step() -> None:
        if gv.get_replica_context().replica_id_in_sync_group == 2:
            raise ValueError("replica 2 failed")
        w.assign_add(np.ones(1, np.float32))

    with pytest.raises(ValueError, match="replica 2 failed"):
        strategy.run(step)


def test_sync_on_read(strategy: gv.MirroredStrategy) -> None:
    with strategy.scope():
        total = gv.Variable(
            np.zeros(1, np.float32), name="total",
            synchronization=gv.VariableSynchronization.ON_READ, aggregation=gv.VariableAggregation.SUM,
        )
        mean = gv.Variable(
            np.zeros(1, np.float32), name="mean",
            synchronization=gv.VariableSynchronization.ON_READ, aggregation=gv.VariableAggregation.MEAN,
        )
    assert isinstance(total, gv.SyncOnReadVariable) and not total.trainable

    def step() -> None:
        rid = gv.get_replica_context().replica_id_in_sync_group
        total.assign_add(np.full(1, rid + 1.0, np.float32))
        mean.assign(np.full(1, rid * 2.0, np.float32))

    strategy.run(step)
    assert float(total.numpy()[0]) == 10.0  # 1+2+3+4, reduced on the cross-replica read
    assert float(mean.numpy()[0]) == 3.0  # mean of 0, 2, 4, 6
    # cross-replica assign with SUM divides by the replica count
    total.assign(np.full(1, 8.0, np.float32))
    assert [float(c.numpy()[0]) for c in total.values] == [2.0] * 4
    assert float(total.numpy()[0]) == 8.0
    with pytest.raises(gv.InvalidArgumentError, match="does not support `assign_add` in cross-replica context"):
        total.assign_add(np.ones(1, np.float32))
    with pytest.raises(gv.InvalidArgumentError, match="not supported on SyncOnReadVariable"):
        total.scatter_add([0], np.ones(1, np.float32))


def test_on_read_trainable_is_rejected(strategy: gv.MirroredStrategy) -> None:
    with strategy.scope(), pytest.raises(gv.InvalidArgumentError, match="non-trainable"):
        gv.Variable(1.0, synchronization=gv.VariableSynchronization.ON_READ, trainable=True)


def test_strategy_validation(four_cpus: str) -> None:
    with pytest.raises(gv.InvalidArgumentError, match="same device"):
        gv.MirroredStrategy(["/cpu:1", "/cpu:1"])
    with pytest.raises(gv.InvalidArgumentError, match="non-empty list"):
        gv.MirroredStrategy([])
    assert gv.MirroredStrategy().devices == ("/cpu:0",)  # no GPU here: the default is the CPU


def test_mirrored_scatter_cross_replica(strategy: gv.MirroredStrategy) -> None:
    with strategy.scope():
        w = gv.Variable(np.zeros((4, 2), np.float32), name="w")
    w.scatter_add([1, 1, 3], np.ones((3, 2), np.float32))
    for c in w.values:
        np.testing.assert_array_equal(c.numpy()[:, 0], [0, 2, 0, 1])


# --- sharded -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("partitioner", "shards"),
    [
        (gv.FixedShardsPartitioner(3), [4, 3, 3]),
        (gv.FixedShardsPartitioner(20), [1] * 10),
        (gv.MinSizePartitioner(min_shard_bytes=100, max_shards=4), [4, 3, 3]),  # 320 B // 100
        (gv.MinSizePartitioner(min_shard_bytes=64, max_shards=4), [3, 3, 2, 2]),  # 5, capped at 4
        (gv.MaxSizePartitioner(max_shard_bytes=8 * 4 * 4), [4, 3, 3]),
        (gv.MaxSizePartitioner(max_shard_bytes=8, max_shards=2), [5, 5]),
    ],
)
def test_partitioners(four_cpus: str, partitioner: gv.Partitioner, shards: list[int]) -> None:
    full = np.arange(80, dtype=np.float32).reshape(10, 8)
    s = gv.ShardedVariable(full, partitioner, name="emb", devices=DEVICES)
    assert [v.shape[0] for v in s.variables] == shards
    assert list(s.devices) == [DEVICES[k % 4] for k in range(len(shards))]
    np.testing.assert_array_equal(s.numpy(), full)
    assert [v.name for v in gv.global_variables()] == ["emb"]


def test_sharded_assign_and_scatter_routed(four_cpus: str) -> None:
    full = np.zeros((10, 2), np.float32)
    s = gv.ShardedVariable(full, gv.FixedShardsPartitioner(3), name="emb", devices=DEVICES[:3])
    s.assign(np.arange(20, dtype=np.float32).reshape(10, 2))
    np.testing.assert_array_equal(s.variables[1].numpy(), [[8, 9], [10, 11], [12, 13]])
    s.scatter_add([0, 5, 9, 9], np.ones((4, 2), np.float32))
    expect = np.arange(20, dtype=np.float32).reshape(10, 2)
    np.add.at(expect, [0, 5, 9, 9], 1)
    np.testing.assert_array_equal(s.numpy(), expect)
    assert [_device_of(v) for v in s.variables] == DEVICES[:3]
    with pytest.raises(gv.InvalidArgumentError, match="shape"):
        s.assign(np.zeros((9, 2), np.float32))
    with pytest.raises(gv.InvalidArgumentError, match="out of range"):
        s.scatter_update([10], np.zeros((1, 2), np.float32))
    with pytest.raises(gv.InvalidArgumentError, match="scalar"):
        gv.ShardedVariable(1.0, 2)


# --- checkpoints across topologies ----------------------------------------------------------------


def test_a_scalar_sync_on_read_variable_keeps_its_shape_through_a_checkpoint(four_cpus: str, tmp_path) -> None:
    # regression: the reduced value went through np.ascontiguousarray, which makes 0-d arrays 1-d,
    # so the checkpoint said shape (1,) and its own variable refused to restore from it
    strategy = gv.MirroredStrategy(DEVICES[:2])
    with strategy.scope():
        seen = gv.Variable(0.0, name="seen", synchronization=gv.VariableSynchronization.ON_READ,
                           aggregation=gv.VariableAggregation.SUM)
    strategy.run(lambda: seen.assign_add(1.5))
    prefix = gv.Saver([seen]).save(str(tmp_path / "m"))
    assert gv.CheckpointReader(prefix).get_variable_to_shape_map() == {"seen": ()}
    seen.assign(0.0)
    gv.Saver([seen]).restore(prefix)
    assert float(seen.numpy()) == 3.0 and [float(c.numpy()) for c in seen.values] == [1.5, 1.5]


def test_checkpoint_logical_values_move_between_topologies(four_cpus: str, tmp_path) -> None:
    two = gv.MirroredStrategy(DEVICES[:2])
    with two.scope():
        w = gv.Variable(np.arange(6, dtype=np.float32).reshape(3, 2), name="w")
        acc = gv.Variable(
            np.zeros(2, np.float32), name="acc",
            synchronization=gv.VariableSynchronization.ON_READ, aggregation=gv.VariableAggregation.SUM,
        )
    s = gv.ShardedVariable(np.arange(9, dtype=np.float32), 3, name="emb", devices=DEVICES[:3])
    two.run(lambda: acc.assign_add(np.ones(2, np.float32)))  # each replica adds 1 -> reads 2
    prefix = gv.Saver().save(str(tmp_path / "m"))

    # one logical tensor each: plain safetensors readers see no distribution at all
    import safetensors.numpy

    plain = safetensors.numpy.load_file(prefix + ".safetensors")
    assert sorted(plain) == ["acc", "emb", "w"]
    np.testing.assert_array_equal(plain["acc"], [2, 2])
    np.testing.assert_array_equal(plain["emb"], np.arange(9))

    with gv.Registry():
        four = gv.MirroredStrategy(DEVICES)
        with four.scope():
            w4 = gv.Variable(gv.zeros([3, 2]), name="w")
            acc4 = gv.Variable(
                gv.zeros([2]), name="acc",
                synchronization=gv.VariableSynchronization.ON_READ, aggregation=gv.VariableAggregation.SUM,
            )
        s2 = gv.ShardedVariable(np.zeros(9, np.float32), 2, name="emb", devices=DEVICES[:2])
        gv.Saver([w4, acc4, s2]).restore(prefix)
        for c in w4.values:
            np.testing.assert_array_equal(c.numpy(), np.arange(6).reshape(3, 2))
        assert [float(c.numpy()[0]) for c in acc4.values] == [0.5] * 4  # SUM: restore divides
        np.testing.assert_array_equal(acc4.numpy(), [2, 2])
        assert [v.shape for v in s2.variables] == [(5,), (4,)]
        np.testing.assert_array_equal(s2.numpy(), np.arange(9))


def test_expand_checkpoint_loads_without_strategy(four_cpus: str, tmp_path) -> None:
    strategy = gv.MirroredStrategy(DEVICES[:2])
    with strategy.scope():
        w = gv.Variable(np.arange(4, dtype=np.float32), name="w")
    s = gv.ShardedVariable(np.arange(10, dtype=np.float32), 3, name="emb", devices=DEVICES[1:])
    plain = gv.Variable(np.ones(2, np.float32), name="b", device="/cpu:3")
    opts = gv.SaveOptions(experimental_variable_policy="expand_distributed_variables")
    prefix = gv.Saver(options=opts).save(str(tmp_path / "m"), global_step=7)
    import os

    files = sorted(os.listdir(tmp_path))
    assert "m-7.replica-0-of-3.safetensors" in files and "m-7.replica-2-of-3.safetensors" in files
    with gv.Registry():
        loaded = gv.load_checkpoint(prefix)
        w2, s2, b2 = loaded["w"], loaded["emb"], loaded["b"]
        assert isinstance(w2, gv.MirroredVariable)
        assert list(w2.devices) == DEVICES[:2]
        assert [_device_of(c) for c in w2.values] == DEVICES[:2]
        np.testing.assert_array_equal(w2.numpy(), np.arange(4))
        assert isinstance(s2, gv.ShardedVariable) and list(s2.devices) == DEVICES[1:]
        assert [v.shape for v in s2.variables] == [(4,), (3,), (3,)]
        np.testing.assert_array_equal(s2.numpy(), np.arange(10))
        assert b2.device == "/cpu:3"
        # loaded mirrored variables work without a strategy: cross-replica writes reach every copy
        w2.assign_add(np.ones(4, np.float32))
        assert w2.components_agree()


def test_sync_on_read_sum_assign_casts_and_accepts_lists(strategy: gv.MirroredStrategy) -> None:
    with strategy.scope():
        count = gv.Variable(
            np.zeros(2, np.int32), name="count",
            synchronization=gv.VariableSynchronization.ON_READ, aggregation=gv.VariableAggregation.SUM,
        )
        total = gv.Variable(
            np.zeros(2, np.float32), name="total",
            synchronization=gv.VariableSynchronization.ON_READ, aggregation=gv.VariableAggregation.SUM,
        )
    count.assign(np.array([8, 9], np.int32))  # 8/4, 9/4 -> cast back to int32 (TF casts too)
    assert [c.numpy().tolist() for c in count.values] == [[2, 2]] * 4
    assert count.numpy().dtype == np.int32
    total.assign([8.0, 4.0])
    np.testing.assert_array_equal(total.numpy(), [8.0, 4.0])


def test_all_reduce_reduces_once_per_collective(strategy: gv.MirroredStrategy) -> None:
    calls = []
    original = strategy._reduce_to

    def counting(op, values, replica):  # type: ignore[no-untyped-def]
        calls.append(len(values))
        return original(op, values, replica)

    strategy._reduce_to = counting  # type: ignore[method-assign]
    out = strategy.run(lambda: gv.get_replica_context().all_reduce("mean", np.ones(2, np.float32)))
    assert calls == [4]  # one reduction of the 4 values, not one per replica
    for v in out.values:
        np.testing.assert_array_equal(np.asarray(v), [1, 1])


def test_experimental_local_results(strategy: gv.MirroredStrategy) -> None:
    with strategy.scope():
        w = gv.Variable(np.zeros(2, np.float32), name="w")
    assert strategy.experimental_local_results(w) == w.values and len(w.values) == 4
    per = strategy.run(lambda: gv.get_replica_context().replica_id_in_sync_group)  # type: ignore[union-attr]
    assert strategy.experimental_local_results(per) == (0, 1, 2, 3)
    assert strategy.experimental_local_results(3.0) == (3.0,)
