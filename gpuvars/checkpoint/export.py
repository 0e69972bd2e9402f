"""Export a checkpoint as a Hugging Face sharded folder: ``model-00001-of-0000N.safetensors``
... plus ``model.safetensors.index.json`` (``{"metadata": {"total_size": N}, "weight_map":
{tensor: shard}}``), the layout ``transformers`` and every ``safetensors`` reader open.

The source is anything :func:`gpuvars.load_checkpoint` opens (a gpuvars prefix, a plain
``.safetensors`` file, another HF folder). Every header is validated before a byte is
written; each tensor's bytes are streamed from its file into its shard through a bounded
buffer and checked against the source's checksum on the way (a damaged source is never
exported). Shards go to temporary names and are renamed in place, in parallel; the index
last, so a folder with an index is always whole.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from gpuvars.checkpoint import _atomic, _format, _parallel, _progress
from gpuvars.checkpoint import _stformat as st
from gpuvars.checkpoint._write import shard_entries, write_in_parallel
from gpuvars.checkpoint.policy import parse_size
from gpuvars.errors import CheckpointError, CheckpointWriteError, InvalidArgumentError

__all__ = ["export_hf"]

DEFAULT_MAX_SHARD_SIZE = "5GB"  #: transformers' default for save_pretrained
HF_METADATA = {"format": "pt"}  #: transformers refuses a shard whose metadata format is not pt/tf/flax/mlx


def hf_shard_file(k: int, n: int) -> str:
    """``model-0000K-of-0000N.safetensors`` (k 1-based), transformers' name."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def _error(source: str, out_dir: str, doing: str, exc: OSError) -> CheckpointWriteError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    msg = (f"cannot export {source!r} to {out_dir!r}: {doing} failed: {reason}; "
           "no new index was written (the folder holds no complete export)")
    return CheckpointWriteError(exc.errno, msg) if exc.errno is not None else CheckpointWriteError(msg)


def export_hf(
    prefix: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool | None = None,
) -> str:
    """Write the checkpoint ``prefix`` as a Hugging Face sharded folder ``out_dir``; returns
    the path of its ``model.safetensors.index.json``.

    Tensor names are the checkpoint keys; values are the logical tensors (a distributed
    variable's primary / reduced value / concatenation), devices are not recorded. Shards
    hold at most ``max_shard_size`` tensor bytes (an int or ``"5GB"``, ``"500MB"``,
    ``"2GiB"``; a larger tensor gets a shard of its own) and carry the metadata
    ``{"format": "pt"}`` transformers asks for. The index is always written, also for one
    shard. Exporting over an earlier export retires its index first and removes its
    shards that the new export does not overwrite.

    Raises:
        InvalidArgumentError: a bad ``max_shard_size``, or ``out_dir`` is the checkpoint's own
            folder and a shard would overwrite one of its files.
        CheckpointNotFoundError, CheckpointCorruptError: as for a restore (the source is
            verified while it is copied; nothing is committed on damage).
        CheckpointWriteError: the file system failed.

    Example:
        >>> import gpuvars as gv, numpy as np, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> with gv.Registry():
        ...     _ = gv.Variable(np.ones(2, np.float32), name="w")
        ...     p = gv.Saver().save(os.path.join(d, "ckpt", "m"))
        >>> index = gv.checkpoint.export_hf(p, os.path.join(d, "hf"))
        >>> sorted(os.listdir(os.path.join(d, "hf")))
        ['model-00001-of-00001.safetensors', 'model.safetensors.index.json']
    """
    limit = parse_size(max_shard_size)
    source = os.fspath(prefix)
    out = os.fspath(out_dir)
    if not isinstance(out, str) or not out:
        raise InvalidArgumentError(f"export_hf: out_dir must be a non-empty path, got {out_dir!r}")
    with _parallel.gc_paused():
        return _export(source, out, limit, progress)


def _export(source: str, out: str, limit: int, progress: bool | None) -> str:
    index = _format.open_checkpoint(source)
    keys = list(index.variables)
    entries = [(k, st.np_dtype(index.variables[k].dtype), index.variables[k].shape) for k in keys]
    sizes = [math.prod(shape) * dtype.itemsize for _, dtype, shape in entries]
    shards = shard_entries(entries, sizes, limit)
    n = len(shards)
    names = [hf_shard_file(k + 1, n) for k in range(n)]
    if os.path.isdir(out) and os.path.samefile(out, index.folder or "."):
        clash = sorted(set(names) & set(index.files))
        if clash:
            raise InvalidArgumentError(
                f"export_hf: exporting {source!r} into its own folder would overwrite {clash[0]!r}: pick another out_dir")
    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(index.variables[key].file, []).append(key)
    readers: dict[str, st.SafetensorsReader] = {}
    written: list[str] = []
    index_path = os.path.join(out, _format.HF_INDEX)
    doing = f"creating the folder {out!r}"
    meter: Any = _progress.bar(sum(sizes), f"exporting {os.path.basename(index.prefix)}", progress)
    try:
        for name, file_keys in by_file.items():  # every source header validated before a byte is written
            readers[name] = _format.open_data(index, name, file_keys)
        if os.path.lexists(out) and not os.path.isdir(out):
            doing += " (a file of that name is in the way)"
        os.makedirs(out, exist_ok=True)
        doing = f"removing stale temporary files in {out!r}"
        _atomic.remove_stale_temps(out)
        old: list[str] = []
        if os.path.lexists(index_path):  # an earlier export: retire its index first
            old = _old_shards(index_path)
            doing = f"retiring the old {_format.HF_INDEX}"
            os.unlink(index_path)
            _atomic.fsync_dir(out)
        lock_meter = _progress.Shared(meter)

        def write(k: int) -> st.FileRecord:
            buffer = np.empty(st.CHUNK_BYTES, np.uint8)
            with st.SafetensorsWriter(os.path.join(out, names[k]), shards[k], metadata=HF_METADATA) as writer:
                for key, _, _ in shards[k]:
                    entry = index.variables[key]
                    writer.write(key, readers[entry.file].read_chunks(key, buffer, expected_checksum=entry.checksum))
                    lock_meter.update(writer.infos[key].nbytes)
                return writer.commit()

        doing = "writing the shards"
        write_in_parallel(names, write, written, lambda name, exc: _error(source, out, f"writing {name}", exc))
        weight_map = {key: names[k] for k, shard in enumerate(shards) for key, _, _ in shard}
        body = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        doing = f"writing {_format.HF_INDEX} (the commit)"
        _atomic.write_bytes(index_path, (json.dumps(body, indent=2) + "\n").encode())
        for name in old:  # committed: the earlier export's other shards (best effort)
            if name not in names:
                try:
                    _atomic.unlink_quiet(os.path.join(out, name))
                except OSError:
                    pass
    except BaseException as exc:
        for name in written:
            try:
                os.unlink(os.path.join(out, name))
            except OSError:
                pass
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise _error(source, out, doing, exc) from exc
        raise
    finally:
        meter.close()
        for reader in readers.values():
            reader.close()
    return index_path


def _old_shards(index_path: str) -> list[str]:
    """The shard names an earlier export's index lists that look like an export's shards
    (never anything else of the folder), or none when it does not parse."""
    try:
        obj = _format.read_json(index_path, "safetensors index")
    except CheckpointError:
        return []
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict):
        return []
    return sorted({v for v in weight_map.values()
                   if isinstance(v, str) and _format.shard_base(v) == "model" and "/" not in v and "\\" not in v})
