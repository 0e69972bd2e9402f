"""Writing a checkpoint: the data file, the replica files and the device map, then the index,
whose atomic rename is the commit; and deleting one, index first.

Everything is validated before the first byte is written (STYLE 10). Saving over an
existing prefix first retires its index (DESIGN decision 15). A failure of the file
system (no space, a file too large, no permission, a folder that is a file) is a
:class:`~gpuvars.errors.CheckpointWriteError`, a CheckpointError and an OSError with the
errno kept, naming the prefix and the checkpoint file being written (never only a hidden
temporary name); what the save had written is removed and nothing of it is visible.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Mapping

import numpy as np

from gpuvars.checkpoint import _atomic, _format, _progress, _transfer
from gpuvars.checkpoint import _stformat as st
from gpuvars.checkpoint._saveable import Saveable
from gpuvars.checkpoint.policy import VariablePolicy
from gpuvars.errors import CheckpointError, CheckpointWriteError, UninitializedVariableError

__all__ = ["delete_checkpoint", "write_checkpoint", "write_error"]


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


def write_checkpoint(
    prefix: str,
    saveables: Mapping[str, Saveable],
    policy: VariablePolicy,
    step: int | None,
    progress: bool | None = None,
) -> None:
    """Write and commit the checkpoint ``prefix`` of ``saveables`` (validated first).

    Raises:
        UninitializedVariableError: a variable has no value (nothing is written).
        InvalidArgumentError: a dtype safetensors cannot hold (nothing is written).
        CheckpointWriteError: the file system failed; nothing of this save is visible.
    """
    folder, base = os.path.split(prefix)
    entries: list[tuple[str, np.dtype[Any], tuple[int, ...]]] = []
    for key, sv in saveables.items():
        dtype, shape = sv.dtype, sv.shape
        if not sv.initialized or dtype is None or shape is None:
            raise UninitializedVariableError(
                f"cannot save variable '{sv.name}' (key {key!r}): it is not initialized; nothing was written"
            )
        st.st_dtype(dtype, key=key)  # a dtype safetensors cannot hold fails before any write
        entries.append((key, np.dtype(dtype), shape))

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
        if os.path.lexists(index_path):  # retire the old checkpoint of this prefix first (decision 15)
            doing = f"retiring the old {index_name}"
            os.unlink(index_path)
            _atomic.fsync_dir(folder)

        data_name = _format.data_file(base)
        doing = f"writing {data_name}"
        record = _write_file(
            os.path.join(folder, data_name), entries, {"format": _format.FORMAT, "version": str(_format.VERSION)},
            lambda key: saveables[key].source(key), progress, f"saving {base}",
        )
        written.append(record.file)
        files: dict[str, dict[str, Any]] = {
            record.file: _format.file_record("data", record.size, record.header_checksum)
        }
        components: dict[str, list[dict[str, Any]]] = {}
        if policy is VariablePolicy.EXPAND_DISTRIBUTED_VARIABLES:
            doing = "writing the replica files"
            for rec, parts in _write_replica_files(prefix, folder, base, saveables, written):
                files[rec.file] = _format.file_record("replica", rec.size, rec.header_checksum)
                for key, checksum in rec.tensors.items():
                    components.setdefault(key, []).append(
                        _format.component_record(rec.file, parts[key], checksum)
                    )
        if policy.saves_devices():
            name = _format.devices_file(base)
            doing = f"writing {name}"
            payload = _format.build_devices({key: sv.device_record() for key, sv in saveables.items()})
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
                    shape, st.st_dtype(dtype), saveables[key].kind, saveables[key].trainable,
                    record.file, record.tensors[key], components.get(key, ()),
                )
                for key, dtype, shape in entries
            },
            files,
        )
        doing = f"writing {index_name} (the commit)"
        _atomic.write_bytes(index_path, _format.dump_json(index))
    except BaseException as exc:
        for name in written:  # invisible without the index; tidy up what we can
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise write_error(prefix, doing, exc) from exc
        raise


def _write_file(
    path: str,
    entries: list[tuple[str, np.dtype[Any], tuple[int, ...]]],
    metadata: dict[str, str],
    source: Any,
    progress: bool | None,
    desc: str,
) -> st.FileRecord:
    """One safetensors file, each tensor streamed from ``source(key)``, then committed."""
    writer = st.SafetensorsWriter(path, entries, metadata=metadata)
    try:
        meter = _progress.bar(sum(writer.infos[k].nbytes for k in writer.order), desc, progress)
        try:
            for key in writer.order:
                writer.write(key, source(key))
                meter.update(writer.infos[key].nbytes)
        finally:
            meter.close()
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def _write_replica_files(
    prefix: str, folder: str, base: str, saveables: Mapping[str, Saveable], written: list[str]
) -> list[tuple[st.FileRecord, dict[str, tuple[int, ...]]]]:
    """``P.replica-K-of-N.safetensors``: file K holds the K-th component of every distributed
    variable that has one; the N files are written in parallel (pwrite and xxh3 release the GIL).
    Returns each file's record and its tensors' shapes, in replica order."""
    dist = {key: sv.components() for key, sv in saveables.items()}
    dist = {key: comps for key, comps in dist.items() if comps}
    n = max((len(c) for c in dist.values()), default=0)
    results: list[tuple[st.FileRecord, dict[str, tuple[int, ...]]] | None] = [None] * n
    errors: list[BaseException] = []

    def write(k: int) -> None:
        name = _format.replica_file(base, k, n)
        try:
            parts = {key: comps[k] for key, comps in dist.items() if len(comps) > k}
            shapes = {key: tuple(c.shape) for key, c in parts.items()}
            entries = [(key, np.dtype(c.dtype), shapes[key]) for key, c in parts.items()]
            record = _write_file(
                os.path.join(folder, name), entries,
                {"format": _format.FORMAT, "version": str(_format.VERSION), "replica": f"{k} of {n}"},
                lambda key: _transfer.source(parts[key], key), False, "",
            )
            results[k] = (record, shapes)
        except OSError as exc:
            errors.append(exc if isinstance(exc, CheckpointError) else write_error(prefix, f"writing {name}", exc))
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
