"""The one exception hierarchy of gpuvars.

Every error gpuvars raises on purpose is a :class:`GpuvarsError`; each class also
derives from the builtin that fits, so ``except ValueError`` keeps working for code
that does not know gpuvars::

    GpuvarsError(Exception)
    ├── InvalidArgumentError(ValueError)        bad argument, shape or dtype mismatch
    ├── UninitializedVariableError(RuntimeError) a read before initialization
    ├── DevicePlacementError(ValueError)         no such device (soft placement off)
    ├── TransferGuardError(RuntimeError)         an implicit copy under transfer_guard("disallow")
    ├── ResourceExhaustedError(MemoryError)      a device ran out of memory
    ├── BackendError(RuntimeError)               any other failure inside numpy/CuPy/JAX
    ├── SerializationError(TypeError)            pickling a variable (gpuvars never pickles)
    ├── DistributedError(RuntimeError)           a multi-process step failed or timed out (names the processes)
    └── CheckpointError                          a missing, damaged or mismatched checkpoint
        ├── CheckpointNotFoundError(FileNotFoundError)
        ├── CheckpointCorruptError(ValueError)   header, size or checksum damage
        ├── CheckpointMismatchError(ValueError)  keys, shapes or dtypes differ from the variables
        └── CheckpointWriteError(OSError)        a save's file system failed (no space, no permission)

``PlacementWarning(UserWarning)`` is the warning soft placement emits when it falls back.
Messages name the variable, device, file or key at fault, and say what was expected and
what was received.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "CheckpointCommitError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "DevicePlacementError",
    "DistributedError",
    "GpuvarsError",
    "InvalidArgumentError",
    "PlacementWarning",
    "ResourceExhaustedError",
    "SerializationError",
    "TransferGuardError",
    "UninitializedVariableError",
]


class GpuvarsError(Exception):
    """Base class of every error gpuvars raises on purpose."""


class InvalidArgumentError(GpuvarsError, ValueError):
    """An argument is of the wrong kind, shape or dtype (TF's InvalidArgumentError)."""


class UninitializedVariableError(GpuvarsError, RuntimeError):
    """A variable was read (or used in an expression) before it was initialized."""


class DevicePlacementError(GpuvarsError, ValueError):
    """A device specification names no device of this process and soft placement is off."""


class TransferGuardError(GpuvarsError, RuntimeError):
    """An implicit host-to-device or device-to-device copy under ``transfer_guard("disallow")``."""


class ResourceExhaustedError(GpuvarsError, MemoryError):
    """A device (or the host) ran out of memory while allocating or copying."""


class BackendError(GpuvarsError, RuntimeError):
    """numpy, CuPy or JAX failed in a way gpuvars has no more specific class for."""


class SerializationError(GpuvarsError, TypeError):
    """An object was pickled: gpuvars never uses pickle; save with gv.Saver instead."""


class DistributedError(GpuvarsError, RuntimeError):
    """A multi-process operation (start, barrier, key-value read, collective) failed or timed
    out; ``processes`` holds the ids of the processes at fault where they are known."""

    def __init__(self, message: str, processes: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.processes = tuple(processes)


class CheckpointError(GpuvarsError):
    """A checkpoint is missing, damaged or does not match the variables; names the file and key."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint exists at the prefix (or one of its files is gone)."""


class CheckpointCorruptError(CheckpointError, ValueError):
    """A checkpoint file's bytes are damaged: bad header, wrong size or failed checksum."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint's keys, shapes or dtypes do not match what the restore asked for."""


class CheckpointCommitError(CheckpointError, DistributedError):
    """A save across processes committed nothing: a process failed, was late, or saved
    something else than process 0; ``processes`` holds their ids. Every process of the
    group raises it with the same message (DESIGN "Beyond one machine")."""


class CheckpointWriteError(CheckpointError, OSError):
    """Saving failed in the file system (no space, a file too large, no permission, a folder
    that is a file); ``errno`` is the failing call's. Names the prefix and the file; nothing
    of the failed save is visible; ``step`` says which step failed and why, without the prefix."""

    step: str | None = None


class PlacementWarning(UserWarning):
    """Soft placement moved a request for an unavailable device to one that exists."""
