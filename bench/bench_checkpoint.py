"""Checkpoint save/restore of gpuvars against raw I/O and the usual formats, same bytes, one run.

Systems (every one saves the same tensor bytes and ends its save with an fsync of the file):

===========  ===========================================  ==============================================
system       save (timed)                                 restore (timed)
===========  ===========================================  ==============================================
raw          the safetensors byte layout written with     ``readinto`` each tensor's bytes into existing,
             ``f.write`` per tensor, ``flush``, ``fsync``   prefaulted numpy buffers (the read limit)
             (the write limit)
gpuvars      ``gv.Saver(vars).save(prefix)`` (its own      ``saver.restore(prefix)``: into the existing
             fsyncs: data, index, state file, folder)     variables, xxh3 checksums checked on the way
safetensors  ``safetensors.numpy.save_file`` + fsync*     ``safetensors.numpy.load_file`` (allocates)
numpy        ``np.savez`` + fsync*                        ``np.load`` + reading every array (allocates)
torch        ``torch.save`` of ``torch.from_numpy``        ``torch.load(weights_only=True)`` (allocates);
             tensors + fsync* (only if torch is           only if torch is installed
             installed)
===========  ===========================================  ==============================================

``*`` these APIs do not fsync; the benchmark adds one ``os.fsync`` of the file inside the
timed step so every save is durable. ``verify`` (gpuvars only) times
``gv.CheckpointReader(prefix).verify()`` and is reported as a fraction of the gpuvars warm
restore (the design requires checksum verification to cost under a fifth of one).

Workloads: ``big`` = 64 float32 tensors of 16 MiB (1 GiB, shapes vary: 2048x2048,
4096x1024, 1024x4096, 4194304); ``small`` = 20,000 float32 tensors of 64 elements (shapes
64, 8x8, 4x16, 16x4, 2x4x8); ``tiny`` = 200,000 float32 tensors of 4-64 elements (16-256
bytes). Data is random (seeded), so nothing compresses.

Phases: ``save``, ``restore``, ``verify`` (gpuvars only) and ``load`` (gpuvars only:
``gv.load_checkpoint`` into a fresh registry, new variables, compared with safetensors'
``load_file``, which allocates too). ``jaxcpu-put`` (the JAX CPU floor: a new host array per
tensor, then ``jax.device_put`` of each) and ``gpuvars-jaxcpu`` (variables on /cpu:0 served by
JAX) measure the JAX CPU restore.

Method (the project's rules for benchmarks on these VMs):

- Each (system, workload, phase) cell runs in a fresh process (this program re-invokes
  itself with ``--cell``) that builds the data, runs the step once untimed (``--warmup``:
  imports, lazy set-up and first-use effects; measured here, the very first readinto of a
  freshly written file in a process ran up to 1.8x slower than the next ones), times one
  step and prints one JSON line.
  Every cell runs once per round, ``--repeats`` rounds (default 3), the order of the
  systems rotating between rounds so drift spreads over all of them; the table quotes the
  median over rounds and the min-max. ``--profile`` adds one cProfiled, untimed step to the
  gpuvars cells of the first round (printed to stderr).
- Memory freed on these VMs goes back to the host and the next first touch runs at
  ~0.5 GB/s, for page-cache pages as much as for process memory (measured here: a 1 GiB
  write into the page cache took 1.5-2.5 s cold, 0.2-0.4 s warm). So all source and
  destination buffers are touched before timing, and right before each timed step the cell
  touches and frees an anonymous buffer of the data size + 64 MiB, and (save cells) writes
  and unlinks a scratch file of that size in the same folder (distinct content in every page),
  so that the kernel's free pages the step will use are already backed. Allocating loaders
  therefore pay ordinary page faults, not the VM's first-touch cost.
- Peak extra RSS = VmHWM after a step - VmRSS just before it (the worst of the warm-up and
  timed steps: a first call may grow the heap more than a later one), with VmHWM reset by
  writing ``5`` to ``/proc/self/clear_refs`` (checked at start). It counts file pages that
  a loader maps (safetensors mmaps the file) as well as allocations. Children run with
  ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc's default, pinned) so freed big arrays go back to
  the kernel between repeats instead of staying in the heap and hiding the next repeat's
  allocations.
- Restores are warm-cache (the file was just written and fsynced; its pages are cached)
  unless ``--cold``, which syncs and drops the page cache before each timed restore (needs
  root). raw and gpuvars restore into existing buffers/variables (zeroed, untimed, before
  each repeat); safetensors, numpy and torch allocate their results (that is their API).
  Every restore is checked against the source's xxh3 per tensor (untimed).
- Files go to ``--dir`` (default /tmp/gpuvars-bench), one sub-folder per cell, deleted
  after each repeat and at the end of the cell.

``--gpu`` adds GPU cells (big and small, save and restore) when CuPy and/or JAX can use
``/gpu:0``: ``gpuvars-cupy`` / ``gpuvars-jax`` (variables on /gpu:0, ``Saver.save`` /
``Saver.restore`` into them) against ``base-cupy`` (``cupy.asnumpy`` + write, fsync; read
into a host buffer + ``cupy.asarray``) and ``base-jax`` (``np.asarray`` + write, fsync;
read into a host buffer + ``jax.device_put``, blocked per tensor because the host buffer is
reused). Restores end with a device synchronize. Without a usable GPU it prints why and
skips them.

Usage::

    python bench/bench_checkpoint.py                  # ~4-5 min on a 2-core VM, 3 rounds
    python bench/bench_checkpoint.py --quick          # ~25 s: 1 round, big = 256 MiB, small = 5,000
    python bench/bench_checkpoint.py --json out.json  # also every cell, the machine, the goals
    python bench/bench_checkpoint.py --systems raw,gpuvars --workloads big --phases save
    python bench/bench_checkpoint.py --profile        # cProfile one extra gpuvars repeat per cell
    python bench/bench_checkpoint.py --cold           # cold-cache restores (root: drop_caches)
    python bench/bench_checkpoint.py --gpu            # add the /gpu:0 cells (CuPy, JAX)

Goals (from the issue; measured and reported, never asserted): at 1 GiB gpuvars save within
1.15x of raw write+fsync, restore within 1.2x of raw readinto, peak extra RSS under 64 MiB;
small tensors no worse than np.savez / np.load; verify under 1/5 of a warm restore.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import harness
import numpy as np
import xxhash
from harness import GiB, MiB, version, warm_free_pages

CPU_SYSTEMS = ("raw", "raw2", "gpuvars", "safetensors", "numpy", "torch", "jaxcpu-put", "gpuvars-jaxcpu")
OPT_SYSTEMS = ("gpuvars-sharded",)  # only on request (--max-shard-size adds it)
GPU_SYSTEMS = ("base-cupy", "gpuvars-cupy", "base-jax", "gpuvars-jax")
BASELINE = {"raw": "raw", "raw2": "raw2", "gpuvars": "raw2", "safetensors": "raw", "numpy": "raw", "torch": "raw",
            "base-cupy": "base-cupy", "gpuvars-cupy": "base-cupy",
            "base-jax": "base-jax", "gpuvars-jax": "base-jax",
            "jaxcpu-put": "raw", "gpuvars-jaxcpu": "jaxcpu-put", "gpuvars-sharded": "raw2"}
WORKLOADS = ("big", "small", "tiny")
PHASES = ("save", "restore", "verify", "load")
GOAL_SAVE = 1.15
GOAL_RESTORE = 1.2
GOAL_RSS_MIB = 64
GOAL_VERIFY = 0.2
WARM_MARGIN = 64 * MiB



# --- workloads ----------------------------------------------------------------------------------


GROWTH_BYTES_MIB = (64, 256, 1024, 4096)  #: --growth: total size sweep (tensors of 16 MiB; quick: up to 256)
GROWTH_BYTES_MIB_QUICK = (16, 64, 256)
GROWTH_COUNTS = (1000, 10000, 100000)  #: --growth: tensor-count sweep at a fixed total
GROWTH_COUNTS_QUICK = (1000, 5000, 20000)
GROWTH_COUNT_MIB = 64


def growth_workloads(quick: bool) -> list[str]:
    """The workload names of the growth sweeps: ``bytes-<MiB>`` and ``count-<tensors>``."""
    return ([f"bytes-{m}" for m in (GROWTH_BYTES_MIB_QUICK if quick else GROWTH_BYTES_MIB)]
            + [f"count-{n}" for n in (GROWTH_COUNTS_QUICK if quick else GROWTH_COUNTS)])


def is_workload(name: str) -> bool:
    head, _, num = name.partition("-")
    return name in WORKLOADS or (head in ("bytes", "count") and num.isdigit() and int(num) > 0)


def workload_specs(workload: str, quick: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every float32 tensor, in name order (the safetensors file order).

    Besides big / small / tiny: ``bytes-<MiB>`` (that many MiB in tensors of 16 MiB, at least
    4 tensors) and ``count-<N>`` (N equal tensors holding GROWTH_COUNT_MIB in all).
    """
    head, _, num = workload.partition("-")
    if head == "bytes" and num.isdigit():
        total = int(num) * MiB // 4  # float32 elements
        n = max(4, int(num) // 16)
        return [(f"t{i:06d}", (total // n,)) for i in range(n)]
    if head == "count" and num.isdigit():
        n = int(num)
        return [(f"t{i:06d}", (max(1, GROWTH_COUNT_MIB * MiB // 4 // n),)) for i in range(n)]
    if workload == "big":
        n = 16 if quick else 64
        shapes = [(2048, 2048), (4096, 1024), (1024, 4096), (4194304,)]  # 16 MiB each
        return [(f"layer{i:03d}.kernel", shapes[i % len(shapes)]) for i in range(n)]
    if workload == "small":
        n = 5000 if quick else 20000
        shapes = [(64,), (8, 8), (4, 16), (16, 4), (2, 4, 8)]
        return [(f"layer{i:05d}.param", shapes[i % len(shapes)]) for i in range(n)]
    if workload == "tiny":  # 16-256 bytes: 4-64 float32, sizes cycling
        n = 20000 if quick else 200000
        return [(f"p{i:06d}", (4 + (i * 7) % 61,)) for i in range(n)]
    raise ValueError(f"unknown workload {workload!r}")


def make_data(specs: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> list[np.ndarray]:
    """Seeded random float32 arrays, distinct bytes everywhere (written here, so already touched).

    One random block per distinct size, plus the tensor's index: different tensors never share
    bytes, and it is ~5x quicker than drawing 1 GiB of random numbers in every cell.
    """
    rng = np.random.default_rng(seed)
    blocks: dict[int, np.ndarray] = {}
    out = []
    for i, (_, shape) in enumerate(specs):
        n = math.prod(shape)
        if n not in blocks:
            blocks[n] = rng.random(n, dtype=np.float32)
        out.append(np.add(blocks[n], np.float32(i)).reshape(shape))
    return out


def st_header(specs: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The safetensors prefix (u64 length + space-padded JSON) for float32 tensors in name order."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in sorted(specs):
        end = offset + math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def digest(a: Any) -> str:
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)


# --- memory and cache helpers (Linux) ------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``5`` into clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def hwm_reset_works() -> bool:
    """Whether resetting VmHWM works here: grow RSS by 32 MiB, free it, reset, compare."""
    if not reset_hwm():
        return False
    block = np.ones(32 * MiB, np.uint8)
    del block
    before = proc_status()["VmHWM"]
    reset_hwm()
    after = proc_status()["VmHWM"]
    return after < before - 16 * 1024




def drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_bytes(folder: str) -> int:
    return sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())


def clear_folder(folder: str) -> None:
    for e in os.scandir(folder):
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path)
        else:
            os.unlink(e.path)


# --- systems --------------------------------------------------------------------------------------


class System(harness.System):
    """One way to save and restore the workload's tensors (``name``, ``note`` and ``requires``:
    see :class:`harness.System`).

    ``save``/``restore`` are the timed steps; everything else is set-up and checking.
    """

    allocates = False  #: restore builds new arrays (vs filling existing ones)
    phases: tuple[str, ...] = ("save", "restore")  #: the phases this system has cells for

    def __init__(self, specs: list[tuple[str, tuple[int, ...]]], data: list[np.ndarray]) -> None:
        self.specs = specs
        self.names = [n for n, _ in specs]
        self.expected = [digest(a) for a in data]

    def base(self, folder: str, i: int) -> str:
        return os.path.join(folder, f"model-{i}")

    def save(self, base: str) -> None:
        raise NotImplementedError

    def prepare_restore(self) -> None:
        """Untimed, before each restore: zero the destinations or drop the last result."""

    def restore(self, base: str) -> None:
        raise NotImplementedError

    def restored(self) -> list[Any]:
        """The restored arrays (host numpy) in spec order, for the check."""
        raise NotImplementedError

    def check(self) -> bool:
        got = self.restored()
        return len(got) == len(self.expected) and all(digest(a) == e for a, e in zip(got, self.expected))

    def sync(self) -> None:
        """Wait for asynchronous device work (GPU systems)."""


class Raw(System):
    name = 'raw'
    note = 'f.write per tensor + fsync / readinto existing buffers'

    def __init__(self, specs: list[tuple[str, tuple[int, ...]]], data: list[np.ndarray]) -> None:
        super().__init__(specs, data)
        self.arrays = data
        self.header = st_header(specs)

    def save(self, base: str) -> None:
        with open(base + ".safetensors", "wb") as f:
            f.write(self.header)
            for a in self.arrays:
                f.write(a.data)
            f.flush()
            os.fsync(f.fileno())

    def prepare_restore(self) -> None:
        for a in self.arrays:
            a.fill(0)

    def restore(self, base: str) -> None:
        with open(base + ".safetensors", "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n)
            for a in self.arrays:
                view = a.data.cast("B")
                if f.readinto(view) != a.nbytes:
                    raise OSError("short read")

    def restored(self) -> list[Any]:
        return self.arrays


class Raw2(Raw):
    """The fair raw limit for a Saver: the same bytes, files, fsyncs and renames as a durable
    save (data file, index, state file, each written to a temporary name, fsynced, renamed,
    the folder fsynced: 3 files, 6 fsyncs), and a restore that reads on 2 threads into the
    existing buffers and checksums each tensor (xxh3), as a gpuvars restore does."""
    name = 'raw2'
    note = 'the fair raw limit: the files and fsyncs of a Saver.save (data, index, state file: each to a temporary name, fsynced, renamed, the folder fsynced) / 2 threads readinto existing buffers + xxh3 of each tensor'

    @staticmethod
    def _durable(path: str, write: Callable[[Any], None]) -> None:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def save(self, base: str) -> None:
        def data(f: Any) -> None:
            f.write(self.header)
            for a in self.arrays:
                f.write(a.data)

        self._durable(base + ".safetensors", data)
        index = json.dumps({name: xxhash.xxh3_64_hexdigest(a.data.cast("B")) for (name, _), a in
                            zip(self.specs, self.arrays)}).encode()
        self._durable(base + ".index.json", lambda f: f.write(index))
        self._durable(os.path.join(os.path.dirname(base), "checkpoint"), lambda f: f.write(b'{"latest": "x"}'))

    def restore(self, base: str) -> None:
        import concurrent.futures

        (n,) = struct.unpack("<Q", open(base + ".safetensors", "rb").read(8))
        offsets, at = [], 8 + n
        for a in self.arrays:
            offsets.append(at)
            at += a.nbytes
        half = len(self.arrays) // 2 or 1

        def read(lo: int, hi: int) -> None:
            fd = os.open(base + ".safetensors", os.O_RDONLY)
            try:
                for a, off in zip(self.arrays[lo:hi], offsets[lo:hi]):
                    view = a.data.cast("B")
                    if os.preadv(fd, [view], off) != a.nbytes:
                        raise OSError("short read")
                    xxhash.xxh3_64_hexdigest(view)
            finally:
                os.close(fd)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(read, 0, half), pool.submit(read, half, len(self.arrays))]:
                f.result()


def fit_growth(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per (system, phase), least squares over the growth cells: time = fixed + per tensor x
    tensors + per GiB x GiB (how cost grows; a change in a slope is a regression in growth)."""
    out: dict[str, dict[str, float]] = {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if "median_s" in r and str(r["workload"]).startswith(("bytes-", "count-")):
            groups.setdefault((r["system"], r["phase"]), []).append(r)
    for (system, phase), rs in groups.items():
        if len(rs) < 3:
            continue
        a = np.array([[1.0, r["n_tensors"], r["data_bytes"] / GiB] for r in rs])
        t = np.array([r["median_s"] for r in rs])
        coef, *_ = np.linalg.lstsq(a, t, rcond=None)
        out[f"{system} {phase}"] = {"fixed_ms": float(coef[0] * 1e3), "per_tensor_us": float(coef[1] * 1e6),
                                    "per_gib_s": float(coef[2]), "cells": len(rs)}
    return out


class Gpuvars(System):
    name = 'gpuvars'
    note = 'Saver.save (own fsyncs) / Saver.restore into existing variables, checksummed'
    phases = PHASES
    device = "/cpu:0"

    def __init__(self, specs: list[tuple[str, tuple[int, ...]]], data: list[np.ndarray]) -> None:
        super().__init__(specs, data)
        import gpuvars as gv

        self.gv = gv
        self.registry = gv.Registry()
        self.registry.__enter__()
        self.vars = [gv.Variable(self.to_device(a), name=n, device=self.device) for (n, _), a in zip(specs, data)]
        self.zeros: dict[tuple[int, ...], Any] = {}

    def to_device(self, a: np.ndarray) -> Any:
        return a

    def saver(self) -> Any:
        return self.gv.Saver(self.vars)  # a fresh one per repeat: no retention work in the step

    def save(self, base: str) -> None:
        self._saver.save(base)

    def prepare_save(self) -> None:
        self._saver = self.saver()

    def prepare_restore(self) -> None:
        self._saver = self.saver()
        for v in self.vars:
            shape = tuple(v.shape or ())
            if shape not in self.zeros:
                self.zeros[shape] = self.to_device(np.zeros(shape, np.float32))
            v.assign(self.zeros[shape])
        self.sync()

    def restore(self, base: str) -> None:
        self._saver.restore(base)

    def restored(self) -> list[Any]:
        return [v.numpy() for v in self.vars]

    def load(self, base: str) -> None:
        """gv.load_checkpoint into a fresh registry (new variables, checksummed)."""
        with self.gv.Registry():
            self.loaded = self.gv.load_checkpoint(base)

    def verify(self, base: str) -> None:
        bad = self.gv.CheckpointReader(base).verify()
        if bad:
            raise RuntimeError(f"verify found damage: {bad[:5]}")


class Safetensors(System):
    name = 'safetensors'
    note = 'save_file + added fsync / load_file allocates'
    allocates = True

    def __init__(self, specs: list[tuple[str, tuple[int, ...]]], data: list[np.ndarray]) -> None:
        super().__init__(specs, data)
        import safetensors.numpy

        self.st = safetensors.numpy
        self.tensors = dict(zip(self.names, data))
        self.result: dict[str, Any] | None = None

    def save(self, base: str) -> None:
        self.st.save_file(self.tensors, base + ".safetensors")
        fsync_path(base + ".safetensors")

    def prepare_restore(self) -> None:
        self.result = None

    def restore(self, base: str) -> None:
        self.result = self.st.load_file(base + ".safetensors")

    def restored(self) -> list[Any]:
        assert self.result is not None
        return [self.result[n] for n in self.names]


class Numpy(System):
    name = 'numpy'
    note = 'np.savez + added fsync / np.load allocates, every array read'
    allocates = True

    def __init__(self, specs: list[tuple[str, tuple[int, ...]]], data: list[np.ndarray]) -> None:
        super().__init__(specs, data)
        self.tensors = dict(zip(self.names, data))
        self.result: dict[str, Any] | None = None

    def save(self, base: str) -> None:
        np.savez(base + ".npz", **self.tensors)  # type: ignore[arg-type]
        fsync_path(base + ".npz")

    def prepare_restore(self) -> None:
        self.result = None

    def restore(self, base: str) -> None:
        with np.load(base + ".npz") as z:
            self.result = {k: z[k] for k in z.files}

    def restored(self) -> list[Any]:
        assert self.result is not None
        return [self.result[n] for n in self.names]


class Torch(System):
    name = 'torch'
    note = 'torch.save + added fsync / torch.load(weights_only) allocates'
    requires = ('torch',)
    allocates = True

    def __init__(self, specs: list[tuple[str, tuple[int, ...]]], data: list[np.ndarray]) -> None:
        super().__init__(specs, data)
        import torch

        self.torch = torch
        self.tensors = {n: torch.from_numpy(a) for n, a in zip(self.names, data)}  # no copy
        self.result: dict[str, Any] | None = None

    def save(self, base: str) -> None:
        self.torch.save(self.tensors, base + ".pt")
        fsync_path(base + ".pt")

    def prepare_restore(self) -> None:
        self.result = None

    def restore(self, base: str) -> None:
        self.result = self.torch.load(base + ".pt", weights_only=True)

    def restored(self) -> list[Any]:
        assert self.result is not None
        return [self.result[n].numpy() for n in self.names]


# --- GPU systems (need CuPy or JAX with a CUDA device; never run on CPU-only machines) -------------


class BaseCupy(System):
    """cupy.asnumpy + write / readinto a reused host buffer + cupy.asarray (new device arrays)."""
    name = 'base-cupy'
    note = 'cupy.asnumpy + write + fsync / readinto host + cupy.asarray (new arrays)'
    requires = ('cupy',)

    allocates = True

    def __init__(self, specs: list[tuple[str, tuple[int, ...]]], data: list[np.ndarray]) -> None:
        super().__init__(specs, data)
        import cupy

        self.cp = cupy
        self.dev = cupy.cuda.Device(0)
        self.dev.use()
        self.arrays = [cupy.asarray(a) for a in data]
        self.header = st_header(specs)
        self.staging = np.empty(max(a.nbytes for a in data), np.uint8)
        self.staging.fill(0)
        self.result: list[Any] | None = None
        self.sync()

    def sync(self) -> None:
        self.dev.synchronize()

    def save(self, base: str) -> None:
        with open(base + ".safetensors", "wb") as f:
            f.write(self.header)
            for a in self.arrays:
                f.write(self.cp.asnumpy(a).data)
            f.flush()
            os.fsync(f.fileno())

    def prepare_restore(self) -> None:
        self.result = None
        self.cp.get_default_memory_pool().free_all_blocks()

    def restore(self, base: str) -> None:
        out = []
        with open(base + ".safetensors", "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n)
            for (_, shape), a in zip(self.specs, self.arrays):
                host = self.staging[: a.nbytes]
                if f.readinto(host.data) != a.nbytes:
                    raise OSError("short read")
                # cupy.asarray copies a pageable host array before returning: the buffer may be reused
                out.append(self.cp.asarray(host.view(np.float32).reshape(shape)))
        self.sync()
        self.result = out

    def restored(self) -> list[Any]:
        assert self.result is not None
        return [self.cp.asnumpy(a) for a in self.result]


class BaseJax(System):
    """np.asarray + write / readinto a reused host buffer + jax.device_put, blocked per tensor."""
    name = 'base-jax'
    note = 'np.asarray + write + fsync / readinto host + jax.device_put (new arrays)'
    requires = ('jax',)

    allocates = True

    def __init__(self, specs: list[tuple[str, tuple[int, ...]]], data: list[np.ndarray]) -> None:
        super().__init__(specs, data)
        import jax

        self.jax: Any = jax
        self.dev = jax.devices("gpu")[0]
        self.arrays = [jax.device_put(a, self.dev) for a in data]
        self.header = st_header(specs)
        self.staging = np.empty(max(a.nbytes for a in data), np.uint8)
        self.staging.fill(0)
        self.result: list[Any] | None = None
        self.sync()

    def sync(self) -> None:
        self.jax.block_until_ready(self.arrays)
        if self.result is not None:
            self.jax.block_until_ready(self.result)

    def save(self, base: str) -> None:
        with open(base + ".safetensors", "wb") as f:
            f.write(self.header)
            for a in self.arrays:
                f.write(np.ascontiguousarray(np.asarray(a)).data)
            f.flush()
            os.fsync(f.fileno())

    def prepare_restore(self) -> None:
        self.result = None

    def restore(self, base: str) -> None:
        out = []
        with open(base + ".safetensors", "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n)
            for (_, shape), a in zip(self.specs, self.arrays):
                nbytes = math.prod(shape) * 4
                host = self.staging[:nbytes]
                if f.readinto(host.data) != nbytes:
                    raise OSError("short read")
                # the transfer may be asynchronous: finish it before the buffer is refilled
                out.append(self.jax.device_put(host.view(np.float32).reshape(shape), self.dev).block_until_ready())
        self.result = out

    def restored(self) -> list[Any]:
        assert self.result is not None
        return [np.asarray(a) for a in self.result]


class JaxCpuPut(System):
    """The JAX CPU floor: each tensor read into a new host array, then ``jax.device_put`` of
    each onto the CPU device (what any JAX loader must at least do)."""
    name = 'jaxcpu-put'
    note = 'JAX CPU floor: readinto a new host array per tensor + jax.device_put of each (new arrays)'
    requires = ('jax',)
    phases = ("restore",)  # its save would be raw's

    allocates = True

    def __init__(self, specs: list[tuple[str, tuple[int, ...]]], data: list[np.ndarray]) -> None:
        super().__init__(specs, data)
        import jax

        self.jax: Any = jax
        self.dev = jax.devices("cpu")[0]
        self.arrays = data
        self.header = st_header(specs)
        self.result: list[Any] | None = None

    def save(self, base: str) -> None:
        Raw.save(self, base)  # type: ignore[arg-type]

    def prepare_restore(self) -> None:
        self.result = None

    def restore(self, base: str) -> None:
        hosts = []
        with open(base + ".safetensors", "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n)
            for _, shape in self.specs:
                host = np.empty(shape, np.float32)
                if f.readinto(host.data.cast("B")) != host.nbytes:
                    raise OSError("short read")
                hosts.append(host)
        out = [self.jax.device_put(h, self.dev) for h in hosts]
        self.jax.block_until_ready(out)
        self.result = out

    def restored(self) -> list[Any]:
        assert self.result is not None
        return [np.asarray(a) for a in self.result]


class GpuvarsSharded(Gpuvars):
    """gpuvars with the data file cut into shards (``SaveOptions(max_shard_size=...)``)."""
    name = 'gpuvars-sharded'
    note = 'as gpuvars, SaveOptions(max_shard_size=--max-shard-size): shards written in parallel'

    max_shard_size = "256MiB"  # set from the cell

    def saver(self) -> Any:
        return self.gv.Saver(self.vars, options=self.gv.SaveOptions(max_shard_size=self.max_shard_size))


class GpuvarsJaxCpu(Gpuvars):
    """gpuvars variables on /cpu:0 served by JAX's CPU backend."""
    name = 'gpuvars-jaxcpu'
    note = "Saver.save / Saver.restore into JAX CPU variables (set_cpu_backend('jax'))"
    requires = ('jax',)
    phases = ("save", "restore")

    def __init__(self, specs: list[tuple[str, tuple[int, ...]]], data: list[np.ndarray]) -> None:
        import gpuvars as gv

        gv.config.set_cpu_backend("jax")
        super().__init__(specs, data)

    def restore(self, base: str) -> None:
        self._saver.restore(base)
        import jax

        jax.block_until_ready([v.value() for v in self.vars])


class GpuvarsCupy(Gpuvars):
    name = 'gpuvars-cupy'
    note = 'Saver.save / Saver.restore into existing CuPy variables on /gpu:0'
    requires = ('cupy',)
    phases = ("save", "restore")
    device = "/gpu:0"
    library = "cupy"

    def __init__(self, specs: list[tuple[str, tuple[int, ...]]], data: list[np.ndarray]) -> None:
        import gpuvars as gv

        gv.config.set_gpu_backend(self.library)
        gv.config.set_soft_device_placement(False)  # never fall back to the CPU silently
        self._init_lib()
        super().__init__(specs, data)
        self.sync()

    def _init_lib(self) -> None:
        import cupy

        self.cp = cupy

    def to_device(self, a: np.ndarray) -> Any:
        return self.cp.asarray(a)

    def sync(self) -> None:
        self.cp.cuda.Device(0).synchronize()

    def restore(self, base: str) -> None:
        self._saver.restore(base)
        self.sync()

    def restored(self) -> list[Any]:
        return [v.numpy() for v in self.vars]


class GpuvarsJax(GpuvarsCupy):
    name = 'gpuvars-jax'
    note = 'Saver.save / Saver.restore into JAX variables on /gpu:0 (rebound)'
    requires = ('jax',)
    library = "jax"

    def _init_lib(self) -> None:
        import jax

        self.jax: Any = jax
        self.dev = jax.devices("gpu")[0]

    def to_device(self, a: np.ndarray) -> Any:
        return self.jax.device_put(a, self.dev)

    def sync(self) -> None:
        if hasattr(self, "vars"):
            self.jax.block_until_ready([v.value() for v in self.vars])


SYSTEM_CLASSES: dict[str, type[System]] = {cls.name: cls for cls in (
    Raw, Raw2, Gpuvars, Safetensors, Numpy, Torch, BaseCupy, GpuvarsCupy, BaseJax, GpuvarsJax, JaxCpuPut,
    GpuvarsJaxCpu, GpuvarsSharded)}


# --- one cell (runs in a child process) ---------------------------------------------------------------


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    system, workload, phase = cell["system"], cell["workload"], cell["phase"]
    SYSTEM_CLASSES[system].require()
    repeats, cold, profile = cell["repeats"], cell["cold"], cell["profile"]
    folder = os.path.join(cell["dir"], f"cell-{os.getpid()}")
    os.makedirs(folder)
    try:
        hwm_ok = hwm_reset_works()
        specs = workload_specs(workload, cell["quick"])
        data = make_data(specs)
        data_bytes = sum(a.nbytes for a in data)
        sysobj = SYSTEM_CLASSES[system](specs, data)
        if isinstance(sysobj, GpuvarsSharded):
            sysobj.max_shard_size = cell.get("max_shard_size") or GpuvarsSharded.max_shard_size
        del data  # the system holds what it needs (gpuvars and GPU systems hold their own copies)
        gc.collect()
        warmup = cell.get("warmup", harness.WARMUP_STEPS)
        rss_kib: list[int] = []  # peak extra RSS of every step, warm-ups first
        state: dict[str, Any] = {"i": 0, "base": sysobj.base(folder, 0), "file_bytes": 0, "ok": True}
        if phase != "save":
            if isinstance(sysobj, Gpuvars):
                sysobj.prepare_save()
            sysobj.save(state["base"])  # untimed: the checkpoint every step restores
            state["file_bytes"] = folder_bytes(folder)

        def step() -> None:
            if phase == "save":
                sysobj.save(state["base"])
            elif phase == "verify":
                assert isinstance(sysobj, Gpuvars)
                sysobj.verify(state["base"])
            elif phase == "load":
                assert isinstance(sysobj, Gpuvars)
                sysobj.load(state["base"])
            else:
                sysobj.restore(state["base"])

        def before() -> None:
            """Untimed: a fresh file name or zeroed destinations, the page cache dropped (--cold),
            the free pages this step will take warmed, VmHWM reset."""
            if phase == "save":
                state["base"] = sysobj.base(folder, state["i"])
                if isinstance(sysobj, Gpuvars):
                    sysobj.prepare_save()
            elif phase == "restore":
                sysobj.prepare_restore()
            if cold and phase != "save":
                drop_page_cache()
            warm_free_pages(data_bytes + WARM_MARGIN, folder if phase == "save" else None)
            gc.collect()
            reset_hwm()
            state["rss0"] = proc_status()["VmRSS"]

        def after() -> None:
            """Untimed: the step's peak extra RSS, then the check (restore) or the files removed (save)."""
            rss_kib.append(proc_status()["VmHWM"] - state["rss0"] if hwm_ok else -1)
            state["i"] += 1
            if phase == "save":
                state["file_bytes"] = folder_bytes(folder)
                clear_folder(folder)
            elif phase == "restore":
                state["ok"] = state["ok"] and sysobj.check()

        # the harness's rule: warm-up steps (untimed: imports, lazy set-up, first-use effects of the
        # kernel), then the timed ones. Extra RSS is kept for warm-ups too: a first call can grow
        # the heap more than a later one that reuses it.
        times = harness.time_steps(step, repeats, warmup=warmup, before=before, after=after)
        if profile:  # one more step, untimed, under cProfile (printed to stderr)
            before()
            _profile(step)
            after()
            rss_kib.pop()
        warm_rss, extra_kib = rss_kib[:warmup], rss_kib[warmup:]
        file_bytes, ok = state["file_bytes"], state["ok"]
        clear_folder(folder)
        return {
            "system": system, "workload": workload, "phase": phase, "ok": ok,
            "n_tensors": len(specs), "data_bytes": data_bytes, "file_bytes": file_bytes,
            "times_s": times, "extra_rss_kib": extra_kib, "warmup_extra_rss_kib": warm_rss, "hwm_reset": hwm_ok,
            "cache": "cold" if cold else "warm",
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _profile(step: Callable[[], None]) -> None:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    step()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(18)
    print(out.getvalue(), file=sys.stderr)


def probe_gpu() -> dict[str, str]:
    """{"cupy": "" or why not, "jax": ...}: whether each library can use /gpu:0 (child process)."""
    import gpuvars_backends as backends

    out = {}
    for lib in ("cupy", "jax"):
        p = backends.probe(lib, "gpu")
        out[lib] = "" if p.usable else p.reason
    return out


# --- the driver -------------------------------------------------------------------------------------


def machine_info(folder: str) -> dict[str, Any]:
    """The shared machine record (``harness.machine_record``), with the package versions this
    program's table names flat, and where gpuvars is imported from."""
    info: dict[str, Any] = dict(harness.machine_record(folder))
    packages = info.get("packages") or {}
    for pkg in ("numpy", "safetensors", "xxhash", "torch"):
        info[pkg] = packages.get(pkg)
    info["gpuvars"] = version("gpuvars")
    import gpuvars  # cheap: imports neither cupy nor jax

    info["gpuvars_path"] = os.path.dirname(os.path.abspath(gpuvars.__file__))
    return info


def machine_line(m: dict[str, Any]) -> str:
    """The shared one-line machine record, plus which gpuvars this run imported."""
    return harness.machine_line(m) + f"; gpuvars {m['gpuvars']} from {m.get('gpuvars_path')}"


def spawn(cell: dict[str, Any]) -> dict[str, Any]:
    """One cell in a fresh process (``harness.spawn``, glibc's mmap threshold pinned: see the
    module docstring); a ``--profile`` cell's profile (its stderr) is printed here."""
    result = harness.spawn(__file__, cell, timeout=900, env=harness.child_env())
    if cell.get("profile") and result.get("stderr", "").strip():
        print(f"--- profile: {cell['system']} {cell['workload']} {cell['phase']} ---\n{result['stderr']}", file=sys.stderr)
    result.pop("stderr", None)
    return result


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    if "error" in r:
        return r
    rss = [x for x in r["extra_rss_kib"] + r.get("warmup_extra_rss_kib", []) if x >= 0]
    t = harness.summary(r["times_s"])
    r["median_s"], r["min_s"], r["max_s"] = t["median"], t["min"], t["max"]
    r["gib_s"] = r["data_bytes"] / GiB / r["median_s"] if r["median_s"] > 0 else float("inf")
    r["extra_rss_mib"] = max(rss) / 1024 if rss else None  # the worst repeat
    return r


def fmt_table(rows: list[dict[str, Any]]) -> list[str]:
    by = {(r["system"], r["workload"], r["phase"]): r for r in rows}
    out = ["| workload | phase | system | median s | GiB/s | us/tensor | x base | peak extra RSS MiB | file MiB "
           "| min-max s |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['workload']} | {r['phase']} | {r['system']} | error: {r['error'][:160]} | | | | | | |")
            continue
        if r["phase"] == "verify":  # compared with gpuvars' own warm restore, the design's yardstick
            base = by.get(("gpuvars", r["workload"], "restore"))
            ratio = f"{r['median_s'] / base['median_s']:.2f} of restore" if base and "median_s" in base else "-"
            name = "gpuvars verify()"
        elif r["phase"] == "load":  # new variables from the file, like safetensors' load_file
            base = by.get(("safetensors", r["workload"], "restore"))
            ratio = f"{r['median_s'] / base['median_s']:.2f} of st load" if base and "median_s" in base else "-"
            name = "gv.load_checkpoint"
        else:
            base = by.get((BASELINE[r["system"]], r["workload"], r["phase"]))
            ratio = f"{r['median_s'] / base['median_s']:.2f}" if base and "median_s" in base else "-"
            name = r["system"]
        rss = f"{r['extra_rss_mib']:.1f}" if r["extra_rss_mib"] is not None else "n/a"
        bad = "" if r["ok"] else " (WRONG DATA)"
        wl = f"{r['workload']} ({r['n_tensors']} x {r['data_bytes'] // r['n_tensors']} B)"
        out.append(f"| {wl} | {r['phase']} | {name}{bad} | {r['median_s']:.3f} | {r['gib_s']:.3f} | "
                   f"{r['median_s'] / r['n_tensors'] * 1e6:.1f} | {ratio} | {rss} | {r['file_bytes'] / MiB:.1f} | "
                   f"{r['min_s']:.3f}-{r['max_s']:.3f} |")
    return out


def goals(rows: list[dict[str, Any]], cache: str = "warm") -> list[dict[str, Any]]:
    by = {(r["system"], r["workload"], r["phase"]): r for r in rows if "median_s" in r}

    def ratio(a: tuple[str, str, str], b: tuple[str, str, str]) -> float | None:
        return by[a]["median_s"] / by[b]["median_s"] if a in by and b in by else None

    out = []

    def add(name: str, value: float | None, limit: float | None, unit: str) -> None:
        out.append(harness.goal(name, value, limit, unit))

    add("big save: gpuvars / raw write+fsync", ratio(("gpuvars", "big", "save"), ("raw", "big", "save")), GOAL_SAVE, "x")
    add("big save: gpuvars / fair raw (the same 3 files, 6 fsyncs)",
        ratio(("gpuvars", "big", "save"), ("raw2", "big", "save")), 1.2, "x")
    add("big restore: gpuvars / fair raw (2 threads, checksums)",
        ratio(("gpuvars", "big", "restore"), ("raw2", "big", "restore")), 1.1, "x")
    add("big restore: gpuvars / raw readinto", ratio(("gpuvars", "big", "restore"), ("raw", "big", "restore")), GOAL_RESTORE, "x")
    for phase in ("save", "restore"):
        r = by.get(("gpuvars", "big", phase))
        add(f"big {phase}: gpuvars peak extra RSS", r["extra_rss_mib"] if r else None, GOAL_RSS_MIB, "MiB")
    add("small save: gpuvars / np.savez", ratio(("gpuvars", "small", "save"), ("numpy", "small", "save")), 1.0, "x")
    add("small restore: gpuvars / np.load", ratio(("gpuvars", "small", "restore"), ("numpy", "small", "restore")), 1.0, "x")
    for wl in ("small", "tiny"):  # issue 12: the per-tensor costs at safetensors' level
        for phase in ("save", "restore"):
            add(f"{wl} {phase}: gpuvars / safetensors.numpy",
                ratio(("gpuvars", wl, phase), ("safetensors", wl, phase)), 1.0, "x")
    add("tiny load: gv.load_checkpoint / safetensors load_file",
        ratio(("gpuvars", "tiny", "load"), ("safetensors", "tiny", "restore")), 1.5, "x")
    add("big restore: gpuvars-jaxcpu / gpuvars (numpy)",
        ratio(("gpuvars-jaxcpu", "big", "restore"), ("gpuvars", "big", "restore")), 1.5, "x")
    add("small restore: gpuvars-jaxcpu / jaxcpu-put floor",
        ratio(("gpuvars-jaxcpu", "small", "restore"), ("jaxcpu-put", "small", "restore")), 1.2, "x")
    for wl in ("big", "small"):
        add(f"{wl} verify / gpuvars {cache} restore", ratio(("gpuvars", wl, "verify"), ("gpuvars", wl, "restore")),
            GOAL_VERIFY, "x")
    for gsys in ("gpuvars-cupy", "gpuvars-jax"):
        base = BASELINE[gsys]
        for phase in ("save", "restore"):
            v = ratio((gsys, "big", phase), (base, "big", phase))
            if v is not None:
                add(f"big {phase}: {gsys} / {base} (reported)", v, None, "x")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="rounds: timed repeats of every cell, each in a fresh process (median quoted; default 3)")
    ap.add_argument("--quick", action="store_true", help="1 round, big = 16 x 16 MiB, small = 5,000 tensors (goals then not at 1 GiB)")
    ap.add_argument("--dir", default="/tmp/gpuvars-bench", help="folder for the files (same for all systems)")
    ap.add_argument("--json", metavar="PATH", help="write every cell, the machine and the goals here")
    ap.add_argument("--systems", default=",".join(CPU_SYSTEMS), help=f"comma list of {CPU_SYSTEMS}")
    ap.add_argument("--workloads", default="big,small", help="comma list of big, small, tiny, bytes-<MiB>, count-<N>")
    ap.add_argument("--growth", action="store_true",
                    help="the growth sweeps instead of --workloads: total bytes (64 MiB .. 4 GiB; quick 16-256 MiB) and "
                         f"tensor counts (1k .. 100k at {GROWTH_COUNT_MIB} MiB), with the fitted per-tensor and per-GiB cost")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma list of save, restore, verify")
    ap.add_argument("--warmup", type=int, default=harness.WARMUP_STEPS,
                    help=f"untimed steps before the timed one in every cell (default {harness.WARMUP_STEPS})")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each restore (root)")
    ap.add_argument("--gpu", action="store_true", help=f"also run {GPU_SYSTEMS} where CuPy/JAX see /gpu:0")
    ap.add_argument("--max-shard-size", metavar="SIZE",
                    help="also run gpuvars-sharded: saves with SaveOptions(max_shard_size=SIZE), e.g. 256MiB")
    ap.add_argument("--profile", action="store_true", help="cProfile one extra (untimed) gpuvars repeat per cell")
    argv = list(sys.argv[1:] if argv is None else argv)
    if harness.cell_main(run_cell, argv):
        return 0
    if argv == ["--probe-gpu"]:  # the child of the --gpu probe
        harness.emit(probe_gpu())
        return 0
    args = ap.parse_args(argv)

    repeats = 1 if args.quick else args.repeats
    if repeats < 1:
        ap.error("--repeats must be >= 1")
    systems = [s for s in args.systems.split(",") if s]
    workloads = growth_workloads(args.quick) if args.growth else [w for w in args.workloads.split(",") if w]
    phases = [p for p in args.phases.split(",") if p]
    if args.max_shard_size and "gpuvars-sharded" not in systems:
        systems.append("gpuvars-sharded")
    for name, vals, known in (("system", systems, CPU_SYSTEMS + GPU_SYSTEMS + OPT_SYSTEMS), ("workload", workloads, WORKLOADS),
                              ("phase", phases, PHASES)):
        for v in vals:
            if v not in known and not (name == "workload" and is_workload(v)):
                ap.error(f"unknown {name} {v!r}; known: {', '.join(known)}")
    if args.cold:
        try:
            with open("/proc/sys/vm/drop_caches", "w"):
                pass
        except OSError as exc:
            ap.error(f"--cold needs to write /proc/sys/vm/drop_caches (root): {exc}")
    os.makedirs(args.dir, exist_ok=True)

    skipped: list[str] = []
    _, why_not = harness.available(SYSTEM_CLASSES[s] for s in systems)
    for name, why in why_not.items():
        systems.remove(name)
        skipped.append(f"{name}: {why}")
    if args.gpu:
        probe = harness.spawn(__file__, {}, timeout=300, args=["--probe-gpu"])
        usable = {lib: probe.get(lib, f"probe failed: {probe.get('error')}") for lib in ("cupy", "jax")}
        for lib in ("cupy", "jax"):
            if usable[lib]:
                skipped.append(f"GPU cells for {lib} SKIPPED: {usable[lib]}")
            else:
                systems += [s for s in (f"base-{lib}", f"gpuvars-{lib}") if s not in systems]
    else:
        skipped.append("GPU cells not requested (--gpu)")

    machine = machine_info(args.dir)
    print(f"Machine: {machine_line(machine)}")
    print(f"Command: {' '.join([os.path.basename(sys.executable), 'bench/bench_checkpoint.py'] + (argv if argv is not None else sys.argv[1:]))}")
    for s in skipped:
        print(f"Note: {s}")
    if os.getloadavg()[0] > 0.5:
        print(f"Note: load average {os.getloadavg()[0]:.2f} before the run: other processes share the CPUs "
              "and the disk, expect noisy numbers")

    # Rounds: every cell once per round, each in a fresh process with one timed step; the order
    # of the systems rotates from round to round so slow drift (other load, the disk) spreads
    # over all of them. The table quotes the median over rounds.
    order = [(wl, phase) for wl in workloads for phase in phases]
    merged: dict[tuple[str, str, str], dict[str, Any]] = {}
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    for rnd in range(repeats):
        for wl, phase in order:
            for system in harness.rotated(systems, rnd):
                if phase not in SYSTEM_CLASSES[system].phases:
                    continue
                cell = {"system": system, "workload": wl, "phase": phase, "repeats": 1, "quick": args.quick,
                        "warmup": args.warmup, "max_shard_size": args.max_shard_size,
                        "dir": args.dir, "cold": args.cold,
                        "profile": args.profile and rnd == 0 and system.startswith("gpuvars")}
                t0 = time.perf_counter()
                r = spawn(cell)
                if "skip" in r:  # the system's cell raised Skip (a GPU library without a GPU, say)
                    skipped.append(f"{system} {wl} {phase}: {r['skip']}")
                    print(f"  round {rnd + 1}/{repeats} {wl:5} {phase:7} {system:12} skipped: {r['skip']}",
                          file=sys.stderr, flush=True)
                    continue
                key = (system, wl, phase)
                if key not in merged or "error" in r:
                    merged[key] = r  # the first round's result, or an error (which then stays)
                elif "error" not in merged[key]:
                    m = merged[key]
                    m["times_s"] += r["times_s"]
                    m["extra_rss_kib"] += r["extra_rss_kib"]
                    m["warmup_extra_rss_kib"] += r["warmup_extra_rss_kib"]
                    m["ok"] = m["ok"] and r["ok"]
                msg = r.get("error") or (f"{r['times_s'][0]:.3f} s, extra RSS "
                                         f"{max(r['extra_rss_kib'] + r['warmup_extra_rss_kib']) / 1024:.1f} MiB")
                print(f"  round {rnd + 1}/{repeats} [{time.perf_counter() - t0:5.1f} s] {wl:5} {phase:7} "
                      f"{system:12} {msg}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    rows = [summarize(merged[(s_, wl, ph)]) for wl, ph in order for s_ in systems if (s_, wl, ph) in merged]

    print()
    for line in fmt_table(rows):
        print(line)
    print()
    cache = "cold (page cache dropped before each restore)" if args.cold else "warm (file pages cached)"
    print(f"Medians over {repeats} round(s), every cell in a fresh process each round; restores {cache}. 'x base' = time / "
          "the same workload and phase's raw (GPU: base-*) time. GiB/s counts tensor bytes. Peak extra RSS = "
          "VmHWM during the step - VmRSS before it (worst of the timed and warm-up steps). Each cell runs "
          f"{args.warmup} untimed warm-up step(s) before the timed one. safetensors, np.savez and torch.save get an "
          "added fsync of the file in the timed step (their APIs do not fsync); gpuvars does its own (data, "
          "index, state file, folder). raw and gpuvars restore into existing buffers; safetensors, numpy, "
          "torch allocate their results.")
    goal_rows = goals(rows, "cold" if args.cold else "warm")
    fits = fit_growth(rows)
    if fits:
        print()
        for key, f in sorted(fits.items()):
            print(f"fit   {key:24s} {f['fixed_ms']:8.2f} ms + {f['per_tensor_us']:7.2f} us/tensor + "
                  f"{f['per_gib_s']:6.3f} s/GiB  ({f['cells']} cells)")
        for system in ("gpuvars", "safetensors"):
            for phase in ("save", "restore"):
                g, b = fits.get(f"{system} {phase}"), fits.get(f"raw2 {phase}")
                if g and b and system == "gpuvars":
                    goal_rows.append(harness.goal(f"growth {phase}: gpuvars cost per tensor (fitted)",
                                                  g["per_tensor_us"], None, "us"))
                    goal_rows.append(harness.goal(f"growth {phase}: gpuvars cost per GiB / fair raw's (fitted)",
                                                  g["per_gib_s"] / b["per_gib_s"] if b["per_gib_s"] > 0 else None,
                                                  None, "x"))
    unmeasured = [g["goal"] for g in goal_rows if g["measured"] is None]
    goal_rows = [g for g in goal_rows if g["measured"] is not None]  # the workloads and systems of this run
    print()
    for g in goal_rows:
        limit = f"{g['limit']}{g['unit']}" if g["limit"] is not None else "-"
        verdict = "-" if g["met"] is None else ("met" if g["met"] else "MISSED")
        print(f"goal  {g['goal']}: {g['measured']:.3f}{g['unit']} (limit {limit}) {verdict}")
    print(f"\nTotal {time.perf_counter() - t_start:.0f} s; load average (1 min) {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after")
    if args.json:
        harness.write_json(args.json, program="bench_checkpoint", machine=machine, cells=rows, goals=goal_rows,
                           fits=fits, args=vars(args), repeats=repeats, skipped=skipped,
                           systems={s: SYSTEM_CLASSES[s].note for s in systems}, unmeasured_goals=unmeasured,
                           loadavg_before=load_before, loadavg_after=load_after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
