"""gv.optim: numerics against the published rules (and optax / torch.optim where installed),
slots co-located and checkpointed by name, distributed updates, and bad input."""

from __future__ import annotations

import importlib.util
import math
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import gpuvars as gv
from gpuvars import config

STEPS = 100


# --- the published rules, written out independently (float64) -------------------------------


def ref_sgd(lr: float, momentum: float = 0.0, nesterov: bool = False) -> Callable[..., Any]:
    def step(p: Any, g: Any, s: dict[str, Any], t: int) -> Any:
        if momentum == 0.0:
            return p - lr * g
        s["m"] = momentum * s.get("m", 0.0) - lr * g
        return p + momentum * s["m"] - lr * g if nesterov else p + s["m"]
    return step


def ref_adam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7, wd: float = 0.0,
             amsgrad: bool = False) -> Callable[..., Any]:
    def step(p: Any, g: Any, s: dict[str, Any], t: int) -> Any:
        p = p - lr * wd * p
        s["m"] = b1 * s.get("m", 0.0) + (1 - b1) * g
        s["v"] = b2 * s.get("v", 0.0) + (1 - b2) * g * g
        v = s["v"]
        if amsgrad:
            v = s["vhat"] = np.maximum(s.get("vhat", 0.0), s["v"])
        alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        return p - alpha * s["m"] / (np.sqrt(v) + eps)
    return step


def ref_rmsprop(lr: float, rho: float = 0.9, momentum: float = 0.0, eps: float = 1e-7,
                centered: bool = False) -> Callable[..., Any]:
    def step(p: Any, g: Any, s: dict[str, Any], t: int) -> Any:
        s["ms"] = rho * s.get("ms", 0.0) + (1 - rho) * g * g
        denom = s["ms"]
        if centered:
            s["mg"] = rho * s.get("mg", 0.0) + (1 - rho) * g
            denom = s["ms"] - s["mg"] ** 2
        inc = lr * g / np.sqrt(denom + eps)
        if momentum:
            s["mom"] = momentum * s.get("mom", 0.0) + inc
            return p - s["mom"]
        return p - inc
    return step


def ref_adagrad(lr: float, init: float = 0.1, eps: float = 1e-7) -> Callable[..., Any]:
    def step(p: Any, g: Any, s: dict[str, Any], t: int) -> Any:
        s["acc"] = s.get("acc", init) + g * g
        return p - lr * g / np.sqrt(s["acc"] + eps)
    return step


CASES: list[tuple[str, Callable[[], gv.optim.Optimizer], Callable[..., Any]]] = [
    ("sgd", lambda: gv.optim.SGD(0.05), ref_sgd(0.05)),
    ("sgd_momentum", lambda: gv.optim.SGD(0.05, momentum=0.9), ref_sgd(0.05, 0.9)),
    ("sgd_nesterov", lambda: gv.optim.SGD(0.05, momentum=0.9, nesterov=True), ref_sgd(0.05, 0.9, True)),
    ("adam", lambda: gv.optim.Adam(0.01), ref_adam(0.01)),
    ("adam_amsgrad", lambda: gv.optim.Adam(0.01, amsgrad=True), ref_adam(0.01, amsgrad=True)),
    ("adamw", lambda: gv.optim.AdamW(0.01, weight_decay=0.1), ref_adam(0.01, wd=0.1)),
    ("rmsprop", lambda: gv.optim.RMSprop(0.01), ref_rmsprop(0.01)),
    ("rmsprop_centered_momentum", lambda: gv.optim.RMSprop(0.01, momentum=0.5, centered=True),
     ref_rmsprop(0.01, momentum=0.5, centered=True)),
    ("adagrad", lambda: gv.optim.Adagrad(0.1), ref_adagrad(0.1)),
]


def _problem(seed: int, shape: tuple[int, ...] = (7, 3)) -> tuple[np.ndarray[Any, Any], list[np.ndarray[Any, Any]]]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), [rng.standard_normal(shape) for _ in range(STEPS)]


@pytest.mark.parametrize("name, make, ref", CASES, ids=[c[0] for c in CASES])
def test_each_optimizer_follows_its_published_rule_for_100_steps(
    cpu_backend: str, name: str, make: Any, ref: Any
) -> None:
    # float64 where the backend holds it (numpy): 1e-6; JAX without x64 holds float32: 1e-5 relative
    dtype = np.float64 if cpu_backend == "numpy" else np.float32
    p0, grads = _problem(hash(name) % 1000)
    w = gv.Variable(p0.astype(dtype), name="w")
    opt = make()
    p, state = p0.copy(), {}
    for t, g in enumerate(grads, start=1):
        opt.apply_gradients([(g.astype(dtype), w)])
        p = ref(p, g, state, t)
    tol = 1e-6 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(w.numpy(), p, rtol=tol, atol=tol)
    assert int(opt.iterations.numpy()) == STEPS


OPTAX = importlib.util.find_spec("optax") is not None


@pytest.mark.skipif(not OPTAX, reason="optax is not installed (pip install 'gpuvars[test]')")
@pytest.mark.parametrize("name", ["sgd_momentum", "adam", "rmsprop", "adagrad", "adamw"])
def test_the_optimizers_match_optax(cpu_backend: str, name: str) -> None:
    import optax

    lr = 0.01
    ours, theirs = {
        # optax puts Adam's epsilon after the bias correction; with eps=1e-12 both rules agree
        "sgd_momentum": (gv.optim.SGD(lr, momentum=0.9), optax.sgd(lr, momentum=0.9)),
        "adam": (gv.optim.Adam(lr, epsilon=1e-12), optax.adam(lr, eps=1e-12)),
        "adamw": (gv.optim.AdamW(lr, weight_decay=0.1, epsilon=1e-12),
                  optax.adamw(lr, eps=1e-12, weight_decay=0.1)),
        "rmsprop": (gv.optim.RMSprop(lr, epsilon=1e-7), optax.rmsprop(lr, decay=0.9, eps=1e-7, eps_in_sqrt=True)),
        "adagrad": (gv.optim.Adagrad(lr, initial_accumulator_value=0.1, epsilon=1e-7),
                    optax.adagrad(lr, initial_accumulator_value=0.1, eps=1e-7)),
    }[name]
    p0, grads = _problem(3)
    w = gv.Variable(p0.astype(np.float32), name="w")
    params = np.asarray(p0, np.float32)
    state = theirs.init(params)
    for g in grads:
        g32 = g.astype(np.float32)
        ours.apply_gradients([(g32, w)])
        updates, state = theirs.update(g32, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(w.numpy(), np.asarray(params), rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed (optional cross-check)")
def test_adam_and_sgd_match_torch_optim() -> None:
    import torch

    p0, grads = _problem(5)
    for ours, make in (
        (gv.optim.Adam(0.01, epsilon=1e-8), lambda ps: torch.optim.Adam(ps, lr=0.01, eps=1e-8)),
        (gv.optim.SGD(0.05, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
    ):
        with gv.Registry():
            w = gv.Variable(p0.copy(), name="w")
            tp = torch.tensor(p0.copy(), requires_grad=True)
            topt = make([tp])
            for g in grads:
                ours.apply_gradients([(g, w)])
                tp.grad = torch.tensor(g)
                topt.step()
            # torch's SGD momentum is lr-scaled differently but equal for a constant lr; Adam's
            # epsilon sits after the bias correction (1e-8 makes the difference negligible)
            np.testing.assert_allclose(w.numpy(), tp.detach().numpy(), rtol=1e-5, atol=1e-6)


# --- slots: co-located, named, deferred, saved by name -------------------------------------------


def test_slots_live_on_the_variables_device_whatever_scope_encloses_them(four_cpus: str) -> None:
    w = gv.Variable(np.zeros(3, np.float32), name="w", device="/cpu:2")
    opt = gv.optim.Adam(0.1)
    with gv.device("/cpu:1"):
        opt.apply_gradients([(np.ones(3, np.float32), w)])
    for s in opt.get_slot_names():
        slot = opt.get_slot(w, s)
        assert slot.device == "/cpu:2" and slot.name == f"w/Adam/{s}" and not slot.trainable
        assert slot.backend == four_cpus
    assert opt.iterations.device == "/cpu:2"
    assert w.device == "/cpu:2"
    assert {v.name for v in opt.variables()} == {"Adam/iterations", "w/Adam/m", "w/Adam/v"}
    assert {v.name for v in gv.global_variables()} >= {"w/Adam/m", "w/Adam/v", "Adam/iterations"}
    assert "w/Adam/m" not in {v.name for v in gv.trainable_variables()}


def test_mirrored_primaries_get_mirrored_slots_and_sharded_ones_per_shard_slots(four_cpus: str) -> None:
    strategy = gv.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        m = gv.Variable(np.ones(4, np.float32), name="m")
    sh = gv.ShardedVariable(np.arange(10, dtype=np.float32), 3, name="emb", devices=["/cpu:1", "/cpu:2", "/cpu:3"])
    opt = gv.optim.SGD(0.5, momentum=0.9)
    opt.apply_gradients([(np.ones(4, np.float32), m), (np.ones(10, np.float32), sh)])
    mm = opt.get_slot(m, "momentum")
    assert isinstance(mm, gv.MirroredVariable) and list(mm.devices) == ["/cpu:0", "/cpu:1"]
    assert m.components_agree() and mm.components_agree()
    assert m.numpy().tolist() == [0.5] * 4
    sm = opt.get_slot(sh, "momentum")
    assert isinstance(sm, gv.ShardedVariable)
    assert [s.device for s in sm.variables] == ["/cpu:1", "/cpu:2", "/cpu:3"]
    assert sm.offsets == sh.offsets and [tuple(s.shape) for s in sm.variables] == [tuple(s.shape) for s in sh.variables]
    assert sh.numpy().tolist() == [x - 0.5 for x in range(10)]
    assert sm.numpy().tolist() == [-0.5] * 10


def test_a_training_run_resumes_exactly_from_a_checkpoint_with_slots(cpu_backend: str, tmp_path: Path) -> None:
    p0, grads = _problem(9)
    p0 = p0.astype(np.float32)
    with gv.Registry():  # the uninterrupted run
        w = gv.Variable(p0, name="w")
        opt = gv.optim.Adam(0.01)
        for g in grads:
            opt.apply_gradients([(g.astype(np.float32), w)])
        expected = w.numpy()
    with gv.Registry():  # 50 steps, a save, then a fresh process of the mind: new variables, new optimizer
        w = gv.Variable(p0, name="w")
        opt = gv.optim.Adam(0.01)
        for g in grads[:50]:
            opt.apply_gradients([(g.astype(np.float32), w)])
        prefix = gv.Saver().save(tmp_path / "ckpt", global_step=50)
    with gv.Registry():
        w = gv.Variable(gv.zeros(p0.shape), name="w")
        opt = gv.optim.Adam(0.01)
        opt.build([w])
        assert not opt.get_slot(w, "m").initialized  # deferred: a restore fills them
        result = gv.Saver().restore(prefix)
        assert set(result.restored) == {"w", "w/Adam/m", "w/Adam/v", "Adam/iterations"}
        assert int(opt.iterations.numpy()) == 50
        assert np.abs(opt.get_slot(w, "v").numpy()).sum() > 0  # the saved values, not the zeros initializer
        for g in grads[50:]:
            opt.apply_gradients([(g.astype(np.float32), w)])
        np.testing.assert_array_equal(w.numpy(), expected)


def test_a_restore_without_the_slots_names_each_missing_one(tmp_path: Path) -> None:
    w = gv.Variable(np.ones(3, np.float32), name="w")
    prefix = gv.Saver([w]).save(tmp_path / "plain")
    opt = gv.optim.Adam()
    opt.build([w])
    with pytest.raises(gv.CheckpointMismatchError, match=r"w/Adam/m.*w/Adam/v|missing keys"):
        gv.Saver([w, *opt.variables()]).restore(prefix)
    assert not opt.get_slot(w, "m").initialized  # nothing half-restored


def test_an_async_save_during_training_holds_the_slots_of_the_call(tmp_path: Path) -> None:
    from gpuvars.checkpoint import _stformat

    w = gv.Variable(np.ones(1 << 16, np.float32), name="w")
    opt = gv.optim.Adam(0.1)
    opt.apply_gradients([(np.ones(1 << 16, np.float32), w)])
    before = {v.name: v.numpy() for v in [w, *opt.variables()]}
    gate = threading.Event()
    real = _stformat.SafetensorsWriter.write

    def held(self: Any, name: str, data: object) -> None:
        gate.wait(30)
        real(self, name, data)

    _stformat.SafetensorsWriter.write = held  # type: ignore[method-assign]
    try:
        fut = gv.Saver().save(tmp_path / "m", blocking=False)
        opt.apply_gradients([(np.ones(1 << 16, np.float32), w)])  # while nothing is written yet
        gate.set()
        prefix = fut.result()
    finally:
        _stformat.SafetensorsWriter.write = real  # type: ignore[method-assign]
    with gv.CheckpointReader(prefix) as reader:
        reader.verify()
        for name, value in before.items():
            np.testing.assert_array_equal(reader.get_tensor(name), value)
    assert int(opt.iterations.numpy()) == 2


# --- distributed ------------------------------------------------------------------------------------


def test_replica_gradients_are_summed_once_and_every_component_takes_the_same_step(four_cpus: str) -> None:
    strategy = gv.MirroredStrategy(["/cpu:0", "/cpu:1", "/cpu:2"])
    with strategy.scope():
        w = gv.Variable(np.zeros(4, np.float32), name="w")
    opt = gv.optim.Adam(0.1)
    single = gv.Variable(np.zeros(4, np.float32), name="single")
    ref = gv.optim.Adam(0.1, name="ref")
    for step in range(5):
        def replica_step() -> None:
            ctx = gv.get_replica_context()
            assert ctx is not None
            g = np.full(4, ctx.replica_id_in_sync_group + step, np.float32)
            opt.apply_gradients([(g, w)])

        strategy.run(replica_step)
        ref.apply_gradients([(np.full(4, sum(r + step for r in range(3)), np.float32), single)])
    assert w.components_agree() and opt.get_slot(w, "m").components_agree()
    np.testing.assert_allclose(w.numpy(), single.numpy(), rtol=1e-6)
    assert int(opt.iterations.numpy()) == 5


def test_replica_context_refuses_plain_variables(four_cpus: str) -> None:
    strategy = gv.MirroredStrategy(["/cpu:0", "/cpu:1"])
    plain = gv.Variable(np.zeros(2, np.float32), name="plain")
    opt = gv.optim.SGD()
    with pytest.raises(gv.InvalidArgumentError, match="only mirrored variables"):
        strategy.run(lambda: opt.apply_gradients([(np.ones(2, np.float32), plain)]))


# --- learning-rate schedules and clipping ----------------------------------------------------


def test_a_schedule_gets_the_step_before_the_update() -> None:
    seen: list[int] = []
    w = gv.Variable(np.zeros(1), name="w")
    opt = gv.optim.SGD(lambda step: seen.append(step) or 1.0)
    for _ in range(3):
        opt.apply_gradients([(np.ones(1), w)])
    assert seen == [0, 1, 2] and w.numpy().tolist() == [-3.0]
    decay = gv.optim.ExponentialDecay(1.0, decay_steps=1, decay_rate=0.5)
    w2 = gv.Variable(np.zeros(1), name="w2")
    opt2 = gv.optim.SGD(decay)
    for _ in range(3):
        opt2.apply_gradients([(np.ones(1), w2)])
    assert w2.numpy().tolist() == [-1.75]


def test_clip_by_global_norm() -> None:
    grads, norm = gv.optim.clip_by_global_norm([np.array([3.0, 0.0]), None, np.array([4.0])], 2.5)
    assert norm == 5.0 and grads[1] is None
    assert grads[0].tolist() == [1.5, 0.0] and grads[2].tolist() == [2.0]
    same, _ = gv.optim.clip_by_global_norm([np.array([0.1])], 1.0)
    assert same[0].tolist() == [0.1]
    with pytest.raises(gv.InvalidArgumentError, match="clip_norm"):
        gv.optim.clip_by_global_norm([np.ones(1)], 0.0)
    with pytest.raises(gv.InvalidArgumentError, match="inf or nan"):
        gv.optim.clip_by_global_norm([np.array([np.inf])], 1.0)


def test_cosine_decay_with_warmup() -> None:
    s = gv.optim.CosineDecay(0.0, decay_steps=10, alpha=0.1, warmup_target=1.0, warmup_steps=2)
    assert [round(s(t), 6) for t in (0, 1, 2, 12, 100)] == [0.0, 0.5, 1.0, 0.1, 0.1]


# --- gradients from anywhere, and bad input ---------------------------------------------------------


def test_jax_gradients_train_numpy_variables_and_a_jax_training_loop_works() -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    config.set_cpu_backend("jax")
    w = gv.Variable(np.zeros(3, np.float32), name="w")
    x = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], np.float32)
    y = np.array([1.0, 0.0], np.float32)
    loss_fn = jax.value_and_grad(lambda wv: jnp.mean((x @ wv - y) ** 2))
    opt = gv.optim.Adam(0.1)
    first = None
    for _ in range(50):
        loss, grad = loss_fn(w.value())
        first = float(loss) if first is None else first
        opt.apply_gradients([(grad, w)])
    assert float(loss_fn(w.value())[0]) < first / 10


def test_bad_input_gets_clear_errors(four_cpus: str) -> None:
    w = gv.Variable(np.zeros(3, np.float32), name="w")
    opt = gv.optim.Adam()
    with pytest.raises(gv.InvalidArgumentError, match="shape"):
        opt.apply_gradients([(np.ones(4, np.float32), w)])
    with pytest.raises(gv.InvalidArgumentError, match="appears twice"):
        opt.apply_gradients([(np.ones(3), w), (np.ones(3), w)])
    with pytest.raises(gv.InvalidArgumentError, match="pairs"):
        opt.apply_gradients([w])  # type: ignore[list-item]
    with pytest.raises(gv.InvalidArgumentError, match="floating-point"):
        opt.apply_gradients([(np.ones(2), gv.Variable(np.zeros(2, np.int32), name="i"))])
    metric = gv.Variable(np.zeros(1, np.float32), name="metric", synchronization=gv.VariableSynchronization.ON_READ,
                         trainable=False)
    with pytest.raises(gv.InvalidArgumentError, match="ON_READ"):
        opt.apply_gradients([(np.ones(1, np.float32), metric)])
    with pytest.raises(gv.InvalidArgumentError, match="cannot cast|same_kind|complex"):
        opt.apply_gradients([(np.ones(3, np.complex64), w)])
    with pytest.raises(gv.InvalidArgumentError, match="learning_rate"):
        gv.optim.Adam(learning_rate=-1.0)
    with pytest.raises(gv.InvalidArgumentError, match="beta_1"):
        gv.optim.Adam(beta_1=1.0)
    with pytest.raises(gv.InvalidArgumentError, match="no slot"):
        opt.get_slot(w, "nope")
    with pytest.raises(gv.InvalidArgumentError, match="no iterations"):
        _ = gv.optim.SGD().iterations
    opt.apply_gradients([(None, w)])  # a variable without a gradient is skipped
    assert w.numpy().tolist() == [0.0] * 3
    other = gv.Variable(np.ones(3, np.float32), name="other", device="/cpu:1")
    if four_cpus == "jax":  # a JAX array on /cpu:1 for a variable on /cpu:0 is an implicit transfer
        with config.transfer_guard("disallow"), pytest.raises(gv.TransferGuardError, match="gradient of variable 'w'"):
            opt.apply_gradients([(other.value(), w)])
    else:  # numpy arrays are host data: no transfer at all
        with config.transfer_guard("disallow"):
            opt.apply_gradients([(other.value(), w)])


def test_packed_blocked_and_threaded_numpy_paths_agree_with_the_rule() -> None:
    """Many small variables (packed into runs), large ones (block by block, on threads), two
    dtypes and a 0-d one, in one step: each ends where the published rule puts it."""
    from gpuvars.optim import optimizer as base

    rng = np.random.default_rng(11)
    shapes = [(), (1,), (5, 3)] * 300 + [(base.PACK + 7,), (base.PARALLEL // 2 + 3,), (base.PARALLEL + 5,)]
    dtypes = [np.float64 if i % 3 else np.float32 for i in range(len(shapes))]
    p0 = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
    vs = [gv.Variable(p.copy(), name=f"v{i}") for i, p in enumerate(p0)]
    opt = gv.optim.Adam(0.01)
    ref = ref_adam(0.01)
    states: list[dict[str, Any]] = [{} for _ in vs]
    expect = [p.astype(np.float64) for p in p0]
    for t in range(1, 4):
        grads = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
        opt.apply_gradients(list(zip(grads, vs)))
        expect = [ref(p, g.astype(np.float64), st, t) for p, g, st in zip(expect, grads, states)]
    for v, e, d in zip(vs, expect, dtypes):
        tol = 1e-10 if d == np.float64 else 2e-6
        np.testing.assert_allclose(v.numpy(), e, rtol=tol, atol=tol, err_msg=v.name)


def test_assert_consumed_names_slots_the_restoring_optimizer_lacks(tmp_path: Path) -> None:
    w = gv.Variable(np.ones(3, np.float32), name="w")
    opt = gv.optim.Adam(amsgrad=True)
    opt.apply_gradients([(np.ones(3, np.float32), w)])
    prefix = gv.Saver().save(tmp_path / "m")
    with gv.Registry():
        w2 = gv.Variable(gv.zeros([3]), name="w")
        plain = gv.optim.Adam()  # no vhat slot
        plain.build([w2])
        result = gv.Saver().restore(prefix)
        assert result.unused == ("w/Adam/vhat",)
        with pytest.raises(gv.CheckpointMismatchError, match="w/Adam/vhat"):
            result.assert_consumed()
