"""gpuvars: TensorFlow-style variables for numpy, CuPy and JAX.

A variable lives on the device it was placed on (``/cpu:0`` -> numpy, ``/gpu:N`` -> CuPy
or JAX); every op that mutates it runs there. ``import gpuvars`` imports neither cupy
nor jax: a GPU library is imported when a device it serves is first asked for.
"""

from gpuvars import config, initializers
from gpuvars.checkpoint import (
    CheckpointReader,
    CheckpointState,
    LoadedCheckpoint,
    RestoreResult,
    SaveFuture,
    SaveOptions,
    Saver,
    VariablePolicy,
    get_checkpoint_state,
    latest_checkpoint,
    load_checkpoint,
)
from gpuvars.devices import DeviceSpec, device, replica_device_setter
from gpuvars.distribute import (
    FixedShardsPartitioner,
    MaxSizePartitioner,
    MinSizePartitioner,
    MirroredStrategy,
    MirroredVariable,
    Partitioner,
    PerReplica,
    ReduceOp,
    ReplicaContext,
    ShardedVariable,
    SyncOnReadVariable,
    get_replica_context,
    get_strategy,
)
from gpuvars.errors import (
    BackendError,
    CheckpointCommitError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    DevicePlacementError,
    DistributedError,
    GpuvarsError,
    InvalidArgumentError,
    PlacementWarning,
    ResourceExhaustedError,
    SerializationError,
    TransferGuardError,
    UninitializedVariableError,
)
from gpuvars.initializers import (
    constant,
    ones,
    random_normal,
    random_uniform,
    set_random_seed,
    truncated_normal,
    zeros,
)
from gpuvars._creator import variable_creator_scope
from gpuvars._transfer import copy_to
from gpuvars.init_ops import (
    Op,
    global_variables_initializer,
    is_variable_initialized,
    report_uninitialized_variables,
    variables_initializer,
)
from gpuvars.placement import list_devices
from gpuvars.registry import Registry, RegistryMember, global_variables, trainable_variables
from gpuvars.variable import Variable, VariableAggregation, VariableSynchronization
from gpuvars import optim  # after everything it builds on
from gpuvars import distributed
from gpuvars.distributed import MultiWorkerMirroredStrategy

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CheckpointCommitError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointState",
    "CheckpointWriteError",
    "DevicePlacementError",
    "DeviceSpec",
    "DistributedError",
    "FixedShardsPartitioner",
    "GpuvarsError",
    "InvalidArgumentError",
    "LoadedCheckpoint",
    "MaxSizePartitioner",
    "MinSizePartitioner",
    "MirroredStrategy",
    "MirroredVariable",
    "MultiWorkerMirroredStrategy",
    "Op",
    "Partitioner",
    "PerReplica",
    "PlacementWarning",
    "ReduceOp",
    "Registry",
    "RegistryMember",
    "ReplicaContext",
    "ResourceExhaustedError",
    "RestoreResult",
    "SaveFuture",
    "SaveOptions",
    "Saver",
    "SerializationError",
    "ShardedVariable",
    "SyncOnReadVariable",
    "TransferGuardError",
    "UninitializedVariableError",
    "Variable",
    "VariableAggregation",
    "VariablePolicy",
    "VariableSynchronization",
    "config",
    "constant",
    "copy_to",
    "device",
    "distributed",
    "get_checkpoint_state",
    "get_replica_context",
    "get_strategy",
    "global_variables",
    "global_variables_initializer",
    "initializers",
    "is_variable_initialized",
    "latest_checkpoint",
    "list_devices",
    "load_checkpoint",
    "ones",
    "optim",
    "random_normal",
    "random_uniform",
    "replica_device_setter",
    "report_uninitialized_variables",
    "set_random_seed",
    "trainable_variables",
    "truncated_normal",
    "variable_creator_scope",
    "variables_initializer",
    "zeros",
]


def _publish() -> None:
    """Public classes and functions report the module users import them from (``gpuvars``),
    so reprs, tracebacks and documentation name ``gpuvars.Variable``, not its file."""
    import types as _types

    for _name in __all__:
        _obj = globals()[_name]
        if isinstance(_obj, (type, _types.FunctionType)) and _obj.__module__.startswith("gpuvars."):
            _obj.__module__ = "gpuvars"


_publish()
