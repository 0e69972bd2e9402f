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

__all__ = ["LocalFiles", "SavePlan", "Step", "check_saveable", "commit", "delete_checkpoint", "open_folder",
           "prepare_save", "remove_written", "shard_entries", "write_checkpoint", "write_error", "write_in_parallel",
           "write_local"]

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
    err = CheckpointWriteError(exc.errno, msg) if exc.errno is not None else CheckpointWriteError(msg)
    err.step = f"{doing} failed: {reason}"  # what failed, without the prefix (a save across processes cites it)
    return err


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
        self.device_records: dict[str, dict[str, Any]] | None = None  # key -> its device-map entry
        self.logical = True  #: this process writes the data file (False: only its replica files)
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
    *,
    logical: bool = True,
    expand_sharded: bool = True,
) -> SavePlan:
    """Validate a save of ``saveables`` and pin every variable's storage: from now on the
    checkpoint holds the values of this moment, whatever other threads do. Moves no data
    (a sync-on-read variable's reduced value is computed here).

    ``logical=False`` (a process other than 0 of a multi-process save): the plan records
    every tensor but pins only the components its replica files hold.
    ``expand_sharded=False`` (a multi-process save): a sharded variable's shards get no
    replica files (each process holds all of them; the logical tensor is the checkpoint's).

    Raises:
        UninitializedVariableError: a variable has no value.
        InvalidArgumentError: a dtype safetensors cannot hold.
    """
    with _parallel.gc_paused():
        return _prepare(prefix, saveables, policy, step, copy_on_write_bytes, max_shard_size, logical,
                        expand_sharded)


def check_saveable(saveables: Mapping[str, Saveable]) -> None:
    """What :func:`prepare_save` raises before it pins anything: an uninitialized variable,
    a dtype safetensors cannot hold (a multi-process save checks this on every process
    before any process starts a collective)."""
    for key, sv in saveables.items():
        if not sv.initialized:
            raise _uninitialized(sv.name, key)
        dtype = sv.dtype
        if dtype is not None:
            st.st_dtype(np.dtype(dtype), key=key)


def _prepare(
    prefix: str,
    saveables: Mapping[str, Saveable],
    policy: VariablePolicy,
    step: int | None,
    copy_on_write_bytes: int | None,
    max_shard_size: int | None,
    logical: bool,
    expand_sharded: bool,
) -> SavePlan:
    plan = SavePlan(prefix, policy, step, Snapshot(copy_on_write_bytes), max_shard_size)
    plan.logical = logical
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
            parts = sv.parts(key)  # also where it is not written: a sync-on-read variable's reduction is collective
            if not logical:
                dtype, shape = np.dtype(sv.dtype), sv.shape
                assert shape is not None
                if dtype not in st_names:
                    st_names[dtype] = st.st_dtype(dtype, key=key)
                entries.append((key, dtype, shape))
                meta[key] = (sv.kind, sv.trainable)
                plan_parts[key] = []
                continue
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
                if not expand_sharded and sv.kind == "sharded":
                    continue
                for k, comp in enumerate(sv.components()):
                    while len(plan.replicas) <= k:
                        plan.replicas.append({})
                    got = plan.replicas[k][key] = pinned(comp, key, sv.name)
                    plan.total += got[0].nbytes
        if policy.saves_devices():
            plan.device_records = {key: sv.device_record() for key, sv in saveables.items()}
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


class Step:
    """What a save is doing, for the error that names it (a CheckpointWriteError says which
    step of which file failed)."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what


class LocalFiles:
    """What one process wrote of a checkpoint, for its index: ``files`` (name -> record),
    each logical tensor's ``checksums`` and shard (``weight_map``, None unsharded) if it
    wrote the data file, and each distributed variable's ``components`` (key -> records, in
    replica order)."""

    __slots__ = ("version", "files", "checksums", "weight_map", "components")

    def __init__(self, version: int) -> None:
        self.version = version
        self.files: dict[str, dict[str, Any]] = {}
        self.checksums: dict[str, str] = {}
        self.weight_map: dict[str, str] | None = None
        self.components: dict[str, list[dict[str, Any]]] = {}


def _write(plan: SavePlan, progress: bool | None) -> None:
    prefix = plan.prefix
    folder, base = os.path.split(prefix)
    doing = Step(f"creating the folder {folder!r}")
    written: list[str] = []
    try:
        old_files = open_folder(prefix, doing)
        local = write_local(plan, written, progress, doing)
        commit(plan, local, plan.device_records, old_files, written, doing)
    except BaseException as exc:
        remove_written(folder, written)
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise write_error(prefix, doing.what, exc) from exc
        raise


def remove_written(folder: str, written: Sequence[str]) -> None:
    """Best effort: the files of a save that did not commit (invisible without the index)."""
    for name in written:
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass


def open_folder(prefix: str, doing: Step) -> list[str]:
    """Create the folder, remove stale temporary files, and retire an old index of this
    prefix (decision 15); returns the old checkpoint's files (deleted after the commit,
    those this save does not overwrite)."""
    folder, base = os.path.split(prefix)
    if folder:
        doing.what = f"creating the folder {folder!r}"
        if os.path.lexists(folder) and not os.path.isdir(folder):
            doing.what += " (a file of that name is in the way)"
        os.makedirs(folder, exist_ok=True)
    doing.what = f"removing stale temporary files in {folder or '.'!r}"
    _atomic.remove_stale_temps(folder)
    index_name = _format.index_file(base)
    index_path = os.path.join(folder, index_name)
    old_files: list[str] = []
    if os.path.lexists(index_path):  # its files this save does not overwrite (other shard or replica counts) go after the commit
        try:
            old_files = _format.index_files(prefix)
        except CheckpointError:
            pass
        doing.what = f"retiring the old {index_name}"
        os.unlink(index_path)
        _atomic.fsync_dir(folder)
    return old_files


def write_local(plan: SavePlan, written: list[str], progress: bool | None, doing: Step,
                replica_offset: int = 0, replica_total: int | None = None) -> LocalFiles:
    """This process's files: the data file or its shards (if ``plan.logical``), then the
    replica files ``replica_offset ..`` of ``replica_total`` (default: this plan's replicas);
    then the snapshot is released. Names every committed file in ``written``."""
    folder, base = os.path.split(plan.prefix)
    local = LocalFiles(1 if plan.max_shard_size is None else _format.SHARDED_VERSION)
    files, components = local.files, local.components
    if plan.logical:
        meter = _progress.bar(plan.total, f"saving {base}", progress)
        if plan.max_shard_size is None:
            data_name = _format.data_file(base)
            doing.what = f"writing {data_name}"
            record = _write_file(
                os.path.join(folder, data_name), plan.entries,
                {"format": _format.FORMAT, "version": str(local.version)}, plan.parts, plan, meter,
            )
            written.append(record.file)
            files[record.file] = _format.file_record("data", record.size, record.header_checksum)
            local.checksums = record.tensors
        else:
            doing.what = "writing the data shards"
            try:
                shard_records = _write_shards(plan, folder, base, written, meter)
            finally:
                meter.close()
            weight_map: dict[str, str] = {}
            for rec in shard_records:
                files[rec.file] = _format.file_record("data", rec.size, rec.header_checksum)
                local.checksums.update(rec.tensors)
                weight_map.update(dict.fromkeys(rec.tensors, rec.file))
            local.weight_map = {key: weight_map[key] for key, _, _ in plan.entries}
    if plan.replicas:
        doing.what = "writing the replica files"
        total = len(plan.replicas) if replica_total is None else replica_total
        for rec, parts in _write_replica_files(plan, folder, base, written, local.version, replica_offset, total):
            files[rec.file] = _format.file_record("replica", rec.size, rec.header_checksum)
            for key, checksum in rec.tensors.items():
                components.setdefault(key, []).append(_format.component_record(rec.file, parts[key], checksum))
    plan.snapshot.release()  # every byte is in a file: no mutation waits on this save any more
    return local


def commit(plan: SavePlan, local: LocalFiles, device_records: Mapping[str, dict[str, Any]] | None,
           old_files: Sequence[str], written: list[str], doing: Step) -> None:
    """The device map, then the index (its atomic rename is the commit), then the old
    checkpoint's leftovers. ``local``: every file of the checkpoint (a multi-process save
    merges every process's)."""
    folder, base = os.path.split(plan.prefix)
    files, components, checksums, weight_map = local.files, local.components, local.checksums, local.weight_map
    if device_records is not None:
        name = _format.devices_file(base)
        doing.what = f"writing {name}"
        data = _format.build_devices(device_records)
        _atomic.write_bytes(os.path.join(folder, name), data, sync_dir=False)
        written.append(name)
        files[name] = _format.file_record("devices", len(data), st.checksum(data))
        _atomic.fsync_dir(folder)  # every renamed file is durable before the index names it
    meta, st_names = plan.meta, {}
    data_name = _format.data_file(base)
    where = (lambda key: data_name) if weight_map is None else weight_map.__getitem__
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
    index_name = _format.index_file(base)
    doing.what = f"writing {index_name} (the commit)"
    _atomic.write_bytes(os.path.join(folder, index_name), _format.dump_json(index))
    for name in old_files:  # committed: the old checkpoint's leftovers (best effort)
        if name not in files and name.startswith((f"{base}.", f"{base}-")):
            try:
                _atomic.unlink_quiet(os.path.join(folder, name))
            except OSError:
                pass


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
    plan: SavePlan, folder: str, base: str, written: list[str], version: int, offset: int, total: int
) -> list[tuple[st.FileRecord, dict[str, tuple[int, ...]]]]:
    """``P.replica-K-of-N.safetensors`` (N: ``total``) for this plan's replicas, K from
    ``offset`` on: file K holds the K-th component of every distributed variable that has
    one; the files are written in parallel (pwrite and xxh3 release the GIL).
    Returns each file's record and its tensors' shapes, in replica order."""
    n = len(plan.replicas)
    results: list[tuple[st.FileRecord, dict[str, tuple[int, ...]]] | None] = [None] * n
    errors: list[BaseException] = []

    def write(k: int) -> None:
        name = _format.replica_file(base, offset + k, total)
        try:
            comps = plan.replicas[k]
            shapes = {key: c[0].shape for key, c in comps.items()}
            entries = [(key, np.dtype(c[0].dtype), shapes[key]) for key, c in comps.items()]
            record = _write_file(
                os.path.join(folder, name), entries,
                {"format": _format.FORMAT, "version": str(version), "replica": f"{offset + k} of {total}"},
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
