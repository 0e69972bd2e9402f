"""gv.Saver: TF's tf.train.Saver on safetensors, with an atomic commit and strict restore.

A save writes ``P.safetensors`` (streamed from storage), the optional ``P.devices.json``
and, last, ``P.index.json`` — its atomic rename is the commit; a prefix without its index
does not exist for readers. Saving over an existing prefix first retires its index, so
the old checkpoint disappears rather than becoming half-valid; distinct prefixes
(``global_step``) are what make a crash lose nothing. A restore validates everything
structural before writing a byte, then streams each tensor into the variable's storage
where it already lives.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import threading
import time
from typing import Any, Iterable, Mapping

import numpy as np

from gpuvars.checkpoint import _atomic, _format, _logical, _parallel, _progress, _state, _transfer
from gpuvars.checkpoint import _stformat as st
from gpuvars.checkpoint.policy import SaveOptions, VariablePolicy
from gpuvars.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    InvalidArgumentError,
    UninitializedVariableError,
)
from gpuvars.registry import current_registry
from gpuvars.variable import Variable

__all__ = ["CheckpointState", "RestoreResult", "Saver", "get_checkpoint_state", "latest_checkpoint"]


def _var_map(var_list: Any, allow_empty: bool) -> dict[str, Variable]:
    """``{checkpoint key: variable}`` from None (the registry now), a list or a dict."""
    items: list[tuple[Any, Any]]
    if var_list is None:
        items = [(v.name, v) for v in current_registry().variables()]
    elif isinstance(var_list, Mapping):
        items = list(var_list.items())
    elif _logical.is_saveable(var_list):
        items = [(var_list.name, var_list)]
    else:
        try:
            items = [(getattr(v, "name", None), v) for v in var_list]
        except TypeError:
            raise InvalidArgumentError(f"var_list must be None, a list or a dict of Variables, got {type(var_list).__name__}") from None
    out: dict[str, Variable] = {}
    seen: dict[int, str] = {}
    for key, var in items:
        if not _logical.is_saveable(var):
            raise InvalidArgumentError(
                f"var_list entry {key!r} is a {type(var).__name__}, not a gv.Variable or gv.ShardedVariable"
            )
        if not isinstance(key, str) or not key or key == "__metadata__":
            raise InvalidArgumentError(f"checkpoint key {key!r} for variable '{var.name}' must be a non-empty string")
        if key in out:
            raise InvalidArgumentError(f"At least two variables have the same name: {key}")
        if id(var) in seen:
            raise InvalidArgumentError(f"variable '{var.name}' appears twice in var_list (as {seen[id(var)]!r} and {key!r})")
        seen[id(var)] = key
        out[key] = var
    if not out and not allow_empty:
        raise InvalidArgumentError("No variables to save")
    return out


def _step_number(global_step: Any) -> int:
    """The int of ``global_step``: an int (numpy ints too) or an initialized integer Variable."""
    value = global_step
    if isinstance(global_step, Variable):
        if global_step.dtype is None or global_step.dtype.kind not in "iu" or global_step.shape != ():
            raise InvalidArgumentError(
                f"global_step variable '{global_step.name}' must be a scalar integer variable, "
                f"got dtype {global_step.dtype} shape {global_step.shape}"
            )
        value = global_step.numpy()
    if isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(f"global_step must be an int or an int Variable, got {global_step!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidArgumentError(f"global_step must be an int or an int Variable, got {global_step!r}") from None


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    """What a restore did: the keys it restored and where the saved device map differs.

    ``device_differences`` maps a key to ``(saved device, the variable's device)`` when the
    checkpoint recorded devices and the variable lives elsewhere (a variable never moves).
    """

    prefix: str
    restored: tuple[str, ...]
    device_differences: dict[str, tuple[str, str]]


@dataclasses.dataclass(frozen=True)
class CheckpointState:
    """The folder's ``checkpoint`` file: the latest prefix and those kept (oldest first)."""

    model_checkpoint_path: str | None
    all_model_checkpoint_paths: list[str]
    all_model_checkpoint_timestamps: list[float]
    last_preserved_timestamp: float


class Saver:
    """Save and restore variables as safetensors checkpoints (TF's tf.train.Saver).

    Args:
        var_list: None (every variable alive now in the current registry), a list
            (keyed by ``v.name``) or a dict ``{checkpoint key: variable}`` (renaming).
        max_to_keep: how many recent checkpoints to keep (None or 0 keeps all).
        keep_checkpoint_every_n_hours: additionally keep one checkpoint per this many hours.
        options: :class:`gpuvars.SaveOptions` (the VariablePolicy).
        allow_empty: allow a saver with no variables.

    Raises:
        InvalidArgumentError: a bad var_list (duplicate keys, non-variables, empty).

    Example:
        >>> import gpuvars as gv, numpy as np, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> with gv.Registry():
        ...     w = gv.Variable(np.arange(3.0), name="w")
        ...     saver = gv.Saver()
        ...     p = saver.save(os.path.join(d, "model.ckpt"), global_step=10)
        ...     _ = w.assign([0.0, 0.0, 0.0])
        ...     _ = saver.restore(p)
        ...     os.path.basename(p), w.numpy().tolist()
        ('model.ckpt-10', [0.0, 1.0, 2.0])
    """

    def __init__(
        self,
        var_list: Any = None,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float = 10000.0,
        options: SaveOptions | None = None,
        allow_empty: bool = False,
    ) -> None:
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or isinstance(max_to_keep, bool) or max_to_keep < 0):
            raise InvalidArgumentError(f"max_to_keep must be None or an int >= 0, got {max_to_keep!r}")
        if not isinstance(keep_checkpoint_every_n_hours, (int, float)) or keep_checkpoint_every_n_hours <= 0:
            raise InvalidArgumentError(
                f"keep_checkpoint_every_n_hours must be a positive number, got {keep_checkpoint_every_n_hours!r}"
            )
        if options is not None and not isinstance(options, SaveOptions):
            raise InvalidArgumentError(f"options must be a gv.SaveOptions, got {type(options).__name__}")
        self._vars = _var_map(var_list, allow_empty)
        self._max_to_keep = max_to_keep or None
        self._keep_every_s = float(keep_checkpoint_every_n_hours) * 3600.0
        self._options = options or SaveOptions()
        self._last: list[tuple[str, float]] = []  # (prefix path, timestamp), oldest first
        self._last_preserved = time.time()

    @property
    def last_checkpoints(self) -> list[str]:
        """The prefixes this saver keeps, oldest first."""
        return [p for p, _ in self._last]

    @property
    def var_map(self) -> dict[str, Variable]:
        """The ``{checkpoint key: variable}`` map this saver saves and restores."""
        return dict(self._vars)

    # --- save ---------------------------------------------------------------------------------

    def save(self, save_path: str | os.PathLike[str], global_step: Any = None, options: SaveOptions | None = None) -> str:
        """Write a checkpoint at ``save_path`` (``-<global_step>`` appended) and return its prefix.

        Raises:
            UninitializedVariableError: a variable has no value (nothing is written).
            InvalidArgumentError: a bad path, step or a dtype safetensors cannot hold.
            OSError: the disk failed; the previous checkpoints are untouched.
        """
        opts = options if options is not None else self._options
        if not isinstance(opts, SaveOptions):
            raise InvalidArgumentError(f"options must be a gv.SaveOptions, got {type(opts).__name__}")
        folder, base = _format.split_prefix(save_path, "Saver.save")
        step = None if global_step is None else _step_number(global_step)
        if step is not None:
            base = f"{base}-{step}"
        prefix = os.path.join(folder, base)
        write_checkpoint(prefix, self._vars, opts.policy, step, progress=opts.progress)
        self._after_commit(prefix, folder)
        return prefix

    def _after_commit(self, prefix: str, folder: str) -> None:
        """Update the state file, then apply retention (deletes only committed-old prefixes)."""
        now = time.time()
        self._last = [(p, t) for p, t in self._last if p != prefix] + [(prefix, now)]
        doomed: list[str] = []
        while self._max_to_keep is not None and len(self._last) > self._max_to_keep:
            old, ts = self._last.pop(0)
            if ts - self._last_preserved >= self._keep_every_s:
                self._last_preserved = ts  # kept for good: leaves the rotation, not the disk
                continue
            doomed.append(old)
        _state.write_state(  # a folder's state lists only that folder's checkpoints (plain names)
            folder,
            os.path.basename(prefix),
            [(os.path.basename(p), t) for p, t in self._last if os.path.dirname(p) == folder],
            self._last_preserved,
        )
        for old in doomed:
            delete_checkpoint(old)

    # --- restore ------------------------------------------------------------------------------

    def restore(
        self,
        save_path: str | os.PathLike[str],
        *,
        verify_first: bool = False,
        var_list: Any = None,
        progress: bool | None = None,
    ) -> RestoreResult:
        """Fill this saver's variables (or ``var_list``, a subset) from ``save_path``, in place.

        Strict: every key must be in the checkpoint with the variable's dtype and a shape the
        variable accepts; otherwise nothing is written and the error lists each culprit.
        Initializes uninitialized variables without running their initializers.

        ``save_path`` is a checkpoint prefix, or a plain ``.safetensors`` file (written by
        ``safetensors.numpy.save_file``, ``safetensors.torch.save_file``, ...): its tensor
        names are the keys; it has no checksums, so only its structure is verified.

        Args:
            verify_first: check every checksum before writing anything (one extra read);
                without it a checksum failure marks the variables already written as
                uninitialized and names them.
            var_list: restore only these (list or dict, as in the constructor).
            progress: a progress bar on stderr (None: only on a terminal for >= 256 MiB; needs tqdm).

        Raises:
            CheckpointNotFoundError: no committed checkpoint at ``save_path``.
            CheckpointMismatchError: missing keys, or shape/dtype mismatches (listed).
            CheckpointCorruptError: damaged files (header, size, checksum).
        """
        if save_path is None:
            raise InvalidArgumentError("Can't load save_path when it is None.")
        targets = self._vars if var_list is None else _var_map(var_list, allow_empty=False)
        return restore_variables(os.fspath(save_path), targets, verify_first=verify_first, progress=progress)


# --- the machinery, shared with gv.load_checkpoint ------------------------------------------------


def write_checkpoint(
    prefix: str,
    variables: Mapping[str, Variable],
    policy: VariablePolicy,
    step: int | None,
    progress: bool | None = None,
) -> None:
    """Write and commit the checkpoint ``prefix`` of ``variables`` (validated first)."""
    folder, base = os.path.split(prefix)
    entries: list[tuple[str, np.dtype[Any], tuple[int, ...]]] = []
    for key, var in variables.items():
        dtype, shape = var.dtype, var.shape
        if not var.initialized or dtype is None or shape is None:
            raise UninitializedVariableError(
                f"cannot save variable '{var.name}' (key {key!r}): it is not initialized; nothing was written"
            )
        st.st_dtype(dtype, key=key)  # a dtype safetensors cannot hold fails before any write
        entries.append((key, np.dtype(dtype), tuple(shape)))
    if folder:
        os.makedirs(folder, exist_ok=True)
    _atomic.remove_stale_temps(folder)

    index_path = os.path.join(folder, _format.index_file(base))
    if os.path.exists(index_path):  # retire the old checkpoint of this prefix first (decision 15)
        os.unlink(index_path)
        _atomic.fsync_dir(folder)

    written: list[str] = []
    try:
        writer = st.SafetensorsWriter(
            os.path.join(folder, _format.data_file(base)),
            entries,
            metadata={"format": _format.FORMAT, "version": str(_format.VERSION)},
        )
        try:
            meter = _progress.bar(sum(writer.infos[k].nbytes for k in writer.order), f"saving {base}", progress)
            try:
                for key in writer.order:
                    writer.write(key, _logical.save_source(variables[key]))
                    meter.update(writer.infos[key].nbytes)
            finally:
                meter.close()
            record = writer.commit()
        except BaseException:
            writer.abort()
            raise
        written.append(record.file)
        files: dict[str, dict[str, Any]] = {
            record.file: _format.file_record("data", record.size, record.header_checksum)
        }
        components: dict[str, list[dict[str, Any]]] = {}
        if policy is VariablePolicy.EXPAND_DISTRIBUTED_VARIABLES:
            for rec in _write_replica_files(folder, base, variables, written):
                files[rec.file] = _format.file_record("replica", rec.size, rec.header_checksum)
                for key, checksum in rec.tensors.items():
                    comps = _logical.components(variables[key])
                    part = comps[len(components.get(key, []))]
                    components.setdefault(key, []).append(
                        _format.component_record(rec.file, part.shape, checksum)  # type: ignore[arg-type]
                    )
        if policy.saves_devices():
            payload = _format.build_devices({key: _logical.device_record(var) for key, var in variables.items()})
            name = _format.devices_file(base)
            _atomic.write_bytes(os.path.join(folder, name), payload, sync_dir=False)
            written.append(name)
            files[name] = _format.file_record("devices", len(payload), st.checksum(payload))
            _atomic.fsync_dir(folder)  # every renamed file is durable before the index names it
        index = _format.build_index(
            policy,
            step,
            time.time(),
            {
                key: _format.variable_record(
                    shape, st.st_dtype(dtype), _logical.kind_of(variables[key]), variables[key].trainable,
                    record.file, record.tensors[key], components.get(key, ()),
                )
                for key, dtype, shape in entries
            },
            files,
        )
        _atomic.write_bytes(index_path, _format.dump_json(index))  # the commit
    except BaseException:
        for name in written:  # invisible without the index; tidy up what we can
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
        raise


def _write_replica_files(
    folder: str, base: str, variables: Mapping[str, Any], written: list[str]
) -> list[st.FileRecord]:
    """``P.replica-K-of-N.safetensors``: file K holds the K-th component of every distributed
    variable that has one; the N files are written in parallel (pwrite and xxh3 release the GIL).
    Returns the records in replica order."""
    dist = {key: _logical.components(var) for key, var in variables.items()}
    dist = {key: comps for key, comps in dist.items() if comps}
    n = max((len(c) for c in dist.values()), default=0)
    records: list[st.FileRecord | None] = [None] * n
    errors: list[BaseException] = []

    def write(k: int) -> None:
        parts = {key: comps[k] for key, comps in dist.items() if len(comps) > k}
        entries = [(key, np.dtype(c.dtype), tuple(c.shape)) for key, c in parts.items()]  # type: ignore[arg-type]
        writer = st.SafetensorsWriter(
            os.path.join(folder, _format.replica_file(base, k, n)),
            entries,
            metadata={"format": _format.FORMAT, "version": str(_format.VERSION), "replica": f"{k} of {n}"},
        )
        try:
            for key in writer.order:
                writer.write(key, _transfer.source(parts[key]))
            records[k] = writer.commit()
        except BaseException as exc:
            writer.abort()
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,), name=f"gpuvars-replica-file-{k}") for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    written.extend(r.file for r in records if r is not None)
    if errors:
        raise errors[0]
    return [r for r in records if r is not None]


def delete_checkpoint(prefix: str) -> None:
    """Remove a checkpoint: its index first (it becomes invisible), then its other files."""
    folder, base = os.path.split(prefix)
    index_path = os.path.join(folder, _format.index_file(base))
    try:
        index = _format.read_index(prefix)
        names = list(index.files)
    except CheckpointError:
        names = [_format.data_file(base), _format.devices_file(base)]
    try:
        os.unlink(index_path)
    except FileNotFoundError:
        pass
    for name in names:
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            pass


def _check_compatible(index: _format.Index, targets: Mapping[str, Variable]) -> None:
    """Every key present with an acceptable shape and the same dtype, else one error listing all."""
    problems = []
    missing = [k for k in targets if k not in index.variables]
    if missing:
        problems.append(
            "missing keys: "
            + ", ".join(repr(k) for k in missing[:20])
            + (f" (and {len(missing) - 20} more)" if len(missing) > 20 else "")
        )
    for key, var in targets.items():
        entry = index.variables.get(key)
        if entry is None:
            continue
        saved_dtype = st.np_dtype(entry.dtype)
        if var.dtype is not None and saved_dtype != var.dtype:
            problems.append(f"{key!r}: dtype {saved_dtype} in the checkpoint, variable '{var.name}' has {var.dtype}")
        declared = var.declared_shape if isinstance(var, Variable) else var.shape  # sharded: the full shape
        if declared is not None and not (
            len(declared) == len(entry.shape) and all(d is None or d == s for d, s in zip(declared, entry.shape))
        ):
            problems.append(
                f"{key!r}: shape {entry.shape} in the checkpoint, variable '{var.name}' accepts {declared}"
            )
    if problems:
        raise CheckpointMismatchError(
            f"Restoring from checkpoint {index.prefix!r} failed: the variables do not match it; "
            "nothing was restored:\n  " + "\n  ".join(problems)
        )


def restore_variables(
    prefix: str, targets: Mapping[str, Variable], *, verify_first: bool = False, progress: bool | None = None
) -> RestoreResult:
    """Validate ``prefix`` against ``targets`` completely, then stream each tensor in.

    ``prefix`` is a committed checkpoint or a plain ``.safetensors`` file. Nothing is
    written until the index, the device map, every header and every key/shape/dtype have
    been checked (and, with ``verify_first``, every checksum). If the streaming pass then
    fails (a checksum, an I/O error, an interrupt), every variable it had started to write
    is marked uninitialized and named: never a silent mix of old and new values.
    """
    index = _format.open_checkpoint(prefix)
    _check_compatible(index, targets)
    devices = _format.read_devices(index) if index.policy.saves_devices() else {}
    plans = {key: _logical.plan(index, key, var) for key, var in targets.items()}
    by_file: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    for reads in plans.values():
        for r in reads:
            by_file.setdefault(r.file, {})[r.key] = (r.shape, r.dtype)
    readers: dict[str, st.SafetensorsReader] = {}
    meter: Any = _progress.bar(0, "", False)
    try:
        for name, expected in by_file.items():  # open and validate every header before any byte is written
            readers[name] = _format.open_file(index, name, expected)
        if verify_first:
            for name in by_file:
                want = {r.key: r.checksum for reads in plans.values() for r in reads
                        if r.file == name and r.checksum is not None}
                bad = readers[name].verify(want)
                if bad:
                    raise CheckpointCorruptError(
                        f"{index.path(name)!r}: checksum failed for {', '.join(map(repr, bad))}; nothing was restored"
                    )
        total = sum(r.nbytes for reads in plans.values() for r in reads) if progress is not False else 0
        meter = _progress.bar(total, f"restoring {os.path.basename(index.prefix)}", progress)
        counting = not getattr(meter, "silent", False)
        started: list[Any] = []  # list.append is atomic: safe from the I/O threads

        def restore_one(key: str) -> None:
            started.append(targets[key])
            for r in plans[key]:
                r.apply(readers[r.file])
                if counting:
                    meter.update(r.nbytes)

        keys = list(plans)
        try:  # runs of tensors on a few threads when the checkpoint is large (_parallel)
            _parallel.run(keys, [sum(r.nbytes for r in plans[k]) for k in keys], restore_one)
        except BaseException as exc:
            for v in started:
                v._mark_uninitialized()
            names = ", ".join(f"'{v.name}'" for v in started)
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
    differences = {
        key: (devices[key]["device"], var.device)
        for key, var in targets.items()
        if key in devices and devices[key]["device"] != var.device
    }
    return RestoreResult(index.prefix, tuple(targets), differences)


def latest_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> str | None:
    """The newest committed prefix recorded in ``checkpoint_dir``, or None (also when its files are gone).

    Example:
        >>> import gpuvars as gv, tempfile
        >>> gv.latest_checkpoint(tempfile.mkdtemp()) is None
        True
    """
    folder = os.fspath(checkpoint_dir)
    state = _state.read_state(folder)
    if state is None or state.latest is None:
        return None
    if not os.path.isfile(os.path.join(folder, _format.index_file(state.latest))):
        return None
    return os.path.join(folder, state.latest)


def get_checkpoint_state(checkpoint_dir: str | os.PathLike[str]) -> CheckpointState | None:
    """The folder's checkpoint state (paths joined onto the folder), or None if it has none."""
    folder = os.fspath(checkpoint_dir)
    state = _state.read_state(folder)
    if state is None:
        return None
    return CheckpointState(
        model_checkpoint_path=None if state.latest is None else os.path.join(folder, state.latest),
        all_model_checkpoint_paths=[os.path.join(folder, p) for p, _ in state.entries],
        all_model_checkpoint_timestamps=[t for _, t in state.entries],
        last_preserved_timestamp=0.0 if state.last_preserved is None else state.last_preserved,
    )


def iter_files(prefix: str) -> Iterable[str]:
    """The files of a committed checkpoint (index last)."""
    index = _format.read_index(prefix)
    yield from (index.path(n) for n in index.files)
    yield os.path.join(index.folder, _format.index_file(index.base))
