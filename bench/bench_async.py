"""Asynchronous checkpoint saves: what the call blocks, how fast the background writes, what training stalls.

Three parts, each against Orbax's async checkpointer and PyTorch DCP's ``async_save`` where those
are installed, on the same tensor bytes, in the same run, every cell in a fresh process:

``call``
    The time ``save(blocking=False)`` blocks the caller, for 1, 100, 1,000 and 10,000 float32
    variables of 4 KiB each (``--call-vars``; the baselines only up to ``--baseline-call-max``,
    default 1,000, as Orbax takes ~30 s per save of 10,000 arrays here), plus one row of
    16 x 64 MiB (1 GiB: the
    ``throughput`` cells' first-call figure) to show whether the call moves data. A
    least-squares line over the small-variable rows gives the intercept and the per-variable
    slope (goal for gpuvars: <= 1 ms + ~5 us per variable, no data moved on the call). Each
    cell also reports the RSS the call added (a staged host copy shows here) and how many bytes
    the writer had already written when the call returned (gpuvars' ``fut.progress``).
``throughput``
    1 GiB in 16 variables (``--quick``: 256 MiB): a synchronous save against an asynchronous one
    timed from the call to ``fut.result()`` (Orbax: to ``wait_until_finished()``), alternating
    in one process; background throughput = sync time / async time (goal for gpuvars: >= 90%).
``loop``
    A training loop of 8 variables x 32 MiB (256 MiB; ``--quick``: 8 x 8 MiB), a step = add 1
    to every variable in place (gpuvars: ``assign_add`` on numpy variables; DCP: ``Tensor.add_``;
    Orbax: JAX CPU arrays, ``x = add(x, ones)`` jitted with ``x`` donated, so XLA updates in place
    unless a save still holds the old array),
    checkpointing every ``--every`` steps: no checkpoint / sync / async, the three loops one after
    the other in one process per system (their order rotating between rounds). Reported: median step,
    p99 and max step, the worst stall (max step - the same system's median step without
    checkpoints), total wall time (steps + the wait for the last save). After the loop every
    checkpoint is read back (untimed) and compared with the values at its save call (values are
    integers, so the expected value is exact): "value at the call" ok or WRONG.

Systems (``--systems``; ``harness.System`` classes, each checked in its own interpreter by a
probe cell: one that cannot import what it needs is skipped with the reason):

===========  ==================================================================================
gpuvars      ``gv.Saver(vars).save(prefix)`` / ``save(prefix, blocking=False)`` then
             ``fut.result()``; numpy variables on /cpu:0. Its own fsyncs: data, index, state
             file, folder. Runs with ``--gpuvars-python`` (default: this interpreter) and
             PYTHONPATH set to a folder of symlinks to *this* checkout's ``gpuvars`` and
             ``backends`` (as ``gpuvars_backends``), so the code measured is the code beside
             this file, not whatever is installed.
orbax        ``ocp.Checkpointer`` / ``ocp.AsyncCheckpointer`` with ``StandardCheckpointHandler``
             and ``StandardSave`` of a dict of JAX CPU arrays; async completion =
             ``wait_until_finished()``. Runs with ``--baseline-python``.
dcp          ``torch.distributed.checkpoint.save`` / ``async_save`` (default thread
             checkpointer) with ``FileSystemWriter(path, sync_files=True)``, state dict of CPU
             tensors (``torch.from_numpy``); async completion = ``future.result()``. No process
             group (single process). Runs with ``--baseline-python``.
===========  ==================================================================================

Durability (fsync on for everyone): gpuvars fsyncs the data file, the index, the state file and
the folder itself. DCP's ``FileSystemWriter(sync_files=True)`` (its default, passed explicitly)
fsyncs the data file and ``.metadata``; Orbax's tensorstore writes fsync every data file
(tensorstore's ``file_io_sync`` default) but not its small metadata files nor the folders. So
both baselines get, inside the timed region, an ``fsync`` of every file and folder of the
checkpoint and of its parent folder once the save completed (``fsync_tree``: a few ms; in the
loop it runs at the next checkpoint call or at the end, counted in that step / the wall time).
``--audit-fsync`` runs one small save of each system under ``strace -f -y`` and lists the files
each one fsyncs by itself (needs strace).

Method (the project's rules for benchmarks on these VMs, ``bench/harness.py``): every cell runs
in a fresh process (``harness.spawn`` re-invokes this program with ``--cell`` under the system's
interpreter, ``harness.cell_main`` runs it and prints one tagged JSON line); one untimed warm-up
save (of each kind; in the loop one untimed step and save) precedes the timed ones
(``harness.time_steps``). Memory freed on
these VMs goes back to the host and the next first touch runs at ~0.5 GB/s, page cache
included, so before every timed save (and in the loop before every checkpoint step, untimed and
excluded from the wall time) the cell touches and frees 2 x the data size + 64 MiB of anonymous
memory (room for a staged copy or copy-on-write copies) and writes and unlinks a scratch file of
the data size + 64 MiB in the checkpoint folder. Children run in ``harness.child_env()``
(``MALLOC_MMAP_THRESHOLD_=131072``, glibc's default, pinned). Figures are medians over the timed
saves of a cell and, with ``--repeats`` > 1, over rounds of fresh processes (systems rotating).
Speed is reported, never asserted. Goals (in the JSON as ``harness.goal``): the call's fitted
fixed cost <= 1 ms and per-variable cost <= 5 us; async save time / sync save time <= 1/0.9.

Usage::

    python bench/bench_async.py --baseline-python /work/benchenv/bin/python     # ~6 min, 2 cores
    python bench/bench_async.py --quick --baseline-python ...                   # ~1.5 min
    python bench/bench_async.py --parts call --systems gpuvars --call-vars 1,10,100,1000,10000
    python bench/bench_async.py --json out.json                                 # every cell too
    python bench/bench_async.py --audit-fsync --baseline-python ...             # who fsyncs what
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import harness
import numpy as np
from harness import GiB, MiB, Skip, System, warm_free_pages

SYSTEMS = ("gpuvars", "orbax", "dcp")
PARTS = ("call", "throughput", "loop")
MODES = ("none", "sync", "async")
WARM_MARGIN = 64 * MiB
SMALL_VAR_ELEMS = 1024  # 4 KiB float32 variables in the call part
GOAL_CALL_INTERCEPT_S = 1e-3
GOAL_CALL_SLOPE_S = 5e-6
GOAL_THROUGHPUT = 0.90
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# --- data -------------------------------------------------------------------------------------------


def make_data(n: int, elems: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` float32 arrays of ``elems`` integer values (< 2**21, so +1 per step stays exact).

    One random block per cell, plus the tensor's index: no two tensors (and no two pages) share
    bytes, so nothing compresses and the host cannot merge pages.
    """
    rng = np.random.default_rng(seed)
    block = rng.integers(0, 1 << 20, elems).astype(np.float32)
    return [block + np.float32(i) for i in range(n)]


def names_for(n: int) -> list[str]:
    return [f"layer{i:05d}" for i in range(n)]


# --- helpers ------------------------------------------------------------------------------------------


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def fsync_tree(path: str) -> None:
    """fsync every file and folder under ``path`` (a file or a folder), then its parent folder."""
    todo: list[str] = []
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            todo += [os.path.join(root, f) for f in files]
            todo.append(root)
    elif os.path.exists(path):
        todo.append(path)
    todo.append(os.path.dirname(os.path.abspath(path)))
    for p in todo:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def prefault(data_bytes: int, folder: str) -> None:
    """Back the free pages the next save may take: anonymous memory for a staged or copy-on-write
    copy (2 x data) and page cache for the file (data), + margins."""
    warm_free_pages(2 * data_bytes + WARM_MARGIN)
    warm_free_pages(data_bytes + WARM_MARGIN, folder)
    gc.collect()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q, method="higher"))


# --- systems (each runs in its own child process) -----------------------------------------------------


class Saving(System):
    """Variables plus sync / async saves. ``start_async`` returns a handle for ``finish``."""

    has_async = True
    why_no_async = ""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.names = names_for(len(arrays))
        self.ones = np.ones(arrays[0].shape, np.float32)  # the step's operand, the same for every variable
        self.done_steps = 0  # steps applied so far: the variables hold x0 + done_steps

    def save_sync(self, path: str, step: int | None = None) -> str:
        raise NotImplementedError

    def start_async(self, path: str, step: int | None = None) -> Any:
        raise NotImplementedError

    def is_done(self, handle: Any) -> bool:
        raise NotImplementedError

    def finish(self, handle: Any) -> str:
        """Wait for the async save (and add the fsyncs it lacks); return the checkpoint path."""
        raise NotImplementedError

    def step(self) -> None:
        """One training step: +1 on every variable."""
        raise NotImplementedError

    def read_back(self, path: str) -> list[np.ndarray]:
        raise NotImplementedError

    def progress(self, handle: Any) -> int | None:
        return None

    def close(self) -> None:
        pass


class Gpuvars(Saving):
    name = "gpuvars"
    note = "gv.Saver(vars).save(prefix[, blocking=False]) of numpy variables on /cpu:0; fut.result()"
    requires = ("gpuvars",)

    def __init__(self, arrays: list[np.ndarray]) -> None:
        super().__init__(arrays)
        import gpuvars as gv

        self.gv = gv
        self.registry = gv.Registry()
        self.registry.__enter__()
        self.vars = [gv.Variable(a, name=n, device="/cpu:0") for n, a in zip(self.names, arrays)]
        self.saver = gv.Saver(self.vars, max_to_keep=None)
        self.has_async = "blocking" in inspect.signature(gv.Saver.save).parameters
        if not self.has_async:
            self.why_no_async = "this gpuvars has no save(blocking=False)"

    def save_sync(self, path: str, step: int | None = None) -> str:
        return str(self.saver.save(path, global_step=step))

    def start_async(self, path: str, step: int | None = None) -> Any:
        return self.saver.save(path, global_step=step, blocking=False)

    def is_done(self, handle: Any) -> bool:
        return bool(handle.done())

    def finish(self, handle: Any) -> str:
        return str(handle.result())

    def progress(self, handle: Any) -> int | None:
        return int(handle.progress)

    def step(self) -> None:
        for v in self.vars:
            v.assign_add(self.ones)

    def read_back(self, path: str) -> list[np.ndarray]:
        reader = self.gv.CheckpointReader(path)
        return [np.asarray(reader.get_tensor(n)) for n in self.names]

    def close(self) -> None:
        close = getattr(self.saver, "close", None)
        if close is not None:
            close()


class Orbax(Saving):
    name = "orbax"
    note = "ocp.(Async)Checkpointer(StandardCheckpointHandler) of JAX CPU arrays; wait_until_finished(); fsync_tree"
    requires = ("orbax.checkpoint", "jax")

    def __init__(self, arrays: list[np.ndarray]) -> None:
        super().__init__(arrays)
        import importlib

        jax: Any = importlib.import_module("jax")
        ocp: Any = importlib.import_module("orbax.checkpoint")
        self.jax = jax
        self.ocp = ocp
        dev = jax.devices("cpu")[0]
        self.tree = {n: jax.device_put(a, dev) for n, a in zip(self.names, arrays)}
        jax.block_until_ready(self.tree)
        self.sync_ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        self.async_ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
        # donated: XLA reuses the buffer (in place, like the others) unless the save still holds the array
        self.add = jax.jit(lambda x, d: x + d, donate_argnums=0)
        self.d = jax.device_put(self.ones, dev)

    def _path(self, path: str, step: int | None) -> str:
        return path if step is None else f"{path}-{step}"

    def save_sync(self, path: str, step: int | None = None) -> str:
        p = self._path(path, step)
        self.sync_ckptr.save(p, args=self.ocp.args.StandardSave(self.tree))
        fsync_tree(p)
        return p

    def start_async(self, path: str, step: int | None = None) -> Any:
        p = self._path(path, step)
        self.async_ckptr.save(p, args=self.ocp.args.StandardSave(self.tree))
        return p

    def is_done(self, handle: Any) -> bool:
        return os.path.isdir(handle)  # the tmp folder is renamed to the final path at the commit

    def finish(self, handle: Any) -> str:
        self.async_ckptr.wait_until_finished()
        fsync_tree(handle)
        return str(handle)

    def step(self) -> None:
        self.tree = {k: self.add(x, self.d) for k, x in self.tree.items()}
        self.jax.block_until_ready(self.tree)

    def read_back(self, path: str) -> list[np.ndarray]:
        got = self.ocp.StandardCheckpointer().restore(path)
        return [np.asarray(got[n]) for n in self.names]

    def close(self) -> None:
        self.async_ckptr.close()
        self.sync_ckptr.close()


class Dcp(Saving):
    name = "dcp"
    note = "torch.distributed.checkpoint.(async_)save, FileSystemWriter(sync_files=True); future.result(); fsync_tree"
    requires = ("torch.distributed.checkpoint",)

    def __init__(self, arrays: list[np.ndarray]) -> None:
        super().__init__(arrays)
        import importlib

        torch: Any = importlib.import_module("torch")
        dcp: Any = importlib.import_module("torch.distributed.checkpoint")
        self.torch = torch
        self.dcp = dcp
        self.sd = {n: torch.from_numpy(a) for n, a in zip(self.names, arrays)}  # shares the memory
        self.d = torch.from_numpy(self.ones)

    def _path(self, path: str, step: int | None) -> str:
        return path if step is None else f"{path}-{step}"

    def _writer(self, p: str) -> Any:
        return self.dcp.FileSystemWriter(p, sync_files=True)

    def save_sync(self, path: str, step: int | None = None) -> str:
        p = self._path(path, step)
        self.dcp.save(self.sd, storage_writer=self._writer(p))
        fsync_tree(p)
        return p

    def start_async(self, path: str, step: int | None = None) -> Any:
        p = self._path(path, step)
        return (p, self.dcp.async_save(self.sd, storage_writer=self._writer(p)))

    def is_done(self, handle: Any) -> bool:
        return bool(handle[1].done())

    def finish(self, handle: Any) -> str:
        handle[1].result()
        fsync_tree(handle[0])
        return str(handle[0])

    def step(self) -> None:
        for t in self.sd.values():
            t.add_(self.d)

    def read_back(self, path: str) -> list[np.ndarray]:
        out = {n: self.torch.zeros_like(t) for n, t in self.sd.items()}
        self.dcp.load(out, storage_reader=self.dcp.FileSystemReader(path))
        return [out[n].numpy() for n in self.names]


SYSTEM_CLASSES: dict[str, type[Saving]] = {"gpuvars": Gpuvars, "orbax": Orbax, "dcp": Dcp}
VERSION_DISTS = {"gpuvars": ("numpy",), "orbax": ("orbax-checkpoint", "jax", "tensorstore", "numpy"),
                 "dcp": ("torch", "numpy")}


def versions(system: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "interpreter": sys.executable}
    out.update({d: harness.version(d) for d in VERSION_DISTS[system]})
    if system == "gpuvars":
        import gpuvars

        out["gpuvars_path"] = os.path.dirname(os.path.realpath(gpuvars.__file__))
    return out


# --- cells ----------------------------------------------------------------------------------------------


class AsyncSave:
    """One asynchronous save into a fresh sub-folder, as ``harness.time_steps`` runs it: ``before``
    makes the folder and prefaults (untimed), the step is the call, ``after`` waits for the save to
    complete and records what the call left (RSS added, bytes written at return, call -> done)."""

    def __init__(self, sysobj: Saving, folder: str, tag: str, data_bytes: int) -> None:
        self.sysobj, self.folder, self.tag, self.data_bytes = sysobj, folder, tag, data_bytes
        self.k = 0
        self.handle: Any = None
        self.rss_kib: list[int] = []
        self.progress: list[int | None] = []
        self.finish_s: list[float] = []  # from the call's return to the save's completion

    def before(self) -> None:
        self.sub = os.path.join(self.folder, f"{self.tag}{self.k}")
        self.k += 1
        os.makedirs(self.sub)
        prefault(self.data_bytes, self.sub)
        self.r0 = rss_kib()

    def step(self) -> None:
        self.handle = self.sysobj.start_async(os.path.join(self.sub, "ckpt"))

    def after(self) -> None:
        t1 = time.perf_counter()
        self.rss_kib.append(rss_kib() - self.r0)
        self.progress.append(self.sysobj.progress(self.handle))
        self.sysobj.finish(self.handle)
        self.finish_s.append(time.perf_counter() - t1)
        shutil.rmtree(self.sub)

    def timed(self, call_s: list[float]) -> dict[str, list[Any]]:
        """The records of the timed saves (the last ``len(call_s)``; the warm-up's are dropped)."""
        n = len(call_s)
        return {"call_s": call_s, "call_rss_kib": self.rss_kib[-n:], "progress_at_return": self.progress[-n:],
                "total_s": [c + f for c, f in zip(call_s, self.finish_s[-n:])]}


def cell_call(sysobj: Saving, cell: dict[str, Any], folder: str, data_bytes: int) -> dict[str, Any]:
    """Blocking time of the async call, ``calls`` times after one untimed warm-up
    (``harness.time_steps``); past ``budget_s`` a cell stops at 3 timed calls (slow systems at
    many variables)."""
    a = AsyncSave(sysobj, folder, "c", data_bytes)
    t_cell = time.perf_counter()
    times = harness.time_steps(a.step, min(3, cell["calls"]), before=a.before, after=a.after)
    while len(times) < cell["calls"] and time.perf_counter() - t_cell <= cell["budget_s"]:
        times += harness.time_steps(a.step, 1, warmup=0, before=a.before, after=a.after)
    return a.timed(times)


def cell_throughput(sysobj: Saving, cell: dict[str, Any], folder: str, data_bytes: int) -> dict[str, Any]:
    """Sync save vs async save (call -> done), alternating, after one untimed warm-up of each
    (``harness.time_steps``)."""
    a = AsyncSave(sysobj, folder, "async", data_bytes)
    sync_k = [0]

    def sync_before() -> None:
        sync_k[0] += 1
        sub = os.path.join(folder, f"sync{sync_k[0]}")
        os.makedirs(sub)
        prefault(data_bytes, sub)

    def sync_step() -> None:
        sysobj.save_sync(os.path.join(folder, f"sync{sync_k[0]}", "ckpt"))

    def sync_after() -> None:
        shutil.rmtree(os.path.join(folder, f"sync{sync_k[0]}"))

    modes = ("sync", "async") if sysobj.has_async else ("sync",)
    for mode in modes:  # the warm-ups
        if mode == "sync":
            harness.time_steps(sync_step, 0, before=sync_before, after=sync_after)
        else:
            harness.time_steps(a.step, 0, before=a.before, after=a.after)
    sync_s: list[float] = []
    call_s: list[float] = []
    for i in range(cell["saves"]):
        for mode in modes if i % 2 == 0 else modes[::-1]:
            if mode == "sync":
                sync_s += harness.time_steps(sync_step, 1, warmup=0, before=sync_before, after=sync_after)
            else:
                call_s += harness.time_steps(a.step, 1, warmup=0, before=a.before, after=a.after)
    timed = a.timed(call_s) if call_s else {"call_s": [], "call_rss_kib": [], "progress_at_return": [], "total_s": []}
    return {"sync_s": sync_s, "async_s": timed.pop("total_s"), **timed}


def loop_one(sysobj: Saving, mode: str, steps: int, every: int, folder: str, data_bytes: int) -> dict[str, Any]:
    """One training loop in ``mode`` (``harness.time_steps``: one untimed warm-up step, which in
    the sync / async loop also saves once, in a folder of its own; then ``steps`` timed steps, a
    checkpoint every ``every``); the step count at every save is kept to check the saved values."""
    if mode == "async" and not sysobj.has_async:
        return {"error": f"no async save: {sysobj.why_no_async}"}
    sub = os.path.join(folder, mode)
    os.makedirs(sub)
    base = os.path.join(sub, "ckpt")
    warm = os.path.join(folder, "warm")
    saved: list[tuple[Any, int]] = []  # (path, or the pending handle; steps done at the call)
    state: dict[str, Any] = {"k": -harness.WARMUP_STEPS, "pending": None, "overlaps": 0, "prefault_s": 0.0}

    def before() -> None:
        state["k"] += 1
        k = state["k"]
        if k <= 0:  # the warm-up step
            os.makedirs(warm, exist_ok=True)
        elif k % every == 0:  # every mode, "none" too; untimed, excluded from the wall time
            pending = state["pending"]
            if pending is not None and not sysobj.is_done(pending):
                state["overlaps"] += 1  # skipped: it would hand the save in flight free time
            else:
                p0 = time.perf_counter()
                prefault(data_bytes, sub)
                state["prefault_s"] += time.perf_counter() - p0

    def step() -> None:
        k = state["k"]
        sysobj.step()
        sysobj.done_steps += 1
        if mode == "none" or (k > 0 and k % every):
            return
        if k <= 0:  # the warm-up's save
            if mode == "sync":
                sysobj.save_sync(os.path.join(warm, "ckpt"), 0)
            else:
                sysobj.finish(sysobj.start_async(os.path.join(warm, "ckpt"), 0))
        elif mode == "sync":
            saved.append((sysobj.save_sync(base, k), sysobj.done_steps))
        else:
            if state["pending"] is not None:  # the previous one: its path (and the baselines' fsync_tree)
                saved[-1] = (sysobj.finish(state["pending"]), saved[-1][1])
            state["pending"] = sysobj.start_async(base, k)
            saved.append((state["pending"], sysobj.done_steps))

    def after() -> None:
        if state["k"] <= 0:
            shutil.rmtree(warm)
            prefault(data_bytes, folder)

    step_s = harness.time_steps(step, steps, before=before, after=after)
    t0 = time.perf_counter()
    if state["pending"] is not None:
        saved[-1] = (sysobj.finish(state["pending"]), saved[-1][1])
    final_wait = time.perf_counter() - t0
    return {"step_s": step_s, "final_wait_s": final_wait, "wall_s": sum(step_s) + final_wait,
            "prefault_s": state["prefault_s"], "checkpoints": len(saved), "prefault_overlaps": state["overlaps"],
            "saved": saved, "sub": sub}


def cell_loop(sysobj: Saving, cell: dict[str, Any], folder: str, data_bytes: int) -> dict[str, Any]:
    """The loop in every mode of ``cell["modes"]``, one after the other in this process; then every
    checkpoint is read back (untimed) and compared with the values at its call (x0 + steps done)."""
    x0 = make_data(cell["n_vars"], cell["var_elems"])
    out: dict[str, Any] = {}
    for mode in cell["modes"]:
        r = loop_one(sysobj, mode, cell["steps"], cell["every"], folder, data_bytes)
        wrong: list[str] = []
        for path, n in r.pop("saved", []):
            got = sysobj.read_back(path)
            for name, a, b in zip(sysobj.names, got, x0):
                if not np.array_equal(a.reshape(-1), b + np.float32(n)):
                    diff = float(np.median(a.reshape(-1) - b))
                    wrong.append(f"{os.path.basename(str(path))}/{name}: median value = x0 + {diff:g}, expected + {n}")
        if "sub" in r:
            shutil.rmtree(r.pop("sub"), ignore_errors=True)
        r.update(wrong=wrong[:8], n_wrong=len(wrong))
        out[mode] = r
    return {"modes": out}


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """One cell in this process (the child of ``harness.spawn``, under the system's interpreter);
    part ``probe``: only whether the system can run here (``Skip`` if not) and its versions."""
    import warnings

    warnings.filterwarnings("ignore")
    system, part = cell["system"], cell["part"]
    SYSTEM_CLASSES[system].require()
    if part == "probe":
        return {**cell, "versions": versions(system)}
    folder = os.path.join(cell["dir"], f"cell-{os.getpid()}")
    os.makedirs(folder)
    try:
        arrays = make_data(cell["n_vars"], cell["var_elems"])
        data_bytes = sum(a.nbytes for a in arrays)
        sysobj = SYSTEM_CLASSES[system](arrays)
        del arrays
        gc.collect()
        res: dict[str, Any] = {"system": system, "part": part, "n_vars": cell["n_vars"], "data_bytes": data_bytes,
                               "mode": cell.get("mode"), "versions": versions(system),
                               "has_async": sysobj.has_async, "why_no_async": sysobj.why_no_async}
        if part == "call":
            if not sysobj.has_async:
                raise Skip(f"no async save: {sysobj.why_no_async}")
            res.update(cell_call(sysobj, cell, folder, data_bytes))
        elif part == "throughput":
            res.update(cell_throughput(sysobj, cell, folder, data_bytes))
        else:
            res.update(cell_loop(sysobj, cell, folder, data_bytes))
        sysobj.close()
        return res
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- fsync audit ---------------------------------------------------------------------------------------------


def audit_cell(system: str, folder: str) -> None:
    """One small sync and one async save (run under strace by the driver)."""
    import warnings

    warnings.filterwarnings("ignore")
    sysobj = SYSTEM_CLASSES[system](make_data(4, 1 << 18))
    # the baselines' own fsyncs only: no fsync_tree here
    globals()["fsync_tree"] = lambda path: None
    sysobj.save_sync(os.path.join(folder, "sync"))
    if sysobj.has_async:
        sysobj.finish(sysobj.start_async(os.path.join(folder, "async")))
    sysobj.close()


def audit_fsync(systems: list[str], pythons: dict[str, str], envs: dict[str, dict[str, str]], root: str) -> None:
    if shutil.which("strace") is None:
        print("fsync audit: strace is not installed (apt-get install strace)")
        return
    import re

    for system in systems:
        folder = tempfile.mkdtemp(prefix=f"audit-{system}-", dir=root)
        log = os.path.join(folder, "strace.log")
        ckpt = os.path.join(folder, "ck")
        os.makedirs(ckpt)
        proc = subprocess.run(["strace", "-f", "-y", "-qq", "-e", "trace=fsync,fdatasync,sync_file_range,msync",
                               "-o", log, pythons[system], os.path.abspath(__file__), "--audit-cell", system, ckpt],
                              check=False, capture_output=True, text=True, env=envs[system], timeout=600)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            print(f"fsync audit {system}: failed ({tail[0]})")
            shutil.rmtree(folder, ignore_errors=True)
            continue
        synced: dict[str, set[str]] = {"sync": set(), "async": set()}
        with open(log) as f:
            for line in f:
                m = re.search(r"(fsync|fdatasync|sync_file_range)\(\d+<([^>]*)>", line)
                if m and m.group(2).startswith(ckpt):
                    rel = os.path.relpath(m.group(2), ckpt)
                    kind = "async" if "async" in rel else "sync"  # "." (the shared folder) counts as sync
                    rel = re.sub(r"[0-9a-f]{32}", "<hash>", rel)
                    rel = re.sub(r"\.tmp-[\w.-]+", ".tmp-*", rel)
                    synced[kind].add(f"{m.group(1)} {rel}")
        for kind in ("sync", "async"):
            items = sorted(synced[kind])
            print(f"fsync audit {system} {kind}: {len(items)} distinct: " + ("; ".join(items) if items else "none"))
        shutil.rmtree(folder, ignore_errors=True)


# --- the driver -------------------------------------------------------------------------------------------------


def gpuvars_pythonpath(root: str) -> str:
    """A folder with ``gpuvars`` and ``gpuvars_backends`` linked to this checkout's sources."""
    import hashlib

    link_dir = os.path.join(root, "pythonpath-" + hashlib.sha1(REPO.encode()).hexdigest()[:10])  # stable per checkout
    os.makedirs(link_dir, exist_ok=True)
    for name, target in (("gpuvars", os.path.join(REPO, "gpuvars")), ("gpuvars_backends", os.path.join(REPO, "backends"))):
        link = os.path.join(link_dir, name)
        if os.path.islink(link) and os.readlink(link) == target:
            continue
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(target, link)
    return link_dir


def probe(system: str, python: str, env: dict[str, str]) -> dict[str, Any]:
    """Whether ``system`` can run under ``python`` (a probe cell there: ``skip`` with the reason
    if not), with its versions."""
    if not os.path.exists(python):
        return {"system": system, "skip": f"not installed (interpreter {python} not found)"}
    r = harness.spawn(__file__, {"system": system, "part": "probe"}, timeout=120, env=env, python=python)
    if "skip" in r:
        r["skip"] = f"{r['skip'].removeprefix(system + ': ')} (under {python})"
    elif "error" in r:
        r["skip"] = f"not usable: {r['error']}"
    return r


def merge(into: dict[str, Any], r: dict[str, Any]) -> None:
    """Pool a later round's result into the first one's: lists concatenate, counts add up."""
    for k, v in r.items():
        if isinstance(v, list) and isinstance(into.get(k), list):
            into[k] = into[k] + v
        elif k in ("n_wrong", "checkpoints", "prefault_overlaps"):
            into[k] = into.get(k, 0) + v
        elif k in ("wall_s", "final_wait_s"):
            into.setdefault(k + "_all", [into[k]]).append(v)
            into[k] = harness.summary(into[k + "_all"])["median"]


def med(xs: list[float]) -> float | None:
    """``harness.summary``'s median of the values that are not None (None if there are none)."""
    xs = [x for x in xs if x is not None]
    return harness.summary(xs)["median"] if xs else None


def fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s"


def fmt_bytes(n: int) -> str:
    if n >= GiB and n % GiB == 0:
        return f"{n // GiB} GiB"
    if n >= MiB:
        return f"{n / MiB:.0f} MiB"
    return f"{n / 1024:.0f} KiB"


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least squares y = a + b x: (a, b)."""
    if len(xs) < 2:
        return None
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def report_call(results: dict[tuple[str, int], dict[str, Any]], tput: dict[str, dict[str, Any]],
                systems: list[str], call_vars: list[int], big_desc: str) -> tuple[list[str], dict[str, Any]]:
    lines = ["(1) blocking time of the async save call (median over the calls; each variable 4 KiB float32)", "",
             "| system | variables | data | call median | call min-max | extra RSS at return | written at return | call -> done |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    fits: dict[str, Any] = {}
    for s in systems:
        xs: list[float] = []
        ys: list[float] = []
        for n in call_vars:
            r = results.get((s, n))
            if r is None:
                if s != "gpuvars":
                    lines.append(f"| {s} | {n:,} | {fmt_bytes(n * SMALL_VAR_ELEMS * 4)} | not run (--baseline-call-max) "
                                 "| | | | |")
                continue
            if "error" in r:
                lines.append(f"| {s} | {n:,} | {fmt_bytes(n * SMALL_VAR_ELEMS * 4)} | {r['error'][:150]} | | | | |")
                continue
            c = r["call_s"]
            prog = [p for p in r["progress_at_return"] if p is not None]
            lines.append(f"| {s} | {n:,} | {fmt_bytes(r['data_bytes'])} | {fmt_s(med(c))} | {fmt_s(min(c))}-{fmt_s(max(c))} | "
                         f"{max(r['call_rss_kib']) / 1024:.1f} MiB | "
                         f"{(fmt_bytes(int(max(prog))) if max(prog) else '0') if prog else 'n/a'} | {fmt_s(med(r['total_s']))} |")
            xs.append(n)
            ys.append(med(c))
        t = tput.get(s)
        if t is not None and "error" not in t and t.get("call_s"):
            c = t["call_s"]
            prog = [p for p in t["progress_at_return"] if p is not None]
            lines.append(f"| {s} | {t['n_vars']} | {big_desc} | {fmt_s(med(c))} | {fmt_s(min(c))}-{fmt_s(max(c))} | "
                         f"{max(t['call_rss_kib']) / 1024:.1f} MiB | "
                         f"{(fmt_bytes(int(max(prog))) if max(prog) else '0') if prog else 'n/a'} | {fmt_s(med(t['async_s']))} |")
        fit = fit_line(xs, ys)
        if fit:
            fits[s] = {"intercept_s": fit[0], "slope_s_per_var": fit[1], "points": list(zip(xs, ys))}
    lines.append("")
    for s, f in fits.items():
        goal = ""
        if s == "gpuvars":
            ok = f["intercept_s"] <= GOAL_CALL_INTERCEPT_S and f["slope_s_per_var"] <= GOAL_CALL_SLOPE_S
            goal = f" (goal <= 1 ms + 5 us/variable: {'met' if ok else 'MISSED'})"
        lines.append(f"fit {s}: call = {fmt_s(max(f['intercept_s'], 0))} + {f['slope_s_per_var'] * 1e6:.2f} us per variable"
                     f" (intercept {f['intercept_s'] * 1e3:+.3f} ms, least squares over {len(f['points'])} sizes){goal}")
    lines.append("'extra RSS at return' = VmRSS after the call - before it (a staged copy of the data shows here); "
                 "'written at return' = fut.progress when the call returned (gpuvars only); the last row per system is "
                 "the first-call figure of the throughput cells (big variables).")
    return lines, fits


def report_throughput(tput: dict[str, dict[str, Any]], systems: list[str]) -> tuple[list[str], dict[str, Any]]:
    lines = ["(2) background throughput: sync save vs async save timed from the call to its completion", "",
             "| system | data | sync median | sync GiB/s | async median | async GiB/s | async/sync throughput | min-max sync / async |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    ratios: dict[str, Any] = {}
    for s in systems:
        t = tput.get(s)
        if t is None:
            continue
        if "error" in t:
            lines.append(f"| {s} | | {t['error'][:150]} | | | | | |")
            continue
        gib = t["data_bytes"] / GiB
        sm, am = med(t["sync_s"]), med(t["async_s"])
        ratio = sm / am if sm and am else None
        ratios[s] = ratio
        goal = ""
        if s == "gpuvars" and ratio is not None:
            goal = f" ({'met' if ratio >= GOAL_THROUGHPUT else 'MISSED'}: goal >= 90%)"
        elif ratio is None:
            goal = f" ({t.get('why_no_async') or 'no async'})"
        rng = (f"{min(t['sync_s']):.3f}-{max(t['sync_s']):.3f} / "
               + (f"{min(t['async_s']):.3f}-{max(t['async_s']):.3f}" if t["async_s"] else "-"))
        lines.append(f"| {s} | {t['n_vars']} x {fmt_bytes(t['data_bytes'] // t['n_vars'])} | {fmt_s(sm)} | {gib / sm:.2f} | "
                     f"{fmt_s(am)} | {(f'{gib / am:.2f}' if am else '-')} | "
                     f"{(f'{ratio * 100:.0f}%' if ratio else '-')}{goal} | {rng} |")
    lines.append("async/sync throughput = sync median time / async median time (1 = the background write is as fast as a "
                 "blocking one). Baselines include fsync_tree of the checkpoint in both.")
    return lines, ratios


def report_loop(loops: dict[tuple[str, str], dict[str, Any]], systems: list[str], desc: str) -> list[str]:
    lines = [f"(3) training loop: {desc}", "",
             ("| system | checkpoints | median step | p99 step | max step | worst stall | total wall | vs no ckpt | "
              "final wait | value at the call |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in systems:
        base = loops.get((s, "none"))
        base_med = med(base["step_s"]) if base and "error" not in base else None
        base_wall = base["wall_s"] if base and "error" not in base else None
        for mode in MODES:
            r = loops.get((s, mode))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {s} | {mode} | {r['error'][:150]} | | | | | | | |")
                continue
            st = r["step_s"]
            stall = max(st) - base_med if base_med is not None and mode != "none" else None
            vs = f"{r['wall_s'] / base_wall:.2f}x" if base_wall and mode != "none" else "-"
            ok = "-" if mode == "none" else ("ok" if r["n_wrong"] == 0 else f"WRONG ({r['n_wrong']} tensors)")
            ck = "-" if mode == "none" else f"{mode}, {r['checkpoints']}"
            lines.append(f"| {s} | {ck} | {fmt_s(med(st))} | {fmt_s(pct(st, 99))} | {fmt_s(max(st))} | {fmt_s(stall)} | "
                         f"{fmt_s(r['wall_s'])} | {vs} | {fmt_s(r['final_wait_s']) if mode == 'async' else '-'} | {ok} |")
    lines.append("step times over all timed steps (rounds pooled); worst stall = max step - the same system's median step "
                 "without checkpoints; total wall = the steps + the wait for the last async save (the untimed "
                 "prefault before each checkpoint step excluded); vs no ckpt = total wall / the no-checkpoint loop's.")
    for s in systems:
        for mode in MODES:
            r = loops.get((s, mode))
            if r and "error" not in r and r.get("wrong"):
                lines.append(f"WRONG values {s} {mode}: " + "; ".join(r["wrong"][:3]))
            if r and "error" not in r and r.get("prefault_overlaps"):
                lines.append(f"note {s} {mode}: {r['prefault_overlaps']} prefault(s) skipped: the previous save was "
                             "still in flight at that checkpoint step")
    return lines


def check_goals(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """gpuvars' goals (``harness.goal``; measured None where the part did not run): the call's
    fitted fixed and per-variable cost, and the async save time over the sync one (throughput
    >= 90% of a blocking save: time <= 1/0.9 of it). Each printed as a goal line."""
    fit = (summary.get("call_fit") or {}).get("gpuvars")
    ratio = (summary.get("throughput_ratio") or {}).get("gpuvars")
    goals = [
        harness.goal("save(blocking=False) call: fixed cost (fit)", fit["intercept_s"] * 1e3 if fit else None,
                     GOAL_CALL_INTERCEPT_S * 1e3, "ms"),
        harness.goal("save(blocking=False) call: cost per variable (fit)", fit["slope_s_per_var"] * 1e6 if fit else None,
                     GOAL_CALL_SLOPE_S * 1e6, "us"),
        harness.goal("async save time / sync save time, same bytes", 1 / ratio if ratio else None,
                     round(1 / GOAL_THROUGHPUT, 3), "x"),
    ]
    print()
    for g in goals:
        if g["measured"] is None:
            print(f"goal: {g['goal']}: not measured")
        else:
            print(f"goal: {g['goal']}: {g['measured']:.3g} {g['unit']} (target <= {g['limit']:g} {g['unit']}): "
                  f"{'met' if g['met'] else 'NOT MET'}")
    return goals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="< 2 min: call 1/100/1000 vars x 3 calls, 256 MiB throughput, 8 x 8 MiB loop of 30 steps")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {SYSTEMS}")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of fresh processes per cell (default 1)")
    ap.add_argument("--call-vars", default=None, help="variable counts of the call part (default 1,100,1000,10000)")
    ap.add_argument("--calls", type=int, default=None, help="timed calls per call cell (default 7; quick 3)")
    ap.add_argument("--saves", type=int, default=None, help="timed sync + async saves per throughput cell (default 5; quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per loop cell (default 60; quick 30)")
    ap.add_argument("--every", type=int, default=None, help="checkpoint every N steps (default 15; quick 10)")
    ap.add_argument("--baseline-call-max", type=int, default=1000,
                    help="largest variable count of the baselines' call cells (default 1000: Orbax takes ~30 s per "
                         "save of 10,000 variables here)")
    ap.add_argument("--gpuvars-python", default=sys.executable, help="interpreter of the gpuvars cells (default: this one)")
    ap.add_argument("--baseline-python", default=os.environ.get("BENCH_BASELINE_PYTHON", sys.executable),
                    help="interpreter of the orbax and dcp cells (default: $BENCH_BASELINE_PYTHON or this one)")
    ap.add_argument("--dir", default="/tmp/gpuvars-bench-async", help="folder for the checkpoints")
    ap.add_argument("--json", metavar="PATH", help="write every cell and the machine here")
    ap.add_argument("--audit-fsync", action="store_true", help="list what each system fsyncs by itself (strace), then exit")
    ap.add_argument("--audit-cell", nargs=2, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    if harness.cell_main(run_cell, argv):
        return 0
    args = ap.parse_args(argv)
    if args.audit_cell:
        audit_cell(*args.audit_cell)
        return 0

    q = args.quick
    call_vars = [int(x) for x in (args.call_vars or ("1,100,1000" if q else "1,100,1000,10000")).split(",") if x]
    calls = args.calls or (3 if q else 7)
    budget = 4.0 if q else 20.0  # a call cell stops after this many seconds once it has 3 timed calls
    saves = args.saves or (2 if q else 5)
    steps = args.steps or (30 if q else 60)
    every = args.every or (10 if q else 15)
    tput_vars, tput_elems = 16, (4 if q else 16) * MiB  # 16 x 16 MiB = 256 MiB / 16 x 64 MiB = 1 GiB
    loop_vars, loop_elems = 8, (2 if q else 8) * MiB  # 8 x 8 MiB / 8 x 32 MiB
    parts = [p for p in args.parts.split(",") if p]
    systems = [s for s in args.systems.split(",") if s]
    for what, vals, known in (("part", parts, PARTS), ("system", systems, SYSTEMS)):
        for v in vals:
            if v not in known:
                ap.error(f"unknown {what} {v!r}; known: {', '.join(known)}")
    os.makedirs(args.dir, exist_ok=True)

    base_env = harness.child_env({"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
                                  "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")})
    base_env.pop("PYTHONPATH", None)
    g_env = dict(base_env, PYTHONPATH=gpuvars_pythonpath(args.dir))
    pythons = {"gpuvars": args.gpuvars_python, "orbax": args.baseline_python, "dcp": args.baseline_python}
    envs = {"gpuvars": g_env, "orbax": base_env, "dcp": base_env}
    skipped: dict[str, str] = {}
    seen_versions: dict[str, dict[str, Any]] = {}
    for s in list(systems):
        r = probe(s, pythons[s], envs[s])
        if "skip" in r:
            skipped[s] = r["skip"]
            systems.remove(s)
        else:
            seen_versions[s] = r["versions"]

    if args.audit_fsync:
        for s, why in skipped.items():
            print(f"fsync audit {s}: {why}")
        audit_fsync(systems, pythons, envs, args.dir)
        return 0

    machine = harness.machine_record(args.dir)
    machine.update(checkpoint_dir=args.dir, gpuvars_from=REPO)
    print(f"Machine: {harness.machine_line(machine)}; checkpoints in {args.dir}; gpuvars from {REPO}")
    print(f"Command: {' '.join(['python', 'bench/bench_async.py', *argv])}")
    for s, why in skipped.items():
        print(f"Note: {s}: {why}")
    load0 = os.getloadavg()
    if load0[0] > 0.5:
        print(f"Note: load average {load0[0]:.2f} before the run: other processes share the CPUs and the disk")
    sys.stdout.flush()

    t_start = time.perf_counter()
    call_res: dict[tuple[str, int], dict[str, Any]] = {}
    tput_res: dict[str, dict[str, Any]] = {}
    loop_res: dict[tuple[str, str], dict[str, Any]] = {}
    cells: list[dict[str, Any]] = []

    def spawn(cell: dict[str, Any], timeout: float) -> dict[str, Any]:
        r = harness.spawn(__file__, cell, timeout=timeout, env=envs[cell["system"]], python=pythons[cell["system"]])
        if "skip" in r:
            r["error"] = f"skipped: {r['skip']}"
        cells.append(r)
        return r

    def run(key: Any, store: dict[Any, Any], cell: dict[str, Any], timeout: float) -> None:
        s = cell["system"]
        t0 = time.perf_counter()
        r = spawn(cell, timeout)
        if "versions" in r:
            seen_versions.setdefault(s, r["versions"])
        if key not in store or "error" in r:
            store[key] = r
        elif "error" not in store[key]:
            merge(store[key], r)
        what = r.get("error") or "ok"
        print(f"  [{time.perf_counter() - t0:5.1f} s] {cell['part']:10} {s:8} {cell['n_vars']} vars: {what}",
              file=sys.stderr, flush=True)

    common = {"dir": args.dir}
    for rnd in range(args.repeats):
        rot = harness.rotated(systems, rnd)
        if "call" in parts:
            for n in call_vars:
                for s in rot:
                    if s != "gpuvars" and n > args.baseline_call_max:
                        continue
                    run((s, n), call_res, {**common, "system": s, "part": "call", "n_vars": n,
                                           "var_elems": SMALL_VAR_ELEMS, "calls": calls, "budget_s": budget}, 600)
        if "throughput" in parts or "call" in parts:
            for s in rot:
                run(s, tput_res, {**common, "system": s, "part": "throughput", "n_vars": tput_vars,
                                  "var_elems": tput_elems, "saves": saves}, 600)
        if "loop" in parts:
            modes = harness.rotated(MODES, rnd)  # rotate between rounds
            for s in rot:
                cell = {**common, "system": s, "part": "loop", "modes": modes, "n_vars": loop_vars,
                        "var_elems": loop_elems, "steps": steps, "every": every}
                t0 = time.perf_counter()
                r = spawn(cell, 900)
                if "versions" in r:
                    seen_versions.setdefault(s, r["versions"])
                per_mode = r.get("modes") or {m: {"error": r.get("error", "no result")} for m in modes}
                for mode, mr in per_mode.items():
                    key = (s, mode)
                    if key not in loop_res or "error" in mr:
                        loop_res[key] = mr
                    elif "error" not in loop_res[key]:
                        merge(loop_res[key], mr)
                status = r.get("error") or ", ".join(f"{m}: {mr.get('error', 'ok')}" for m, mr in per_mode.items())
                print(f"  [{time.perf_counter() - t0:5.1f} s] loop       {s:8} {status}", file=sys.stderr, flush=True)
    load1 = os.getloadavg()

    print()
    for s, v in seen_versions.items():
        print(f"{s}: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "interpreter") + f" ({v['interpreter']})")
    out: dict[str, Any] = {}
    big_desc = f"{fmt_bytes(tput_vars * tput_elems * 4)}"
    if "call" in parts:
        print()
        lines, fits = report_call(call_res, tput_res, systems, call_vars, big_desc)
        print("\n".join(lines))
        out["call_fit"] = fits
    if "throughput" in parts:
        print()
        lines, ratios = report_throughput(tput_res, systems)
        print("\n".join(lines))
        out["throughput_ratio"] = ratios
    if "loop" in parts:
        print()
        desc = (f"{loop_vars} variables x {fmt_bytes(loop_elems * 4)} ({fmt_bytes(loop_vars * loop_elems * 4)}), "
                f"{steps} timed steps, a checkpoint every {every} steps, {args.repeats} round(s)")
        print("\n".join(report_loop(loop_res, systems, desc)))
    for s, why in skipped.items():
        print(f"{s}: {why}")
    goals = check_goals(out)
    elapsed = time.perf_counter() - t_start
    print(f"\nTotal {elapsed:.0f} s; load average (1 min) {load0[0]:.2f} before, {load1[0]:.2f} after")
    if args.json:
        harness.write_json(args.json, program="bench_async", machine=machine, cells=cells, goals=goals,
                           args=vars(args), versions=seen_versions, skipped=skipped, summary=out,
                           systems={n: c.note for n, c in SYSTEM_CLASSES.items()},
                           call=[dict(v, key=list(k)) for k, v in call_res.items()],
                           throughput=list(tput_res.values()),
                           loop=[dict(v, key=list(k)) for k, v in loop_res.items()],
                           loadavg=[load0, load1], elapsed_s=elapsed)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
