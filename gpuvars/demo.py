"""The main job: train softmax regression with gpuvars variables, checkpoint, restart, resume.

It runs on the best device of this machine (``/gpu:0`` when a GPU is usable, else soft
placement puts it on ``/cpu:0``), saves every ``--every`` steps with ``max_to_keep``, then
builds fresh variables as a restarted process would, restores the latest checkpoint and
shows the loss continuing from where it was.
"""

from __future__ import annotations

import argparse
import json
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


def _step(opt: gv.optim.Optimizer, w: gv.Variable, b: gv.Variable, x: Any, y: Any, global_batch: int) -> float:
    """One Adam step of softmax cross-entropy: gradients computed on the variables' device
    (summed over the global batch: inside strategy.run each replica's share is summed once)."""
    xp = w.physical_device.backend.xp
    logits = x @ w.value() + b.value()
    logits = logits - logits.max(axis=1, keepdims=True)
    p = xp.exp(logits)
    p = p / p.sum(axis=1, keepdims=True)
    loss = float(-(y * xp.log(p + 1e-9)).sum() / x.shape[0])
    err = (p - y) / global_batch
    opt.apply_gradients([(x.T @ err, w), (err.sum(axis=0), b)])
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
    parser.add_argument("--lr", type=float, default=0.05, help="Adam's learning rate (default 0.05)")
    parser.add_argument(
        "--replicas", type=int, default=1,
        help="data-parallel replicas: GPUs if enough are usable, else logical CPU devices (default 1)",
    )
    parser.add_argument(
        "--processes", type=int, default=1,
        help="data-parallel processes on this machine, joined by gv.distributed (one replica each; default 1)",
    )
    parser.add_argument("--process-worker", action="store_true", help=argparse.SUPPRESS)  # one of --processes
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.keep < 1 or args.replicas < 1 or args.processes < 1:
        parser.error("--steps, --every, --keep, --replicas and --processes must be >= 1")
    if args.processes > 1 and args.replicas > 1:
        parser.error("--processes runs one replica per process: leave --replicas out")
    if args.process_worker:
        if args.ckpt_dir is None:
            parser.error("a process worker needs --ckpt-dir")
        return _process_worker(args, args.ckpt_dir)
    run = _run if args.replicas == 1 else _run_replicated
    if args.processes > 1:
        run = _run_processes
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

    def model() -> tuple[gv.Variable, gv.Variable, gv.optim.Adam]:
        with strategy.scope():
            w = gv.Variable(gv.initializers.GlorotUniform(seed=1), shape=(32, 10), name="softmax/weights")
            b = gv.Variable(gv.zeros([10]), name="softmax/bias")
        opt = gv.optim.Adam(args.lr)
        opt.build([w, b])  # mirrored slots, deferred: the first step or a restore fills them
        return w, b, opt

    def shard(a: np.ndarray[Any, Any]) -> gv.PerReplica:
        """Replica k's rows of ``a``, on replica k's device."""
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: gv.copy_to(a[ctx.replica_id_in_sync_group * rows :][:rows], devices[ctx.replica_id_in_sync_group])
        )

    def train(w: gv.Variable, b: gv.Variable, opt: gv.optim.Adam, first: int, last: int, saver: gv.Saver | None) -> None:
        xs, ys = shard(x_host), shard(y_host)
        for step in range(first, last + 1):
            # each replica: the gradient of its shard over the global batch; the optimizer sums them once
            losses = strategy.run(lambda x, y: _step(opt, w, b, x, y, x_host.shape[0]), args=(xs, ys))
            if saver is not None and (step % args.every == 0 or step == last):
                _save_async(saver, prefix, step, float(np.mean(losses.values)))

    with gv.Registry():
        w, b, opt = model()
        gv.global_variables_initializer().run()
        saver = gv.Saver(max_to_keep=args.keep, options=policy)
        t0 = time.perf_counter()
        train(w, b, opt, 1, args.steps, saver)
        saver.wait_until_finished()
        assert isinstance(w, gv.MirroredVariable) and isinstance(b, gv.MirroredVariable)
        if not (w.components_agree() and b.components_agree() and opt.get_slot(w, "m").components_agree()):
            print("ERROR: mirrored components diverged", file=sys.stderr)
            return 1
        x, y = gv.copy_to(x_host, w.device), gv.copy_to(y_host, w.device)
        final = _loss(w, b, x, y)
        print(f"trained {args.steps} steps in {time.perf_counter() - t0:.2f}s; loss now {final:.4f}")
        train(w, b, opt, args.steps + 1, args.steps + args.every, None)
        continued = _loss(w, b, x, y)

    latest = gv.latest_checkpoint(ckpt_dir)
    if latest is None:
        print("no checkpoint found", file=sys.stderr)
        return 1
    print(f"files of the latest: {sorted(f for f in os.listdir(ckpt_dir) if f.startswith(os.path.basename(latest)))}")
    with gv.Registry():  # a process without the strategy: the checkpoint alone rebuilds the model
        loaded = gv.load_checkpoint(latest)
        w2, b2 = loaded["softmax/weights"], loaded["softmax/bias"]
        assert isinstance(w2, gv.MirroredVariable)
        print(f"loaded {os.path.basename(latest)} without a strategy: {type(w2).__name__} on {list(w2.devices)}, "
              f"with {sorted(k for k in loaded if '/Adam/' in k or k.startswith('Adam/'))}")
        x, y = gv.copy_to(x_host, w2.device), gv.copy_to(y_host, w2.device)
        if _loss(w2, b2, x, y) != final:
            print(f"ERROR: the loaded loss {_loss(w2, b2, x, y)} differs from the saved model's {final}", file=sys.stderr)
            return 1
    with gv.Registry():  # a restarted job: fresh variables and optimizer under the strategy, restored by name
        w3, b3, opt3 = model()
        gv.Saver().restore(latest)
        x, y = gv.copy_to(x_host, w3.device), gv.copy_to(y_host, w3.device)
        resumed = _loss(w3, b3, x, y)
        train(w3, b3, opt3, args.steps + 1, args.steps + args.every, None)
        loss = _loss(w3, b3, x, y)
        print(f"restored into fresh mirrored variables: loss {resumed:.4f}; {args.every} more steps -> {loss:.4f} "
              f"(the uninterrupted run: {continued:.4f})")
        if resumed != final or loss != continued:
            print("ERROR: the restarted run does not continue exactly where the saved one was", file=sys.stderr)
            return 1
    print("ok: training continued from the checkpoint")
    return 0


def _run_processes(args: argparse.Namespace, ckpt_dir: str) -> int:
    """``--processes N``: N processes train data-parallel and checkpoint together (each
    save committed once, across processes); then this process, without a strategy, loads
    the checkpoint and continues."""
    from gpuvars.distributed.launch import launch

    n = args.processes
    print(f"gpuvars demo: {n} processes (python -m gpuvars launch), one replica each; checkpoints in {ckpt_dir}")
    worker = ["gpuvars", "demo", "--process-worker", "--ckpt-dir", ckpt_dir, "--steps", str(args.steps),
              "--every", str(args.every), "--keep", str(args.keep), "--lr", str(args.lr), "--device", args.device]
    status = launch("-m", worker, n, timeout=900)
    if status != 0:
        print(f"ERROR: the {n} training processes failed (status {status})", file=sys.stderr)
        return status
    results = []
    for k in range(n):
        with open(os.path.join(ckpt_dir, f"demo-process-{k}.json")) as fh:
            results.append(json.load(fh))
    final, continued = results[0]["final"], results[0]["continued"]
    if any(r["final"] != final or r["continued"] != continued for r in results):
        print(f"ERROR: the processes' models differ: {results}", file=sys.stderr)
        return 1
    latest = gv.latest_checkpoint(ckpt_dir)
    if latest is None:
        print("no checkpoint found", file=sys.stderr)
        return 1
    x_host, y_host = _data(4096, 32, 10, seed=0)
    print(f"files of the latest: {sorted(f for f in os.listdir(ckpt_dir) if f.startswith(os.path.basename(latest)))}")
    with gv.Registry():  # one process, no strategy: every variable from its logical value
        w, b = _model(32, 10, args.device)
        opt = gv.optim.Adam(args.lr)
        opt.build([w, b])
        gv.Saver().restore(latest)
        x, y = gv.copy_to(x_host, w.device), gv.copy_to(y_host, w.device)
        resumed = _loss(w, b, x, y)
        print(f"restored {os.path.basename(latest)} in one process without a strategy, on {w.device}: "
              f"loss {resumed:.6f} (the {n} processes saved it at {final:.6f})")
        if resumed != final:
            print(f"ERROR: restored loss {resumed} differs from the saved model's {final}", file=sys.stderr)
            return 1
        for _ in range(args.every):
            _step(opt, w, b, x, y, x.shape[0])
        loss = _loss(w, b, x, y)
        # the same steps; the processes summed their gradients in another order: equal to rounding
        print(f"  {args.every} more steps in one process: loss {loss:.6f} (the {n} processes: {continued:.6f})")
        if not np.isclose(loss, continued, rtol=1e-4, atol=1e-6):
            print("ERROR: one process does not continue where the processes did", file=sys.stderr)
            return 1
    print("ok: training continued from the checkpoint the processes saved")
    return 0


def _process_worker(args: argparse.Namespace, ckpt_dir: str) -> int:
    """One of ``--processes``: a replica of MultiWorkerMirroredStrategy on its best device,
    its share of the batch, asynchronous saves across processes."""
    gv.distributed.initialize(timeout=120)
    me = gv.distributed.process_id()
    strategy = gv.MultiWorkerMirroredStrategy()
    devices = list(strategy.devices)
    n = strategy.num_replicas_in_sync
    x_host, y_host = _data(4096, 32, 10, seed=0)
    rows = x_host.shape[0] // n
    first_replica = me * len(devices)
    if me == 0:
        print(f"{n} replicas in sync, this process on {devices}")
    with strategy.scope():
        w = gv.Variable(gv.initializers.GlorotUniform(seed=1), shape=(32, 10), name="softmax/weights")
        b = gv.Variable(gv.zeros([10]), name="softmax/bias")
    opt = gv.optim.Adam(args.lr)
    opt.build([w, b])
    gv.global_variables_initializer().run()  # seeded: the same values in every process

    def shard(a: np.ndarray[Any, Any]) -> gv.PerReplica:
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: gv.copy_to(a[ctx.replica_id_in_sync_group * rows :][:rows],
                                   devices[ctx.replica_id_in_sync_group - first_replica]))

    xs, ys = shard(x_host), shard(y_host)
    saver = gv.Saver(max_to_keep=args.keep,
                     options=gv.SaveOptions(experimental_variable_policy="expand_distributed_variables"))
    prefix = os.path.join(ckpt_dir, "model.ckpt")
    x, y = gv.copy_to(x_host, w.device), gv.copy_to(y_host, w.device)
    for step in range(1, args.steps + args.every + 1):
        strategy.run(lambda xr, yr: _step(opt, w, b, xr, yr, x_host.shape[0]), args=(xs, ys))
        if step <= args.steps and (step % args.every == 0 or step == args.steps):
            t0 = time.perf_counter()
            saver.save(prefix, global_step=step, blocking=False)  # every process calls it; committed once
            if me == 0:
                print(f"  step {step:5d}  loss {_loss(w, b, x, y):.4f}  saving model.ckpt-{step} across the "
                      f"processes in the background ({(time.perf_counter() - t0) * 1e3:.2f} ms in the call)")
        if step == args.steps:
            saver.wait_until_finished()
            final = _loss(w, b, x, y)
    continued = _loss(w, b, x, y)
    with open(os.path.join(ckpt_dir, f"demo-process-{me}.json"), "w") as fh:
        json.dump({"final": final, "continued": continued}, fh)
    saver.close()
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

    def train(w: gv.Variable, b: gv.Variable, opt: gv.optim.Adam, x: Any, y: Any, first: int, last: int,
              saver: gv.Saver | None) -> float:
        loss = float("nan")
        for step in range(first, last + 1):
            loss = _step(opt, w, b, x, y, x.shape[0])
            if saver is not None and (step % args.every == 0 or step == last):
                _save_async(saver, prefix, step, loss)
        return loss

    with gv.Registry():
        w, b = _model(32, 10, args.device)
        gv.global_variables_initializer().run()
        opt = gv.optim.Adam(args.lr)
        print(f"training on {w.device} ({w.backend}); {w.size + b.size} parameters; {type(opt).__name__}")
        x, y = gv.copy_to(x_host, w.device), gv.copy_to(y_host, w.device)
        opt.build([w, b])  # the slots exist (deferred) before the Saver is made: it saves them
        saver = gv.Saver(max_to_keep=args.keep, options=policy)
        t0 = time.perf_counter()
        train(w, b, opt, x, y, 1, args.steps, saver)
        saver.wait_until_finished()  # the last save is committed (a background error is raised here)
        final = _loss(w, b, x, y)
        print(f"trained {args.steps} steps in {time.perf_counter() - t0:.2f}s; loss now {final:.4f}")
        print(f"kept checkpoints: {[os.path.basename(p) for p in saver.last_checkpoints]}")
        train(w, b, opt, x, y, args.steps + 1, args.steps + args.every, None)
        continued = _loss(w, b, x, y)

    # A restarted process: fresh variables and optimizer (slots deferred, never initialized), then restore.
    latest = gv.latest_checkpoint(ckpt_dir)
    if latest is None:
        print("no checkpoint found", file=sys.stderr)
        return 1
    with gv.Registry():
        w2, b2 = _model(32, 10, args.device)
        opt2 = gv.optim.Adam(args.lr)
        opt2.build([w2, b2])
        result = gv.Saver().restore(latest)
        x, y = gv.copy_to(x_host, w2.device), gv.copy_to(y_host, w2.device)
        resumed = _loss(w2, b2, x, y)
        print(f"restored {os.path.basename(latest)} into fresh variables on {w2.device}: loss {resumed:.4f}, "
              f"{len(result.restored)} tensors (Adam's slots and iterations={int(opt2.iterations.numpy())} too)")
        if resumed != final:
            print(f"ERROR: restored loss {resumed} differs from the saved model's {final}", file=sys.stderr)
            return 1
        if result.device_differences:
            print(f"  (saved devices differ: {result.device_differences})")
        train(w2, b2, opt2, x, y, args.steps + 1, args.steps + args.every, None)
        loss = _loss(w2, b2, x, y)
        print(f"  resumed {args.every} more steps: loss {resumed:.4f} -> {loss:.4f} (the uninterrupted run: {continued:.4f})")
        if loss != continued:
            print("ERROR: the restarted run does not continue exactly where the saved one was", file=sys.stderr)
            return 1
    print("ok: training continued from the checkpoint")
    return 0
