"""Restoring: validate a checkpoint against the variables completely, then stream each
tensor straight into its variable's storage (DESIGN decision 14).

Nothing is written until the index, the device map, every header and every
key/shape/dtype have been checked (and, with ``verify_first``, every checksum). If the
streaming pass then fails (a checksum, an I/O error, memory, an interrupt), every
variable it had started to write is marked uninitialized and named: never a silent mix
of old and new values.
"""

from __future__ import annotations

import dataclasses
import operator
import os
from typing import Any, Mapping

from gpuvars.checkpoint import _format, _parallel, _progress, _transfer
from gpuvars.checkpoint import _stformat as st
from gpuvars.checkpoint._saveable import PlainSaveable, Read, Saveable
from gpuvars.errors import CheckpointCorruptError, CheckpointMismatchError

__all__ = ["RestoreResult", "check_compatible", "restore_variables"]


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    """What a restore did: the keys it restored and where the saved device map differs.

    ``device_differences`` maps a key to ``(saved device, the variable's device)`` when the
    checkpoint recorded devices and the variable lives elsewhere (a variable never moves).
    ``unused`` lists the checkpoint's keys nothing was restored into (TF1's Saver ignores
    them too); :meth:`assert_consumed` makes them an error, as TF2's checkpoint status does,
    e.g. to catch optimizer slots a differently configured optimizer does not have.
    """

    prefix: str
    restored: tuple[str, ...]
    device_differences: dict[str, tuple[str, str]]
    unused: tuple[str, ...] = ()

    def assert_consumed(self) -> RestoreResult:
        """Raise unless every key of the checkpoint was restored; returns self.

        Raises:
            CheckpointMismatchError: naming the unused keys.
        """
        if self.unused:
            shown = ", ".join(repr(k) for k in self.unused[:20])
            more = f" (and {len(self.unused) - 20} more)" if len(self.unused) > 20 else ""
            raise CheckpointMismatchError(
                f"checkpoint {self.prefix!r} holds keys nothing was restored into: {shown}{more}"
            )
        return self


def check_compatible(index: _format.Index, targets: Mapping[str, Saveable]) -> None:
    """Every key present with an acceptable shape and the same dtype, else one error listing all."""
    problems = []
    missing = [k for k in targets if k not in index.variables]
    if missing:
        problems.append(
            "missing keys: "
            + ", ".join(repr(k) for k in missing[:20])
            + (f" (and {len(missing) - 20} more)" if len(missing) > 20 else "")
        )
    np_dtypes: dict[str, Any] = {}  # a checkpoint holds a few dtypes: each string looked up once
    entries = index.variables
    for key, sv in targets.items():
        entry = entries.get(key)
        if entry is None:
            continue
        saved_dtype = np_dtypes.get(entry.dtype)
        if saved_dtype is None:
            saved_dtype = np_dtypes[entry.dtype] = st.np_dtype(entry.dtype)
        dtype = sv.dtype
        if dtype is not None and dtype is not saved_dtype and dtype != saved_dtype:
            problems.append(f"{key!r}: dtype {saved_dtype} in the checkpoint, variable '{sv.name}' has {dtype}")
        if not sv.accepts(entry.shape):
            problems.append(
                f"{key!r}: shape {entry.shape} in the checkpoint, variable '{sv.name}' accepts {sv.describe_accepted()}"
            )
    if problems:
        raise CheckpointMismatchError(
            f"Restoring from checkpoint {index.prefix!r} failed: the variables do not match it; "
            "nothing was restored:\n  " + "\n  ".join(problems)
        )


def restore_variables(
    prefix: str,
    targets: Mapping[str, Saveable],
    *,
    verify_first: bool = False,
    progress: bool | None = None,
    index: _format.Index | None = None,
    devices: Mapping[str, Any] | None = None,
    compatible: bool = False,
) -> RestoreResult:
    """Validate ``prefix`` (a committed checkpoint or a plain ``.safetensors`` file) against
    ``targets`` completely, then stream each tensor in (see the module docstring).

    A caller that already opened the checkpoint passes its ``index`` (and its device map,
    ``devices``) so they are not parsed again; ``compatible=True`` says the targets were
    made from that index (their shapes and dtypes are its own: :func:`check_compatible`
    would only repeat them)."""
    with _parallel.gc_paused():  # everything made inside is freed inside (a collection after it finds little)
        return _validate_and_restore(prefix, targets, verify_first, progress, index, devices, compatible)


def _validate_and_restore(
    prefix: str,
    targets: Mapping[str, Saveable],
    verify_first: bool,
    progress: bool | None,
    index: _format.Index | None,
    devices: Mapping[str, Any] | None,
    compatible: bool,
) -> RestoreResult:
    if index is None:
        index = _format.open_checkpoint(prefix)
    if not compatible:
        check_compatible(index, targets)
    if devices is None:
        devices = _format.read_devices(index) if index.policy.saves_devices() else {}
    _restore(index, targets, verify_first, progress)
    differences = {
        key: (devices[key]["device"], sv.device)
        for key, sv in targets.items()
        if key in devices and devices[key]["device"] != sv.device
    }
    unused = tuple(k for k in index.variables if k not in targets)
    return RestoreResult(index.prefix, tuple(targets), differences, unused)


def _restore(index: _format.Index, targets: Mapping[str, Saveable], verify_first: bool, progress: bool | None) -> None:
    plans: dict[str, list[Read]] = {}
    direct: dict[str, list[str]] = {}  # file -> keys of plain variables, read straight into the variable
    by_file: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    entries = index.variables
    for key, sv in targets.items():
        entry = entries[key]
        if type(sv) is PlainSaveable:  # its one read: the tensor into its variable
            direct.setdefault(entry.file, []).append(key)
            by_file.setdefault(entry.file, {})[key] = (entry.shape, entry.dtype)
            continue
        reads = plans[key] = sv.reads(key, entry)
        for r in reads:
            by_file.setdefault(r.file, {})[r.key] = (r.shape, r.dtype)
    readers: dict[str, st.SafetensorsReader] = {}
    meter: Any = _progress.bar(0, "", False)
    try:
        for name, expected in by_file.items():  # open and validate every header before any byte is written
            readers[name] = _format.open_file(index, name, expected)
        if verify_first:
            _verify(index, plans, readers, direct)
        work, sizes = _work(index, targets, plans, direct, readers)
        meter = _progress.bar(sum(sizes) if progress is not False else 0,
                              f"restoring {os.path.basename(index.prefix)}", progress)
        counting = not getattr(meter, "silent", False)
        started: list[Saveable] = []  # list.extend/append are atomic: safe from the I/O threads

        def restore_one(item: tuple[str, Any]) -> None:
            kind, what = item
            if kind == "run":  # (file, keys, variables): a run of small host tensors
                name, keys, variables = what
                started.extend(targets[k] for k in keys)
                _transfer.restore_run(readers[name], keys, variables, [entries[k].checksum for k in keys])
                if counting:
                    meter.update(sum(readers[name].tensors[k].nbytes for k in keys))
                return
            key = what
            started.append(targets[key])
            if key not in plans:  # a plain variable: straight into it
                entry = entries[key]
                reader = readers[entry.file]
                _transfer.restore_into(reader, key, targets[key].var, entry.checksum)
                if counting:
                    meter.update(reader.tensors[key].nbytes)
                return
            for r in plans[key]:
                r.apply(readers[r.file])
                if counting:
                    meter.update(r.nbytes)

        try:  # runs of tensors on a few threads when the checkpoint is large (_parallel)
            _parallel.run(work, sizes, restore_one)
        except BaseException as exc:
            for sv in started:
                sv.invalidate()
            names = ", ".join(f"'{sv.name}'" for sv in started)
            note = (
                f"the restore had already written {names}, now marked uninitialized "
                "(restore with verify_first=True to leave variables untouched on damage)"
            )
            if isinstance(exc, CheckpointCorruptError):
                raise CheckpointCorruptError(f"{exc}; {note}") from exc
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(f"restoring {index.prefix!r}: {note}")
            raise
    finally:
        meter.close()
        for reader in readers.values():
            reader.close()


RUN_MIN = 8  #: a run of fewer tensors goes through the general path
_BEGIN = operator.itemgetter(3)  #: a TensorInfo's begin offset (a named tuple: field 3)
RUN_TENSOR_BYTES = 256 << 10  #: the largest tensor a run takes
RUN_BYTES = st.CHUNK_BYTES  #: a run's bytes


def _work(
    index: _format.Index,
    targets: Mapping[str, Saveable],
    plans: Mapping[str, list[Read]],
    direct: Mapping[str, list[str]],
    readers: Mapping[str, st.SafetensorsReader],
) -> tuple[list[tuple[str, Any]], list[int]]:
    """The restore's work items and their bytes: the adapters' reads key by key, and the
    plain variables' tensors: runs (``RUN_MIN`` or more small tensors back to back in the
    file, each into a variable whose storage :func:`_transfer.run_target` takes), then the
    rest key by key in the targets' order."""
    work: list[tuple[str, Any]] = [("key", k) for k, reads in plans.items() if reads]
    sizes = [sum(r.nbytes for r in plans[k]) for _, k in work]
    host: dict[int, bool] = {}
    for name, keys in direct.items():
        tensors = readers[name].tensors
        infos = sorted((tensors[k] for k in keys), key=_BEGIN)
        # per tensor: may it join a run (host storage updated in place), by its device's answer
        runnable = []
        for info in infos:
            device = targets[info[0]].var.physical_device
            ok = host.get(id(device))
            if ok is None:
                ok = host[id(device)] = _transfer.run_target(device)
            runnable.append(ok)
        alone: set[str] = set()
        i, count = 0, len(infos)
        while i < count:
            j, nbytes, end = i, 0, infos[i][3]
            while j < count and j - i < 1024:
                _, _, _, begin, stop = infos[j]
                size = stop - begin
                if size > RUN_TENSOR_BYTES or nbytes + size > RUN_BYTES or begin != end or not runnable[j]:
                    break
                nbytes += size
                end = stop
                j += 1
            if j - i >= RUN_MIN:
                keys_run = [info.name for info in infos[i:j]]
                work.append(("run", (name, keys_run, [targets[k].var for k in keys_run])))
                sizes.append(nbytes)
                i = j
            else:
                alone.add(infos[i].name)
                i += 1
        for key in keys:  # the rest in the targets' order
            if key in alone:
                work.append(("key", key))
                sizes.append(tensors[key].nbytes)
    return work, sizes


def _verify(
    index: _format.Index,
    plans: Mapping[str, list[Read]],
    readers: Mapping[str, st.SafetensorsReader],
    direct: Mapping[str, list[str]],
) -> None:
    """Every checksum of every read, before anything is written."""
    want: dict[str, dict[str, str]] = {}
    for reads in plans.values():
        for r in reads:
            if r.checksum is not None:
                want.setdefault(r.file, {})[r.key] = r.checksum
    for name, keys in direct.items():
        for key in keys:
            checksum = index.variables[key].checksum
            if checksum is not None:
                want.setdefault(name, {})[key] = checksum
    for name, expected in want.items():
        bad = readers[name].verify(expected)
        if bad:
            raise CheckpointCorruptError(
                f"{index.path(name)!r}: checksum failed for {', '.join(map(repr, bad))}; nothing was restored"
            )
