"""Several processes (one per host or per GPU) on JAX's distributed runtime.

``gv.distributed.initialize()`` joins the group (arguments or the launcher's environment);
``barrier`` and ``kv_put``/``kv_get`` coordinate through JAX's coordination service, each
with a timeout; ``gv.MultiWorkerMirroredStrategy`` mirrors variables over every process.
``python -m gpuvars launch -n N script.py`` runs a script in N local processes.
"""

from gpuvars.distributed._mirrored import MultiWorkerMirroredStrategy
from gpuvars.distributed._runtime import (
    barrier,
    initialize,
    is_initialized,
    kv_get,
    kv_put,
    num_processes,
    process_id,
    shutdown,
)

__all__ = [
    "MultiWorkerMirroredStrategy",
    "barrier",
    "initialize",
    "is_initialized",
    "kv_get",
    "kv_put",
    "num_processes",
    "process_id",
    "shutdown",
]
