"""gpuvars: TensorFlow-style variables for numpy, CuPy and JAX.

A variable lives on the device it was placed on (``/cpu:0`` -> numpy, ``/gpu:N`` -> CuPy
or JAX); every op that mutates it runs there. ``import gpuvars`` imports neither cupy
nor jax: a GPU library is imported when a device it serves is first asked for.
"""

from gpuvars import config, initializers
from gpuvars.checkpoint import (
    CheckpointReader,
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
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    DevicePlacementError,
    GpuvarsError,
    InvalidArgumentError,
    PlacementWarning,
    ResourceExhaustedError,
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
from gpuvars.placement import copy_to, list_devices
from gpuvars.registry import Registry, global_variables, trainable_variables
from gpuvars.variable import (
    Op,
    Variable,
    VariableAggregation,
    VariableSynchronization,
    global_variables_initializer,
    is_variable_initialized,
    report_uninitialized_variables,
    variables_initializer,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointWriteError",
    "DevicePlacementError",
    "DeviceSpec",
    "FixedShardsPartitioner",
    "GpuvarsError",
    "InvalidArgumentError",
    "MaxSizePartitioner",
    "MinSizePartitioner",
    "MirroredStrategy",
    "MirroredVariable",
    "Op",
    "Partitioner",
    "PerReplica",
    "PlacementWarning",
    "ReduceOp",
    "Registry",
    "ReplicaContext",
    "ResourceExhaustedError",
    "SaveOptions",
    "Saver",
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
    "random_normal",
    "random_uniform",
    "replica_device_setter",
    "report_uninitialized_variables",
    "set_random_seed",
    "trainable_variables",
    "truncated_normal",
    "variables_initializer",
    "zeros",
]
