"""Checkpoints: safetensors data, a JSON device map and a JSON index that commits them.

The package in layers (each module imports only from the rows below it)::

    saver.py, load.py        Saver (retention, the folder's state file); load_checkpoint, CheckpointReader
    export.py                export_hf: a checkpoint as a Hugging Face sharded folder
    _async.py                the future of an asynchronous save, its thread, the wait at exit
    _write.py, _restore.py   pin the values at the call, write and commit them (the data file whole or in
                             shards, in parallel); validate one and stream it back
    _saveable.py             one adapter per kind of variable: the only way to the variables
    _transfer.py             bytes between one variable's storage and a file
    _state.py, _format.py    the state file's schema; the index's and device map's schema and file names
    _stformat.py             the safetensors byte format
    _atomic.py               temporary names, fsync, rename; reading regular files only
    policy.py, _parallel.py, _progress.py   options, I/O threads, progress bars
"""

from gpuvars.checkpoint.export import export_hf
from gpuvars.checkpoint.load import CheckpointReader, LoadedCheckpoint, load_checkpoint
from gpuvars.checkpoint.policy import SaveOptions, VariablePolicy
from gpuvars.checkpoint.saver import (
    CheckpointState,
    RestoreResult,
    SaveFuture,
    Saver,
    get_checkpoint_state,
    latest_checkpoint,
)

__all__ = [
    "CheckpointReader",
    "CheckpointState",
    "LoadedCheckpoint",
    "RestoreResult",
    "SaveFuture",
    "SaveOptions",
    "Saver",
    "VariablePolicy",
    "export_hf",
    "get_checkpoint_state",
    "latest_checkpoint",
    "load_checkpoint",
]
