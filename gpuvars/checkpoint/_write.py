"""Writing a checkpoint: the data file (or its shards, in parallel), the replica files and
the device map, then the index, whose atomic rename is the commit; and deleting one, index first.

Everything is validated before the first byte is written (STYLE 10). Saving over an
existing prefix first retires its index (DESIGN decision 15). A failure of the file
system (no space, a file too large, no permission, a folder that is a file) is a
:class:`~gpuvars.errors.CheckpointWriteError`, a CheckpointError and an OSError with the
errno kept, naming the prefix and the checkpoint file being written (never only a hidden
temporary name); what the save had written is removed and nothing of it is visible.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import threading
import time
from typing import Any, Callable, Generator, Mapping, Sequence, TypeVar

import numpy as np

from gpuvars._snapshot import Pin, Snapshot
from gpuvars.checkpoint import _atomic, _format, _parallel, _progress, _transfer
from gpuvars.checkpoint import _stformat as st
from gpuvars.checkpoint._saveable import Saveable
from gpuvars.checkpoint.policy import VariablePolicy
from gpuvars.errors import CheckpointError, CheckpointWriteError, UninitializedVariableError
from gpuvars.variable import Variable, pin

__all__ = ["SavePlan", "delete_checkpoint", "prepare_save", "shard_entries", "write_checkpoint", "write_error",
           "write_in_parallel"]

T = TypeVar("T")


def write_error(prefix: str, doing: str, exc: OSError, after_commit: str | None = None) -> CheckpointWriteError:
    """The CheckpointWriteError for ``exc``, raised while ``doing`` a step of saving ``prefix``.

    ``after_commit``: the step came after the commit, and this says what that leaves.
    """
    reason = exc.strerror or str(exc) or type(exc).__name__
    if after_commit is None:
        msg = (f"cannot save checkpoint {prefix!r}: {doing} failed: {reason}; nothing of this save was "
               "committed (checkpoints at other prefixes are untouched)")
    else:
        msg = f"checkpoint {prefix!r} was committed, but {doing} failed: {reason}; {after_commit}"
    return CheckpointWriteError(exc.errno, msg) if exc.errno is not None else CheckpointWriteError(msg)


class SavePlan:
    """One save from its call to its commit: the tensors, pinned at the call (G1), and how
    far the writing is (:attr:`written` of :attr:`total` bytes).

    Made by :func:`prepare_save` (everything validated, nothing written); run once by
    :func:`write_checkpoint`, in the caller's thread or a background one.
    """

    def __init__(self, prefix: str, policy: VariablePolicy, step: int | None, snapshot: Snapshot,
                 max_shard_size: int | None = None) -> None:
        self.prefix, self.policy, self.step, self.snapshot = prefix, policy, step, snapshot
        self.max_shard_size = max_shard_size  #: None: one data file; else shards of at most this many tensor bytes
        self.entries: list[tuple[str, np.dtype[Any], tuple[int, ...]]] = []
        self.meta: dict[str, tuple[str, bool]] = {}  # key -> (kind, trainable)
        self.parts: dict[str, list[Any]] = {}  # key -> [(pin, variable) or an array], along axis 0
        self.replicas: list[dict[str, tuple[Pin, Variable]]] = []  # replica k -> {key: its component}
        self.devices: bytes | None = None
        self.total = 0
        self.written = 0
        self._count = threading.Lock()

    def advance(self, nbytes: int) -> None:
        with self._count:
            self.written += nbytes


def prepare_save(
    prefix: str,
    saveables: Mapping[str, Saveable],
    policy: VariablePolicy,
    step: int | None,
    copy_on_write_bytes: int | None,
    max_shard_size: int | None = None,
) -> SavePlan:
    """Validate a save of ``saveables`` and pin every variable's storage: from now on the
    checkpoint holds the values of this moment, whatever other threads do. Moves no data
    (a sync-on-read variable's reduced value is computed here).

    Raises:
        UninitializedVariableError: a variable has no value.
        InvalidArgumentError: a dtype safetensors cannot hold.
    """
    with _parallel.gc_paused():
        return _prepare(prefix, saveables, policy, step, copy_on_write_bytes, max_shard_size)


def _prepare(
    prefix: str,
    saveables: Mapping[str, Saveable],
    policy: VariablePolicy,
    step: int | None,
    copy_on_write_bytes: int | None,
    max_shard_size: int | None,
) -> SavePlan:
    plan = SavePlan(prefix, policy, step, Snapshot(copy_on_write_bytes), max_shard_size)
    pins: dict[int, tuple[Pin, Variable]] = {}

    def pinned(var: Variable, key: str, name: str) -> tuple[Pin, Variable]:
        got = pins.get(id(var))
        if got is not None:
            got[0].add_use()
            return got
        p = pin(var, plan.snapshot)
        if p is None:
            raise _uninitialized(name, key)
        pins[id(var)] = got = (p, var)
        return got

    entries, meta, plan_parts = plan.entries, plan.meta, plan.parts
    st_names: dict[Any, str] = {}  # dtype -> its safetensors name, checked once per dtype
    total = 0
    try:
        for key, sv in saveables.items():
            if not sv.initialized:
                raise _uninitialized(sv.name, key)
            parts = sv.parts(key)
            if len(parts) == 1 and isinstance(parts[0], Variable):  # the common case: one variable
                got = pinned(parts[0], key, sv.name)
                parts = [got]
                storage = got[0].storage
                dtype = storage.dtype
                shape = storage.shape
                if type(shape) is not tuple:
                    shape = tuple(int(d) for d in shape)
                nbytes = got[0].nbytes
            else:
                parts = [pinned(x, key, sv.name) if isinstance(x, Variable) else x for x in parts]
                arrays = [x[0] if isinstance(x, tuple) else x for x in parts]
                first = arrays[0]
                dtype = first.dtype
                shape = tuple(int(d) for d in first.shape)
                if len(arrays) > 1:  # shards along axis 0
                    shape = (sum(int(a.shape[0]) for a in arrays),) + shape[1:]
                nbytes = -1
            if type(dtype) is not np.dtype:
                dtype = np.dtype(dtype)
            if dtype not in st_names:
                st_names[dtype] = st.st_dtype(dtype, key=key)  # a dtype safetensors cannot hold fails before any write
            entries.append((key, dtype, shape))
            meta[key] = (sv.kind, sv.trainable)
            plan_parts[key] = parts
            total += nbytes if nbytes >= 0 else math.prod(shape) * dtype.itemsize
        plan.total += total
        if policy is VariablePolicy.EXPAND_DISTRIBUTED_VARIABLES:
            for key, sv in saveables.items():
                for k, comp in enumerate(sv.components()):
                    while len(plan.replicas) <= k:
                        plan.replicas.append({})
                    got = plan.replicas[k][key] = pinned(comp, key, sv.name)
                    plan.total += got[0].nbytes
        if policy.saves_devices():
            plan.devices = _format.build_devices({key: sv.device_record() for key, sv in saveables.items()})
    except BaseException:
        plan.snapshot.release()
        raise
    return plan


def _uninitialized(name: str, key: str) -> UninitializedVariableError:
    return UninitializedVariableError(
        f"cannot save variable '{name}' (key {key!r}): it is not initialized; nothing was written"
    )


def write_checkpoint(plan: SavePlan, progress: bool | None = None) -> None:
    """Write and commit the checkpoint ``plan.prefix`` (index last), then release the
    snapshot (also on failure: waiting mutations go on).

    Raises:
        CheckpointWriteError: the file system failed; nothing of this save is visible.
    """
    try:
        with _parallel.gc_paused():
            _write(plan, progress)
    finally:
        plan.snapshot.release()


def _write(plan: SavePlan, progress: bool | None) -> None:
    prefix = plan.prefix
    folder, base = os.path.split(prefix)
    doing = f"creating the folder {folder!r}"
    written: list[str] = []
    try:
        if folder:
            if os.path.lexists(folder) and not os.path.isdir(folder):
                doing += " (a file of that name is in the way)"
            os.makedirs(folder, exist_ok=True)
        doing = f"removing stale temporary files in {folder or '.'!r}"
        _atomic.remove_stale_temps(folder)
        index_name = _format.index_file(base)
        index_path = os.path.join(folder, index_name)
        old_files: list[str] = []
        if os.path.lexists(index_path):  # retire the old checkpoint of this prefix first (decision 15)
            try:  # its files this save does not overwrite (other shard or replica counts) go after the commit
                old_files = list(_format.read_index(prefix).files)
            except CheckpointError:
                pass
            doing = f"retiring the old {index_name}"
            os.unlink(index_path)
            _atomic.fsync_dir(folder)

        meter = _progress.bar(plan.total, f"saving {base}", progress)
        weight_map: dict[str, str] | None = None
        files: dict[str, dict[str, Any]] = {}
        if plan.max_shard_size is None:
            version = 1
            data_name = _format.data_file(base)
            doing = f"writing {data_name}"
            record = _write_file(
                os.path.join(folder, data_name), plan.entries,
                {"format": _format.FORMAT, "version": str(version)}, plan.parts, plan, meter,
            )
            written.append(record.file)
            files[record.file] = _format.file_record("data", record.size, record.header_checksum)
            checksums = record.tensors
        else:
            version = _format.SHARDED_VERSION
            doing = "writing the data shards"
            try:
                shard_records = _write_shards(plan, folder, base, written, meter)
            finally:
                meter.close()
            weight_map, checksums = {}, {}
            for rec in shard_records:
                files[rec.file] = _format.file_record("data", rec.size, rec.header_checksum)
                checksums.update(rec.tensors)
                weight_map.update(dict.fromkeys(rec.tensors, rec.file))
            weight_map = {key: weight_map[key] for key, _, _ in plan.entries}
        components: dict[str, list[dict[str, Any]]] = {}
        if plan.replicas:
            doing = "writing the replica files"
            for rec, parts in _write_replica_files(plan, folder, base, written, version):
                files[rec.file] = _format.file_record("replica", rec.size, rec.header_checksum)
                for key, checksum in rec.tensors.items():
                    components.setdefault(key, []).append(
                        _format.component_record(rec.file, parts[key], checksum)
                    )
        plan.snapshot.release()  # every byte is in a file: no mutation waits on this save any more
        if plan.devices is not None:
            name = _format.devices_file(base)
            doing = f"writing {name}"
            _atomic.write_bytes(os.path.join(folder, name), plan.devices, sync_dir=False)
            written.append(name)
            files[name] = _format.file_record("devices", len(plan.devices), st.checksum(plan.devices))
            _atomic.fsync_dir(folder)  # every renamed file is durable before the index names it
        meta, st_names = plan.meta, {}
        where = (lambda key: record.file) if weight_map is None else weight_map.__getitem__
        for _, dtype, _ in plan.entries:
            if dtype not in st_names:
                st_names[dtype] = st.st_dtype(dtype)
        variables = _format.plain_variable_records([
            (key, shape, st_names[dtype], meta[key][0], meta[key][1], where(key), checksums[key])
            for key, dtype, shape in plan.entries if key not in components
        ])
        for key, dtype, shape in plan.entries:
            if key in components:
                variables[key] = _format.variable_record(
                    shape, st_names[dtype], meta[key][0], meta[key][1], where(key), checksums[key], components[key])
        if components:  # the order of plan.entries, as before
            variables = {key: variables[key] for key, _, _ in plan.entries}
        index = _format.build_index(plan.policy, plan.step, time.time(), variables, files, weight_map)
        doing = f"writing {index_name} (the commit)"
        _atomic.write_bytes(index_path, _format.dump_json(index))
        for name in old_files:  # committed: the old checkpoint's leftovers (best effort)
            if name not in files and name.startswith((f"{base}.", f"{base}-")):
                try:
                    _atomic.unlink_quiet(os.path.join(folder, name))
                except OSError:
                    pass
    except BaseException as exc:
        for name in written:  # invisible without the index; tidy up what we can
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise write_error(prefix, doing, exc) from exc
        raise


def _reading(part: Any) -> Any:
    """The bytes of one part, held for the write: a pin's reading, or the array itself."""
    return part[0].reading() if isinstance(part, tuple) else contextlib.nullcontext(part)


def _chunks(parts: list[Any], what: str) -> Generator[Any, None, None]:
    """The tensor's bytes, part after part; each pin is held only while its part is written."""
    for part in parts:
        with _reading(part) as array:
            device = part[1].physical_device if isinstance(part, tuple) else None
            src = np.asarray(array) if device is None else _transfer.source(array, device, what)
            if isinstance(src, np.ndarray):
                yield src
            else:
                yield from src


RUN_MIN = 8  #: a run of fewer tensors goes through the general path
RUN_TENSOR_BYTES = 256 << 10  #: the largest tensor a run takes (bigger ones: aligned chunks)
RUN_BYTES = st.CHUNK_BYTES  #: a run's bytes; its live buffers hold mutations back while it is written


def _write_file(
    path: str,
    entries: list[tuple[str, np.dtype[Any], tuple[int, ...]]],
    metadata: dict[str, str],
    parts: Mapping[str, list[Any]],
    plan: SavePlan,
    meter: Any,
) -> st.FileRecord:
    """One safetensors file, each tensor streamed from its parts, then committed.

    File order (sequential), except that a tensor whose variable a mutation is waiting
    for (the copy-on-write budget is spent) is written next. Runs of small single-part
    host tensors (``RUN_MIN`` or more, back to back in the file) are written by one
    ``pwritev``, their reads begun and ended under one acquisition of the snapshot's lock;
    the rest, tensor by tensor, through :meth:`Pin.reading`.
    """
    try:
        writer = st.SafetensorsWriter(path, entries, metadata=metadata)
        try:
            order, infos, snapshot = writer.order, writer.infos, plan.snapshot
            done: set[str] = set()
            owner: dict[int, str] | None = None  # pin -> key, built when a mutation first waits
            host: dict[int, bool] = {}  # id(device) -> whether it is host memory a run may take
            i, count = 0, len(order)
            while i < count:
                if snapshot.has_urgent:
                    if owner is None:
                        owner = {id(p[0]): key for key in order for p in parts[key] if isinstance(p, tuple)}
                    urgent = snapshot.next_urgent()
                    key = owner.get(id(urgent)) if urgent is not None else None
                    if key is not None and key not in done:
                        _write_one(writer, key, parts[key], path, plan, meter)
                        done.add(key)
                        continue
                key = order[i]
                if key in done:
                    i += 1
                    continue
                j, nbytes = i, 0
                while j < count and j - i < 1024:
                    k = order[j]
                    ps = parts[k]
                    size = infos[k].nbytes
                    if (len(ps) != 1 or type(ps[0]) is not tuple or size > RUN_TENSOR_BYTES
                            or nbytes + size > RUN_BYTES or k in done):
                        break
                    device = ps[0][1].physical_device
                    ok = host.get(id(device))
                    if ok is None:
                        ok = host[id(device)] = _transfer.is_host(device)
                    if not ok:
                        break
                    nbytes += size
                    j += 1
                if j - i >= RUN_MIN:
                    run = order[i:j]
                    _write_run(writer, run, parts, path, plan)
                    done.update(run)  # a pin read for two files may come back as urgent: not twice here
                    plan.advance(nbytes)
                    meter.update(nbytes)
                    i = j
                else:
                    _write_one(writer, key, parts[key], path, plan, meter)
                    done.add(key)
                    i += 1
            return writer.commit()
        except BaseException:
            writer.abort()
            raise
    finally:
        meter.close()


def _write_one(writer: st.SafetensorsWriter, key: str, parts: list[Any], path: str, plan: SavePlan,
               meter: Any) -> None:
    gen = _chunks(parts, f"saving {key!r} to {path!r}")
    try:
        writer.write(key, gen)
    finally:
        gen.close()  # a failed write ends the pin's reading now, not at garbage collection
    nbytes = writer.infos[key].nbytes
    plan.advance(nbytes)
    meter.update(nbytes)


def _write_run(writer: st.SafetensorsWriter, keys: list[str], parts: Mapping[str, list[Any]], path: str,
               plan: SavePlan) -> None:
    """Keys back to back in the file, each one pinned host variable: their reads begun
    under one lock, one pwritev, their reads ended under one lock (also on failure)."""
    pins = [parts[k][0][0] for k in keys]
    snapshot = plan.snapshot
    arrays, live = snapshot.begin_reads(pins)
    try:
        sources = _transfer.host_sources(arrays, [parts[k][0][1].physical_device for k in keys],
                                         lambda n: f"saving {keys[n]!r} to {path!r}")
        writer.write_run(keys, sources)
    finally:
        snapshot.end_reads(pins, live)


def shard_entries(entries: Sequence[T], sizes: Sequence[int], max_shard_size: int) -> list[list[T]]:
    """``entries`` in order, cut greedily into shards of at most ``max_shard_size`` bytes
    (``sizes``: each entry's), as transformers cuts a state dict: an entry that would overflow
    the current shard starts the next one, so an entry larger than the limit is a shard of its
    own. Always at least one shard (an empty one for no entries)."""
    shards: list[list[T]] = [[]]
    acc = 0
    for entry, size in zip(entries, sizes):
        if shards[-1] and acc + size > max_shard_size:
            shards.append([])
            acc = 0
        shards[-1].append(entry)
        acc += size
    return shards


def write_in_parallel(names: Sequence[str], write: Callable[[int], T], written: list[str],
                      error: Callable[[str, OSError], BaseException]) -> list[T]:
    """``[write(k) for k in range(len(names))]`` on up to ``_parallel.THREADS`` threads (pwrite
    and xxh3 release the GIL), in order. Every file ``write(k)`` committed is named in
    ``written`` (also on failure, for the caller's tidy-up); the first failure is raised after
    every thread stopped, files not yet begun are never begun; an OSError becomes
    ``error(name, exc)`` unless it is already a CheckpointError."""
    n = len(names)
    results: list[T | None] = [None] * n
    failed = threading.Event()

    def one(k: int) -> None:
        if failed.is_set():
            return
        try:
            results[k] = write(k)
        except BaseException:
            failed.set()
            raise
        written.append(names[k])  # list.append is atomic

    failures: list[tuple[int, BaseException]] = []
    if n == 1:  # in this thread: nothing to overlap
        try:
            one(0)
        except BaseException as caught:
            failures.append((0, caught))
    else:
        with concurrent.futures.ThreadPoolExecutor(min(n, max(2, _parallel.THREADS)),
                                                   thread_name_prefix="gpuvars-shard") as pool:
            futures = [pool.submit(one, k) for k in range(n)]
        failures = [(k, e) for k, f in enumerate(futures) if (e := f.exception()) is not None]
    if failures:
        k, first = failures[0]
        if isinstance(first, OSError) and not isinstance(first, CheckpointError):
            raise error(names[k], first) from first
        raise first
    return [r for r in results if r is not None]


def _write_shards(plan: SavePlan, folder: str, base: str, written: list[str], meter: Any) -> list[st.FileRecord]:
    """``P-0000K-of-0000N.safetensors``: ``plan.entries`` cut by :func:`shard_entries`, the N
    files written in parallel; each thread writes its file's tensors in file order, taking a
    tensor a mutation waits for next when it is one of its own (:func:`_write_file`)."""
    assert plan.max_shard_size is not None
    sizes = [math.prod(shape) * dtype.itemsize for _, dtype, shape in plan.entries]
    shards = shard_entries(plan.entries, sizes, plan.max_shard_size)
    n = len(shards)
    names = [_format.shard_file(base, k + 1, n) for k in range(n)]
    shared = _progress.Shared(meter)

    def write(k: int) -> st.FileRecord:
        return _write_file(
            os.path.join(folder, names[k]), shards[k],
            {"format": _format.FORMAT, "version": str(_format.SHARDED_VERSION), "shard": f"{k + 1} of {n}"},
            plan.parts, plan, shared,
        )

    return write_in_parallel(names, write, written, lambda name, exc: write_error(plan.prefix, f"writing {name}", exc))


def _write_replica_files(
    plan: SavePlan, folder: str, base: str, written: list[str], version: int = 1
) -> list[tuple[st.FileRecord, dict[str, tuple[int, ...]]]]:
    """``P.replica-K-of-N.safetensors``: file K holds the K-th component of every distributed
    variable that has one; the N files are written in parallel (pwrite and xxh3 release the GIL).
    Returns each file's record and its tensors' shapes, in replica order."""
    n = len(plan.replicas)
    results: list[tuple[st.FileRecord, dict[str, tuple[int, ...]]] | None] = [None] * n
    errors: list[BaseException] = []

    def write(k: int) -> None:
        name = _format.replica_file(base, k, n)
        try:
            comps = plan.replicas[k]
            shapes = {key: c[0].shape for key, c in comps.items()}
            entries = [(key, np.dtype(c[0].dtype), shapes[key]) for key, c in comps.items()]
            record = _write_file(
                os.path.join(folder, name), entries,
                {"format": _format.FORMAT, "version": str(version), "replica": f"{k} of {n}"},
                {key: [c] for key, c in comps.items()}, plan, _progress.bar(0, "", False),
            )
            results[k] = (record, shapes)
        except OSError as exc:
            errors.append(exc if isinstance(exc, CheckpointError) else write_error(plan.prefix, f"writing {name}", exc))
        except BaseException as exc:  # handed to the saving thread below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,), name=f"gpuvars-replica-file-{k}") for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    written.extend(r[0].file for r in results if r is not None)
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


def delete_checkpoint(prefix: str) -> None:
    """Remove a checkpoint: its index first (it becomes invisible), then its other files.
    Raises the OSError of a file that could not be removed (not one already gone)."""
    folder, base = os.path.split(prefix)
    index_path = os.path.join(folder, _format.index_file(base))
    try:
        names = list(_format.read_index(prefix).files)
    except CheckpointError:
        names = [_format.data_file(base), _format.devices_file(base)]
    _atomic.unlink_quiet(index_path)
    for name in names:
        _atomic.unlink_quiet(os.path.join(folder, name))
