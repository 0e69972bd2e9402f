"""MirroredStrategy, mirrored / sync-on-read / sharded variables and EXPAND checkpoints on real
GPUs, with CuPy and with JAX as the GPU backend.

Every test is marked ``gpu`` (``multi_gpu`` when it needs two devices) and is skipped where no
GPU is usable; each library is also skipped by itself when only the other one reaches the
GPUs. Storage is checked with the library's own idea of where an array lives
(``cupy.ndarray.device.id``, ``jax.Array.devices()``), not only with ``v.device``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

import gpuvars_backends as backends
import gpuvars as gv
from gpuvars import config

pytestmark = pytest.mark.gpu

PLATFORM = "gpu"
SUM = gv.VariableAggregation.SUM
MEAN = gv.VariableAggregation.MEAN
ON_READ = gv.VariableSynchronization.ON_READ


class Gpus:
    """The GPU library under test, how many GPUs it sees, and where its arrays live."""

    def __init__(self, library: str, count: int) -> None:
        self.library = library
        self.count = count

    def dev(self, k: int) -> str:
        return f"/{PLATFORM}:{k}"

    def devs(self, n: int) -> list[str]:
        return [self.dev(k) for k in range(n)]

    def need(self, n: int) -> None:
        if self.count < n:
            pytest.skip(f"{self.library} sees {self.count} GPU(s); this test needs {n}")

    def index(self, array: Any) -> int:
        """The device index holding ``array``, asked of its own library."""
        if self.library == "cupy":
            import cupy

            assert isinstance(array, cupy.ndarray), type(array)
            return int(array.device.id)
        import jax

        assert isinstance(array, jax.Array), type(array)
        devices = array.devices()
        assert len(devices) == 1, devices
        device = next(iter(devices))
        assert device.platform == PLATFORM, device
        return int(device.id)

    def check_on(self, v: gv.Variable, k: int) -> None:
        """``v`` (a plain or component variable) says it is on GPU k, and its storage is there."""
        assert v.device == self.dev(k)
        assert v.backend == self.library
        assert self.index(v.value()) == k

    def ptr(self, v: gv.Variable) -> int | None:
        """The device address of a CuPy variable's buffer (None for JAX, which rebinds)."""
        return int(v.value().data.ptr) if self.library == "cupy" else None


def to_host(array: Any) -> np.ndarray:
    """A host copy of a numpy, CuPy or JAX array."""
    if isinstance(array, np.ndarray):
        return array
    if type(array).__module__.partition(".")[0] == "cupy":
        import cupy

        return cupy.asnumpy(array)
    return np.asarray(array)


@pytest.fixture(params=["cupy", "jax"])
def gpus(request: pytest.FixtureRequest) -> Gpus:
    """Serve ``/gpu:N`` with CuPy, then with JAX; skip a library that sees no GPU. Soft placement
    is off, so a missing GPU is an error here, never a silent fallback to the CPU."""
    library = str(request.param)
    probe = backends.probe(library, PLATFORM)
    if not probe.usable:
        pytest.skip(f"{library} cannot use a GPU here: {probe.reason}")
    config.set_gpu_backend(library)
    config.set_soft_device_placement(False)
    return Gpus(library, probe.count)


def per_replica(strategy: gv.MirroredStrategy, fn: Any) -> gv.PerReplica:
    """``fn(replica_id)`` (a host array) copied onto each replica's device."""
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: gv.copy_to(fn(ctx.replica_id_in_sync_group), strategy.devices[ctx.replica_id_in_sync_group])
    )


# --- one GPU ----------------------------------------------------------------------------------------


def test_default_strategy_uses_every_gpu(gpus: Gpus) -> None:
    strategy = gv.MirroredStrategy()
    assert strategy.devices == tuple(gpus.devs(gpus.count))
    assert strategy.num_replicas_in_sync == gpus.count


def test_one_gpu_strategy_updates_and_reads(gpus: Gpus) -> None:
    strategy = gv.MirroredStrategy([gpus.dev(0)])
    with strategy.scope():
        w = gv.Variable(np.zeros(3, np.float32), name="w", aggregation=SUM)
    assert isinstance(w, gv.MirroredVariable) and len(w.values) == 1
    gpus.check_on(w.values[0], 0)
    x = gv.copy_to(np.ones(3, np.float32), gpus.dev(0))
    with config.transfer_guard("disallow"):  # device-local input, no implicit copy anywhere
        out = strategy.run(lambda d: w.assign_add(d), args=(x,))
    assert out is w
    np.testing.assert_array_equal(w.numpy(), [1, 1, 1])
    gpus.check_on(w.values[0], 0)


def test_one_gpu_expand_checkpoint_round_trip(gpus: Gpus, tmp_path: Any) -> None:
    strategy = gv.MirroredStrategy([gpus.dev(0)])
    with strategy.scope():
        w = gv.Variable(np.arange(4, dtype=np.float32), name="w")
    opts = gv.SaveOptions(experimental_variable_policy=gv.VariablePolicy.EXPAND_DISTRIBUTED_VARIABLES)
    prefix = gv.Saver(options=opts).save(str(tmp_path / "m"))
    assert os.path.exists(prefix + ".replica-0-of-1.safetensors")
    with gv.Registry():
        loaded = gv.load_checkpoint(prefix)
        w2 = loaded["w"]
        assert isinstance(w2, gv.MirroredVariable) and w2.devices == (gpus.dev(0),)
        gpus.check_on(w2.values[0], 0)
        np.testing.assert_array_equal(w2.numpy(), np.arange(4))
        assert loaded.moved == {}
    with gv.Registry():
        loaded = gv.load_checkpoint(prefix, device_map={"/gpu:*": "/cpu:0"})
        w3 = loaded["w"]
        assert isinstance(w3, gv.MirroredVariable) and w3.devices == ("/cpu:0",)
        assert w3.values[0].backend == "numpy"
        np.testing.assert_array_equal(w3.numpy(), np.arange(4))
        assert loaded.moved == {"w": (gpus.dev(0), "/cpu:0")}


# --- two GPUs ---------------------------------------------------------------------------------------


@pytest.mark.multi_gpu
def test_mirrored_components_live_on_each_gpu(gpus: Gpus) -> None:
    gpus.need(2)
    strategy = gv.MirroredStrategy(gpus.devs(2))
    with strategy.scope():
        w = gv.Variable(np.arange(6, dtype=np.float32).reshape(3, 2), name="w")
        r = gv.Variable(gv.random_normal([4, 3], seed=3), name="r")
    assert isinstance(w, gv.MirroredVariable) and isinstance(w, gv.Variable)
    assert w.devices == tuple(gpus.devs(2)) and w.device == gpus.dev(0)
    assert [c.name for c in w.values] == ["w/replica_0", "w/replica_1"]
    for k, c in enumerate(w.values):
        gpus.check_on(c, k)
        np.testing.assert_array_equal(c.numpy(), np.arange(6).reshape(3, 2))
    assert [v.name for v in gv.global_variables()] == ["w", "r"]  # components are not registered
    assert not r.initialized
    gv.global_variables_initializer().run()  # drawn once on the primary, copied to every GPU
    assert r.initialized and r.components_agree()
    for k, c in enumerate(r.values):
        gpus.check_on(c, k)


@pytest.mark.multi_gpu
def test_cross_replica_assign_writes_every_gpu(gpus: Gpus) -> None:
    gpus.need(2)
    strategy = gv.MirroredStrategy(gpus.devs(2))
    with strategy.scope():
        w = gv.Variable(np.zeros(4, np.float32), name="w")
    ptrs = [gpus.ptr(c) for c in w.values]
    w.assign(np.array([1, 2, 3, 4], np.float32))  # a host value
    w.assign_add(gv.copy_to(np.ones(4, np.float32), gpus.dev(1)))  # a value on the second GPU
    w.scatter_add([0, 3], np.full(2, 10.0, np.float32))
    for k, c in enumerate(w.values):
        np.testing.assert_array_equal(c.numpy(), [12, 3, 4, 15])
        gpus.check_on(c, k)
    assert [gpus.ptr(c) for c in w.values] == ptrs  # CuPy: written in place, no reallocation
    with config.transfer_guard("disallow"):  # the broadcast is an explicit copy, never refused
        w.assign(gv.copy_to(np.full(4, 7.0, np.float32), gpus.dev(0)))
    for k, c in enumerate(w.values):
        np.testing.assert_array_equal(c.numpy(), [7, 7, 7, 7])
        gpus.check_on(c, k)
    assert w.components_agree()


@pytest.mark.multi_gpu
@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        (SUM, [[3, 3], [3, 3]]),
        (MEAN, [[1.5, 1.5], [1.5, 1.5]]),
        (gv.VariableAggregation.ONLY_FIRST_REPLICA, [[1, 1], [1, 1]]),
        (gv.VariableAggregation.NONE, [[1, 1], [2, 2]]),  # each replica updates its own copy
    ],
)
def test_replica_context_updates_on_gpus(gpus: Gpus, aggregation: gv.VariableAggregation, expected: list[list[float]]) -> None:
    gpus.need(2)
    strategy = gv.MirroredStrategy(gpus.devs(2))
    with strategy.scope():
        w = gv.Variable(np.zeros(2, np.float32), name="w", aggregation=aggregation)
    inputs = per_replica(strategy, lambda rid: np.full(2, rid + 1.0, np.float32))
    assert [gpus.index(x) for x in inputs.values] == [0, 1]

    def step(x: Any) -> int:
        w.assign_add(x)
        return gv.get_replica_context().replica_id_in_sync_group

    with config.transfer_guard("disallow"):  # collectives copy explicitly; local updates copy nothing
        out = strategy.run(step, args=(inputs,))
    assert out.values == (0, 1)
    for k, c in enumerate(w.values):
        np.testing.assert_allclose(c.numpy(), expected[k])
        gpus.check_on(c, k)


@pytest.mark.multi_gpu
def test_replicas_read_their_own_gpu_copy(gpus: Gpus) -> None:
    gpus.need(2)
    strategy = gv.MirroredStrategy(gpus.devs(2))
    with strategy.scope():
        w = gv.Variable(np.zeros(1, np.float32), name="w")
    for k, c in enumerate(w.values):
        c.assign(np.full(1, k + 5.0, np.float32))
    out = strategy.run(lambda: (gpus.index(w.value()), float(w.numpy()[0])))
    assert out.values == ((0, 5.0), (1, 6.0))
    assert gpus.index(w.value()) == 0 and float(w.numpy()[0]) == 5.0  # cross-replica: the primary


@pytest.mark.multi_gpu
def test_all_reduce_and_strategy_reduce_on_gpus(gpus: Gpus) -> None:
    gpus.need(2)
    strategy = gv.MirroredStrategy(gpus.devs(2))
    inputs = per_replica(strategy, lambda rid: np.full(3, rid + 1.0, np.float32))
    out = strategy.run(lambda x: gv.get_replica_context().all_reduce("sum", x), args=(inputs,))
    for k, v in enumerate(out.values):
        assert gpus.index(v) == k  # every replica gets the result on its own GPU
        np.testing.assert_array_equal(to_host(v), [3, 3, 3])
    mean = strategy.reduce(gv.ReduceOp.MEAN, inputs)
    assert gpus.index(mean) == 0
    np.testing.assert_array_equal(to_host(mean), [1.5, 1.5, 1.5])
    total = strategy.reduce("SUM", inputs, axis=0)
    np.testing.assert_array_equal(to_host(total), 9.0)


@pytest.mark.multi_gpu
def test_sync_on_read_reduces_across_gpus(gpus: Gpus) -> None:
    gpus.need(2)
    strategy = gv.MirroredStrategy(gpus.devs(2))
    with strategy.scope():
        total = gv.Variable(np.zeros(2, np.float32), name="total", synchronization=ON_READ, aggregation=SUM)
        mean = gv.Variable(np.zeros(2, np.float32), name="mean", synchronization=ON_READ, aggregation=MEAN)
    assert isinstance(total, gv.SyncOnReadVariable) and not total.trainable
    inputs = per_replica(strategy, lambda rid: np.full(2, rid + 1.0, np.float32))

    def step(x: Any) -> None:
        total.assign_add(x)
        mean.assign(x * 2)

    strategy.run(step, args=(inputs,))
    for k in range(2):  # each replica wrote only its own component, on its own GPU
        np.testing.assert_array_equal(total.values[k].numpy(), [k + 1, k + 1])
        gpus.check_on(total.values[k], k)
        gpus.check_on(mean.values[k], k)
    np.testing.assert_array_equal(total.numpy(), [3, 3])  # reduced on the cross-replica read
    np.testing.assert_array_equal(mean.numpy(), [3, 3])  # mean of 2 and 4
    assert gpus.index(total.value()) == 0
    total.assign(np.full(2, 8.0, np.float32))  # SUM: a cross-replica assign divides by the replicas
    for k, c in enumerate(total.values):
        np.testing.assert_array_equal(c.numpy(), [4, 4])
        gpus.check_on(c, k)
    np.testing.assert_array_equal(total.numpy(), [8, 8])


@pytest.mark.multi_gpu
def test_sharded_variable_across_gpus(gpus: Gpus) -> None:
    gpus.need(2)
    full = np.arange(20, dtype=np.float32).reshape(10, 2)
    s = gv.ShardedVariable(full, gv.FixedShardsPartitioner(3), name="emb", devices=gpus.devs(2))
    assert [v.shape for v in s.variables] == [(4, 2), (3, 2), (3, 2)]
    assert list(s.devices) == [gpus.dev(0), gpus.dev(1), gpus.dev(0)]  # round-robin
    for v, k in zip(s.variables, [0, 1, 0]):
        gpus.check_on(v, k)
    np.testing.assert_array_equal(s.numpy(), full)
    whole = s.value()  # the concatenation, on the first shard's GPU
    assert gpus.index(whole) == 0
    np.testing.assert_array_equal(to_host(whole), full)
    s.scatter_add([0, 5, 9, 9], np.ones((4, 2), np.float32))  # rows routed to the shards owning them
    expect = full.copy()
    np.add.at(expect, [0, 5, 9, 9], 1)
    np.testing.assert_array_equal(s.numpy(), expect)
    s.assign(full * 2)
    np.testing.assert_array_equal(s.variables[1].numpy(), full[4:7] * 2)
    for v, k in zip(s.variables, [0, 1, 0]):
        gpus.check_on(v, k)
    assert [v.name for v in gv.global_variables()] == ["emb"]


def _save_distributed(gpus: Gpus, folder: Any, policy: gv.VariablePolicy) -> tuple[str, list[Any]]:
    """A mirrored, a sync-on-read (replica values 1 and 2), a sharded and a plain variable on two
    GPUs, saved with ``policy``; returns the prefix and the variables (the registry holds
    variables weakly: the caller keeps them alive)."""
    strategy = gv.MirroredStrategy(gpus.devs(2))
    with strategy.scope():
        w = gv.Variable(np.arange(6, dtype=np.float32).reshape(3, 2), name="w")
        acc = gv.Variable(np.zeros(2, np.float32), name="acc", synchronization=ON_READ, aggregation=SUM)
    emb = gv.ShardedVariable(np.arange(10, dtype=np.float32), 3, name="emb", devices=[gpus.dev(1), gpus.dev(0)])
    b = gv.Variable(np.ones(2, np.float32), name="b", device=gpus.dev(1))
    inputs = per_replica(strategy, lambda rid: np.full(2, rid + 1.0, np.float32))
    strategy.run(lambda x: acc.assign_add(x), args=(inputs,))
    saver = gv.Saver(options=gv.SaveOptions(experimental_variable_policy=policy))
    assert sorted(saver.var_map) == ["acc", "b", "emb", "w"]
    return saver.save(str(folder / "m"), global_step=3), [w, acc, emb, b]


@pytest.mark.multi_gpu
def test_expand_checkpoint_loads_onto_the_gpus_without_strategy(gpus: Gpus, tmp_path: Any) -> None:
    gpus.need(2)
    prefix, _keep = _save_distributed(gpus, tmp_path, gv.VariablePolicy.EXPAND_DISTRIBUTED_VARIABLES)
    files = sorted(os.listdir(tmp_path))
    assert [f for f in files if ".replica-" in f] == [f"m-3.replica-{k}-of-3.safetensors" for k in range(3)]
    with gv.Registry():
        loaded = gv.load_checkpoint(prefix)
        assert sorted(loaded) == ["acc", "b", "emb", "w"] and loaded.moved == {}
        w, acc, emb, b = loaded["w"], loaded["acc"], loaded["emb"], loaded["b"]
        assert isinstance(w, gv.MirroredVariable) and w.devices == tuple(gpus.devs(2))
        for k, c in enumerate(w.values):
            gpus.check_on(c, k)
            np.testing.assert_array_equal(c.numpy(), np.arange(6).reshape(3, 2))
        assert isinstance(acc, gv.SyncOnReadVariable) and acc.aggregation is SUM
        for k, c in enumerate(acc.values):  # exact per-replica state from the replica files
            gpus.check_on(c, k)
            np.testing.assert_array_equal(c.numpy(), [k + 1, k + 1])
        np.testing.assert_array_equal(acc.numpy(), [3, 3])
        assert isinstance(emb, gv.ShardedVariable)
        assert list(emb.devices) == [gpus.dev(1), gpus.dev(0), gpus.dev(1)]
        assert [v.shape for v in emb.variables] == [(4,), (3,), (3,)]
        for v, k in zip(emb.variables, [1, 0, 1]):
            gpus.check_on(v, k)
        np.testing.assert_array_equal(emb.numpy(), np.arange(10))
        gpus.check_on(b, 1)
        np.testing.assert_array_equal(b.numpy(), [1, 1])
        # without a strategy, a cross-replica write still reaches every GPU copy
        w.assign_add(np.ones((3, 2), np.float32))
        assert w.components_agree()
        for k, c in enumerate(w.values):
            gpus.check_on(c, k)


@pytest.mark.multi_gpu
def test_expand_checkpoint_loads_onto_the_cpu_with_a_device_map(gpus: Gpus, tmp_path: Any) -> None:
    gpus.need(2)
    prefix, _keep = _save_distributed(gpus, tmp_path, gv.VariablePolicy.EXPAND_DISTRIBUTED_VARIABLES)
    with gv.Registry():
        loaded = gv.load_checkpoint(prefix, device_map={"/gpu:*": "/cpu:0"})
        w, acc, emb, b = loaded["w"], loaded["acc"], loaded["emb"], loaded["b"]
        assert loaded.moved == {
            "w": (gpus.dev(0), "/cpu:0"),
            "acc": (gpus.dev(0), "/cpu:0"),
            "emb": (gpus.dev(1), "/cpu:0"),
            "b": (gpus.dev(1), "/cpu:0"),
        }
        assert isinstance(w, gv.MirroredVariable) and set(w.devices) == {"/cpu:0"}
        assert all(c.backend == "numpy" for c in w.values)
        np.testing.assert_array_equal(w.numpy(), np.arange(6).reshape(3, 2))
        assert w.components_agree()
        assert isinstance(acc, gv.SyncOnReadVariable) and set(acc.devices) == {"/cpu:0"}
        np.testing.assert_array_equal(acc.numpy(), [3, 3])  # the logical (reduced) value survives
        assert list(emb.devices) == ["/cpu:0"] * 3 and all(v.backend == "numpy" for v in emb.variables)
        np.testing.assert_array_equal(emb.numpy(), np.arange(10))
        assert b.device == "/cpu:0" and b.backend == "numpy"
        np.testing.assert_array_equal(b.numpy(), [1, 1])


@pytest.mark.multi_gpu
def test_restore_into_mirrored_gpu_variables_in_place(gpus: Gpus, tmp_path: Any) -> None:
    """A NONE checkpoint (logical values only) restores into existing mirrored GPU variables:
    every component filled on its own GPU (CuPy: in its existing buffer)."""
    gpus.need(2)
    strategy = gv.MirroredStrategy(gpus.devs(2))
    with strategy.scope():
        w = gv.Variable(np.arange(8, dtype=np.float32), name="w")
    saver = gv.Saver([w])
    prefix = saver.save(str(tmp_path / "m"))
    w.assign(np.zeros(8, np.float32))
    ptrs = [gpus.ptr(c) for c in w.values]
    saver.restore(prefix)
    for k, c in enumerate(w.values):
        gpus.check_on(c, k)
        np.testing.assert_array_equal(c.numpy(), np.arange(8))
    assert [gpus.ptr(c) for c in w.values] == ptrs
