"""Distribution: MirroredStrategy with mirrored and sync-on-read variables, and sharded variables."""

from gpuvars.distribute._context import PerReplica, ReduceOp, ReplicaContext, get_replica_context, get_strategy
from gpuvars.distribute.sharded import (
    FixedShardsPartitioner,
    MaxSizePartitioner,
    MinSizePartitioner,
    Partitioner,
    ShardedVariable,
)
from gpuvars.distribute.strategy import MirroredStrategy
from gpuvars.distribute.values import DistributedVariable, MirroredVariable, SyncOnReadVariable

__all__ = [
    "DistributedVariable",
    "FixedShardsPartitioner",
    "MaxSizePartitioner",
    "MinSizePartitioner",
    "MirroredStrategy",
    "MirroredVariable",
    "Partitioner",
    "PerReplica",
    "ReduceOp",
    "ReplicaContext",
    "ShardedVariable",
    "SyncOnReadVariable",
    "get_replica_context",
    "get_strategy",
]
