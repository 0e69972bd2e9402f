"""Ordinary user code, for ``mypy --strict`` only (.ci/run): the public API must type-check
as users write it, without casts or asserts. Not a test module (pytest collects
``test_*.py``), and never run; it follows README.md's quick tour.
"""

from __future__ import annotations

import os

import numpy as np

import gpuvars as gv


def train(folder: str) -> float:
    gv.list_devices()
    everywhere: list[str] = gv.list_devices(all_processes=True)
    with gv.device("/gpu:0"):
        w = gv.Variable(gv.random_normal([784, 200], stddev=0.35), name="weights")
        b = gv.Variable(gv.zeros([200]), name="biases")
    w2 = gv.Variable(w.initialized_value() * 2.0, name="w2")
    gv.global_variables_initializer().run()
    gv.global_variables_initializer()()

    v = gv.Variable(np.zeros(3, np.float32), name="v")
    y = v + 1.0
    z = 2.0 * v - y
    x = v.assign(np.ones(3)).numpy()
    v.assign_add(np.ones(3)).assign_sub(np.ones(3))
    n = v.shape[0]
    rows, cols = w.shape
    size = v.dtype.itemsize * n
    w.scatter_update([0, 5], np.zeros((2, 200)))
    host: np.ndarray = w.numpy()
    total = float(np.asarray(v).sum() + x.sum() + host.sum() + np.asarray(z).sum())

    with gv.config.transfer_guard("disallow"):
        b.assign_add(np.ones(200, np.float32))

    saver = gv.Saver([v, w, b, w2], max_to_keep=5, options=gv.SaveOptions(
        experimental_variable_policy=gv.VariablePolicy.SAVE_VARIABLE_DEVICES, commit_timeout=60.0))
    try:
        gv.Saver([v]).save(os.path.join(folder, "collective"))
    except gv.CheckpointCommitError as exc:
        late: tuple[int, ...] = exc.processes
        print(late, everywhere)
    prefix = saver.save(os.path.join(folder, "model.ckpt"), global_step=1000)
    result = saver.restore(prefix)
    keys: tuple[str, ...] = result.restored
    latest = gv.latest_checkpoint(folder)  # None when the folder holds no checkpoint
    if latest is not None:
        saver.restore(latest)

    with gv.Registry():
        loaded = gv.load_checkpoint(prefix, device_map={"/gpu:*": "/cpu:0"})
        first = loaded["v"].numpy()
        where = loaded["weights"].device, loaded.moved

    strategy = gv.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        m = gv.Variable(np.zeros(3, np.float32), name="m", aggregation=gv.VariableAggregation.MEAN)
    components = strategy.experimental_local_results(m)  # TF's way to reach a mirrored variable's parts
    strategy.run(lambda: m.assign_add(np.ones(3)))
    emb = gv.ShardedVariable(np.zeros((1000, 64)), gv.FixedShardsPartitioner(1), name="emb", devices=["/cpu:0"])
    emb.numpy()

    print(rows * cols + size, keys, where, first.sum(), len(components))
    return total
