"""Checkpoints: safetensors data, a JSON device map and a JSON index that commits them."""

from gpuvars.checkpoint.load import CheckpointReader, LoadedCheckpoint, load_checkpoint
from gpuvars.checkpoint.policy import SaveOptions, VariablePolicy
from gpuvars.checkpoint.saver import (
    CheckpointState,
    RestoreResult,
    Saver,
    get_checkpoint_state,
    latest_checkpoint,
)

__all__ = [
    "CheckpointReader",
    "CheckpointState",
    "LoadedCheckpoint",
    "RestoreResult",
    "SaveOptions",
    "Saver",
    "VariablePolicy",
    "get_checkpoint_state",
    "latest_checkpoint",
    "load_checkpoint",
]
