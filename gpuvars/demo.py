"""The main job: train softmax regression with gpuvars variables, checkpoint, restart, resume.

It runs on the best device of this machine (``/gpu:0`` when a GPU is usable, else soft
placement puts it on ``/cpu:0``), saves every ``--every`` steps with ``max_to_keep``, then
builds fresh variables as a restarted process would, restores the latest checkpoint and
shows the loss continuing from where it was.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

import gpuvars as gv


def _data(n: int, d: int, c: int, seed: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w_true = rng.standard_normal((d, c)).astype(np.float32)
    labels = np.argmax(x @ w_true + 0.5 * rng.standard_normal((n, c)), axis=1)
    return x, np.eye(c, dtype=np.float32)[labels]


def _model(d: int, c: int, device: str) -> tuple[gv.Variable, gv.Variable]:
    w = gv.Variable(gv.initializers.GlorotUniform(seed=1), shape=(d, c), name="softmax/weights", device=device)
    b = gv.Variable(gv.zeros([c]), name="softmax/bias", device=device)
    return w, b


def _step(w: gv.Variable, b: gv.Variable, x: Any, y: Any, lr: float) -> float:
    """One gradient step of softmax cross-entropy, computed on the variables' device."""
    xp = w.physical_device.backend.xp
    logits = x @ w.value() + b.value()
    logits = logits - logits.max(axis=1, keepdims=True)
    p = xp.exp(logits)
    p = p / p.sum(axis=1, keepdims=True)
    loss = float(-(y * xp.log(p + 1e-9)).sum() / x.shape[0])
    err = (p - y) / x.shape[0]
    w.assign_sub(lr * (x.T @ err))
    b.assign_sub(lr * err.sum(axis=0))
    return loss


def _loss(w: gv.Variable, b: gv.Variable, x: Any, y: Any) -> float:
    xp = w.physical_device.backend.xp
    logits = x @ w.value() + b.value()
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - xp.log(xp.exp(logits).sum(axis=1, keepdims=True))
    return float(-(y * logp).sum() / x.shape[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpuvars demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps before the restart (default 300)")
    parser.add_argument("--every", type=int, default=50, help="checkpoint every N steps (default 50)")
    parser.add_argument("--keep", type=int, default=3, help="max_to_keep (default 3)")
    parser.add_argument("--device", default="/gpu:0", help="where to train (default /gpu:0; soft placement falls back)")
    parser.add_argument(
        "--ckpt-dir", default=None, help="checkpoint folder, kept (default: a temporary folder, removed at the end)"
    )
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument(
        "--replicas", type=int, default=1,
        help="data-parallel replicas: GPUs if enough are usable, else logical CPU devices (default 1)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.keep < 1 or args.replicas < 1:
        parser.error("--steps, --every, --keep and --replicas must be >= 1")
    run = _run if args.replicas == 1 else _run_replicated
    if args.ckpt_dir is not None:
        return run(args, args.ckpt_dir)
    with tempfile.TemporaryDirectory(prefix="gpuvars-demo-") as ckpt_dir:
        return run(args, ckpt_dir)


def _replica_devices(n: int) -> list[str]:
    """``n`` GPUs when that many are usable, else ``n`` logical CPU devices."""
    import gpuvars_backends as backends

    library = gv.config.get_gpu_backend()
    for lib in (library,) if library else ("cupy", "jax"):
        if backends.probe(lib, "gpu").count >= n:
            gv.config.set_gpu_backend(lib)
            return [f"/gpu:{k}" for k in range(n)]
    gv.config.set_logical_devices("cpu", n)
    return [f"/cpu:{k}" for k in range(n)]


def _run_replicated(args: argparse.Namespace, ckpt_dir: str) -> int:
    """Data-parallel training with mirrored variables, EXPAND checkpoints, reload without the strategy."""
    n = args.replicas
    devices = _replica_devices(n)
    prefix = os.path.join(ckpt_dir, "model.ckpt")
    x_host, y_host = _data(4096, 32, 10, seed=0)
    policy = gv.SaveOptions(experimental_variable_policy=gv.VariablePolicy.EXPAND_DISTRIBUTED_VARIABLES)
    strategy = gv.MirroredStrategy(devices)
    print(f"gpuvars demo: {n} replicas on {list(strategy.devices)}; checkpoints in {ckpt_dir}")
    rows = x_host.shape[0] // n
    with gv.Registry():
        with strategy.scope():
            w = gv.Variable(
                gv.initializers.GlorotUniform(seed=1), shape=(32, 10), name="softmax/weights",
                aggregation=gv.VariableAggregation.MEAN,
            )
            b = gv.Variable(gv.zeros([10]), name="softmax/bias", aggregation=gv.VariableAggregation.MEAN)
        gv.global_variables_initializer().run()
        def shard(a: np.ndarray[Any, Any]) -> gv.PerReplica:
            """Replica k's rows of ``a``, on replica k's device."""
            return strategy.experimental_distribute_values_from_function(
                lambda ctx: gv.copy_to(a[ctx.replica_id_in_sync_group * rows :][:rows], devices[ctx.replica_id_in_sync_group])
            )

        xs, ys = shard(x_host), shard(y_host)
        saver = gv.Saver(max_to_keep=args.keep, options=policy)
        t0 = time.perf_counter()
        for step in range(1, args.steps + 1):
            # each replica: gradient of its shard; MEAN aggregation all-reduces the updates
            losses = strategy.run(lambda x, y: _step(w, b, x, y, args.lr), args=(xs, ys))
            if step % args.every == 0 or step == args.steps:
                saved = _save_async(saver, prefix, step, float(np.mean(losses.values)))
        saver.wait_until_finished()
        assert isinstance(w, gv.MirroredVariable) and isinstance(b, gv.MirroredVariable)
        if not (w.components_agree() and b.components_agree()):
            print("ERROR: mirrored components diverged", file=sys.stderr)
            return 1
        x, y = gv.copy_to(x_host, w.device), gv.copy_to(y_host, w.device)
        final = _loss(w, b, x, y)
        print(f"trained {args.steps} steps in {time.perf_counter() - t0:.2f}s; loss now {final:.4f}")
        print(f"files of the latest: {sorted(f for f in os.listdir(ckpt_dir) if f.startswith(os.path.basename(saved)))}")

    latest = gv.latest_checkpoint(ckpt_dir)
    if latest is None:
        print("no checkpoint found", file=sys.stderr)
        return 1
    with gv.Registry():  # a process without the strategy: the checkpoint alone rebuilds the model
        loaded = gv.load_checkpoint(latest)
        w2, b2 = loaded["softmax/weights"], loaded["softmax/bias"]
        assert isinstance(w2, gv.MirroredVariable)
        print(f"loaded {os.path.basename(latest)} without a strategy: {type(w2).__name__} on {list(w2.devices)}")
        x, y = gv.copy_to(x_host, w2.device), gv.copy_to(y_host, w2.device)
        resumed = _loss(w2, b2, x, y)
        if not np.isclose(resumed, final, rtol=1e-5, atol=1e-6):
            print(f"ERROR: loaded loss {resumed} differs from the saved model's {final}", file=sys.stderr)
            return 1
        loss = resumed
        for _ in range(args.every):  # cross-replica updates write every component
            loss = _step(w2, b2, x, y, args.lr)
        print(f"  resumed {args.every} more steps: loss {resumed:.4f} -> {loss:.4f}")
        if not loss < resumed:
            print("ERROR: the loss did not keep decreasing after the load", file=sys.stderr)
            return 1
    print("ok: training continued from the checkpoint")
    return 0


def _save_async(saver: gv.Saver, prefix: str, step: int, loss: float) -> str:
    """Start a background save (it holds the values of this moment) and say how long the call took."""
    t0 = time.perf_counter()
    fut = saver.save(prefix, global_step=step, blocking=False)  # returns at once; training goes on
    took = (time.perf_counter() - t0) * 1e3
    print(f"  step {step:5d}  loss {loss:.4f}  saving {os.path.basename(fut.prefix)} in the background "
          f"({took:.2f} ms in the call)")
    return fut.prefix


def _run(args: argparse.Namespace, ckpt_dir: str) -> int:
    prefix = os.path.join(ckpt_dir, "model.ckpt")
    x_host, y_host = _data(4096, 32, 10, seed=0)
    policy = gv.SaveOptions(experimental_variable_policy=gv.VariablePolicy.SAVE_VARIABLE_DEVICES)

    print(f"gpuvars demo: devices {gv.list_devices()}; checkpoints in {ckpt_dir}")
    with gv.Registry():
        w, b = _model(32, 10, args.device)
        gv.global_variables_initializer().run()
        print(f"training on {w.device} ({w.backend}); {w.size + b.size} parameters")
        x, y = gv.copy_to(x_host, w.device), gv.copy_to(y_host, w.device)
        saver = gv.Saver(max_to_keep=args.keep, options=policy)
        t0 = time.perf_counter()
        loss = _loss(w, b, x, y)
        for step in range(1, args.steps + 1):
            loss = _step(w, b, x, y, args.lr)
            if step % args.every == 0 or step == args.steps:
                _save_async(saver, prefix, step, loss)
        saver.wait_until_finished()  # the last save is committed (a background error is raised here)
        final = _loss(w, b, x, y)
        print(f"trained {args.steps} steps in {time.perf_counter() - t0:.2f}s; loss now {final:.4f}")
        print(f"kept checkpoints: {[os.path.basename(p) for p in saver.last_checkpoints]}")

    # A restarted process: fresh variables (deferred, never initialized), then restore.
    latest = gv.latest_checkpoint(ckpt_dir)
    if latest is None:
        print("no checkpoint found", file=sys.stderr)
        return 1
    with gv.Registry():
        w2, b2 = _model(32, 10, args.device)
        result = gv.Saver().restore(latest)
        x, y = gv.copy_to(x_host, w2.device), gv.copy_to(y_host, w2.device)
        resumed = _loss(w2, b2, x, y)
        print(f"restored {os.path.basename(latest)} into fresh variables on {w2.device}: loss {resumed:.4f}")
        if not np.isclose(resumed, final, rtol=1e-5, atol=1e-6):
            print(f"ERROR: restored loss {resumed} differs from the saved model's {final}", file=sys.stderr)
            return 1
        if result.device_differences:
            print(f"  (saved devices differ: {result.device_differences})")
        loss = resumed
        for step in range(args.steps + 1, args.steps + 1 + args.every):
            loss = _step(w2, b2, x, y, args.lr)
        print(f"  resumed {args.every} more steps: loss {resumed:.4f} -> {loss:.4f}")
        if not loss < resumed:
            print("ERROR: the loss did not keep decreasing after the restore", file=sys.stderr)
            return 1
    print("ok: training continued from the checkpoint")
    return 0
