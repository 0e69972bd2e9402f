"""Device specs become physical devices here, once, with TF's soft placement rules.

Without a process group this process is ``/job:localhost/replica:0/task:0``, also named
``/job:worker/task:0``. In a group (``gv.distributed.initialize``) the processes are the
tasks of job ``worker``: ``/job:worker/task:K`` names process K's devices, and a spec with
no job or task names this process's. A variable lives on a device of its own process only:
another task's device is soft placement's case. ``/cpu:N`` is served by the CPU backend
(numpy, or JAX's CPU devices), ``/gpu:N`` by the GPU backend (CuPy if usable, else JAX).
GPU libraries are imported only when a GPU device (or the default device, or the device
list) is first asked for; a spec naming no job or task never asks the process group.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings

import gpuvars_backends as backends
from gpuvars_backends import Backend
from gpuvars import config
from gpuvars.devices import DeviceSpec
from gpuvars.errors import DevicePlacementError, DistributedError, PlacementWarning

__all__ = ["PhysicalDevice", "default_device", "devices_of_platform", "host_device", "list_devices", "resolve"]


@dataclasses.dataclass(frozen=True, eq=False)
class PhysicalDevice:
    """One device of this process: ``kind`` ("cpu"/"gpu"), ``index`` and the backend serving it.

    There is exactly one instance per device, so identity is equality.
    """

    kind: str
    index: int
    backend: Backend
    #: the index the backend knows it by (numpy's logical devices all map to host 0)
    backend_index: int

    @property
    def name(self) -> str:
        """The short canonical name, e.g. ``/gpu:1``."""
        return f"/{self.kind}:{self.index}"

    @property
    def spec(self) -> DeviceSpec:
        """The full TF spec of this device: ``/job:localhost/replica:0/task:0/...`` without a
        process group, ``/job:worker/replica:0/task:K/...`` as process K of one."""
        group = _group()
        job, task = ("worker", group.me) if group.joined else ("localhost", 0)
        return DeviceSpec(job=job, replica=0, task=task, device_type=self.kind.upper(), device_index=self.index)

    def __repr__(self) -> str:
        return f"PhysicalDevice({self.name}, backend={self.backend.name})"


class _Table:
    """The device table of this process, built lazily per platform and then fixed."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.cpus: list[PhysicalDevice] | None = None
        self.gpus: list[PhysicalDevice] | None = None
        self.gpu_reason = ""
        self.gpu_library = ""  # the library serving the GPUs ("" when none does)

    def cpu_devices(self) -> list[PhysicalDevice]:
        with self.lock:
            if self.cpus is None:
                config._freeze()
                self.cpus = _build_cpus()
            return self.cpus

    def gpu_devices(self) -> list[PhysicalDevice]:
        with self.lock:
            if self.gpus is None:
                # CPUs first: probing JAX's GPUs starts JAX, which fixes its CPU device count
                self.cpu_devices()
                self.gpus, self.gpu_reason, self.gpu_library = _build_gpus()
            return self.gpus


def _build_cpus() -> list[PhysicalDevice]:
    library = config.get_cpu_backend()
    logical = config.get_logical_devices()
    if library == "numpy":
        numpy_backend = backends.get("numpy", "cpu")
        return [PhysicalDevice("cpu", i, numpy_backend, 0) for i in range(logical or 1)]
    if logical is not None:
        backends.request_cpu_devices("jax", logical)
    probe = backends.probe("jax", "cpu")
    if probe.backend is None:
        raise DevicePlacementError(f"the CPU backend is set to 'jax' but JAX is not usable: {probe.reason}")
    if logical is None:
        return [PhysicalDevice("cpu", i, probe.backend, i) for i in range(probe.count)]
    if probe.count < logical:
        raise DevicePlacementError(
            f"set_logical_devices('cpu', {logical}) asks for {logical} JAX CPU devices, but JAX started "
            f"with {probe.count}; JAX fixes the count when it starts, so set it first "
            f"(XLA_FLAGS=--xla_force_host_platform_device_count={logical} before importing jax)"
        )
    return [PhysicalDevice("cpu", i, probe.backend, i) for i in range(logical)]


def _build_gpus() -> tuple[list[PhysicalDevice], str, str]:
    choice = config.get_gpu_backend()
    reasons = []
    for library in (choice,) if choice else ("cupy", "jax"):
        probe = backends.probe(library, "gpu")
        if probe.backend is not None:
            return [PhysicalDevice("gpu", i, probe.backend, i) for i in range(probe.count)], "", library
        reasons.append(probe.reason)
    return [], "no GPU (" + "; ".join(reasons) + ")", ""


_table = _Table()


def list_devices(*, all_processes: bool = False) -> list[str]:
    """The devices of this process, or of every process of the group, CPUs first.

    Args:
        all_processes: list every process's devices, in process order, each named with
            its task: ``/job:worker/task:K/cpu:0``. Without a process group that is this
            process's devices as task 0. Another process's devices come from JAX's global
            device list where JAX serves them (JAX CPU devices, JAX GPUs); where numpy or
            CuPy serves them, each process is taken to have as many as this one (every
            process of a launch runs the same configuration).

    Returns:
        Canonical short names: ``["/cpu:0", "/gpu:0", ...]`` for this process, or
        ``["/job:worker/task:0/cpu:0", ..., "/job:worker/task:1/cpu:0", ...]``.

    Raises:
        DistributedError: the group's device list could not be read from JAX.

    Example:
        >>> import gpuvars as gv
        >>> gv.list_devices()[0]
        '/cpu:0'
        >>> gv.list_devices(all_processes=True)[0]        # no process group: this is task 0
        '/job:worker/task:0/cpu:0'
    """
    cpus, gpus = _table.cpu_devices(), _table.gpu_devices()
    if not all_processes:
        return [d.name for d in cpus + gpus]
    group = _group()
    cpu_counts, gpu_counts = [len(cpus)] * group.size, [len(gpus)] * group.size
    if group.size > 1:
        from gpuvars.distributed import _runtime  # lazy: see _group

        logical = config.get_logical_devices()
        if config.get_cpu_backend() == "jax":  # JAX serves the CPUs: its global list has every process's
            cpu_counts = [min(c, logical) if logical else c for c in _runtime.device_counts("cpu")]
        if _table.gpu_library == "jax":
            gpu_counts = _runtime.device_counts("gpu")
        cpu_counts[group.me], gpu_counts[group.me] = len(cpus), len(gpus)  # this process: its own table
    names: list[str] = []
    for task in range(group.size):
        for kind, count in (("CPU", cpu_counts[task]), ("GPU", gpu_counts[task])):
            names.extend(
                DeviceSpec(job="worker", task=task, device_type=kind, device_index=i).short_string()
                for i in range(count)
            )
    return names


def default_device() -> PhysicalDevice:
    """Where a variable goes with no device asked for: ``/gpu:0`` if a GPU is usable, else ``/cpu:0``."""
    gpus = _table.gpu_devices()
    return gpus[0] if gpus else _table.cpu_devices()[0]


@dataclasses.dataclass(frozen=True)
class _Group:
    """This process's place in the process group (task 0 of 1 without one)."""

    me: int
    size: int
    joined: bool

    def what_exists(self) -> str:
        if not self.joined:
            return ("this process is /job:localhost/replica:0/task:0, also named /job:worker/task:0, "
                    "and is in no process group")
        return (f"the process group is job 'worker' with tasks 0 to {self.size - 1} "
                f"(/job:worker/task:0 to /job:worker/task:{self.size - 1}); this process is "
                f"/job:worker/task:{self.me}, also named /job:localhost")


def _group() -> _Group:
    # Imported here, not at the top: gpuvars.distributed's package imports the strategies,
    # which import variable, which imports this module.
    from gpuvars.distributed import _runtime

    return _Group(_runtime.process_id(), _runtime.num_processes(), _runtime.is_initialized())


def _task_of(spec: DeviceSpec, group: _Group) -> tuple[int | None, str]:
    """The task (process) ``spec`` names, or None and which of its fields names none."""
    if spec.replica not in (None, 0):
        return None, f"there is no replica {spec.replica} (each task is replica 0)"
    if spec.job == "localhost":
        if spec.task in (None, 0):
            return group.me, ""
        return None, f"job 'localhost' is this process alone (task 0), not task {spec.task}"
    if spec.job not in (None, "worker"):
        return None, f"there is no job {spec.job!r}"
    if spec.task is None:
        return group.me, ""
    if spec.task < group.size:
        return spec.task, ""
    tasks = "task 0 only" if group.size == 1 else f"tasks 0 to {group.size - 1}"
    return None, f"there is no task {spec.task} ({tasks})"


def _available(spec: DeviceSpec) -> tuple[PhysicalDevice | None, str]:
    """The device of this process that ``spec``'s type and index name, or None and why not."""
    dtype = spec.device_type
    if dtype is None:
        return default_device(), ""
    if dtype not in ("CPU", "GPU"):
        return None, f"device type {dtype!r} is not served by gpuvars (CPU and GPU are)"
    pool = _table.cpu_devices() if dtype == "CPU" else _table.gpu_devices()
    index = spec.device_index or 0
    if index < len(pool):
        return pool[index], ""
    if not pool:
        return None, _table.gpu_reason
    return None, f"this process has {len(pool)} {dtype} device(s)"


def resolve(spec: DeviceSpec | str | None, what: str = "a variable", stacklevel: int = 1) -> PhysicalDevice:
    """The physical device for ``spec`` (None: the default device), applying soft placement.

    Another task's device (``/job:worker/task:K``, K another process of the group) is
    soft placement's case: a warning naming the task and the local device used instead,
    or, soft placement off, an error. A job or task that names no process of the group is
    an error whatever soft placement says; without a group it is soft placement's case,
    as any other unavailable device.

    Args:
        spec: a DeviceSpec, a device string, or None.
        what: the thing being placed, for messages (e.g. "variable 'w'").
        stacklevel: the frame a fallback warning points at: 1 is the caller of ``resolve``,
            2 its caller, and so on (so it can point at user code).

    Raises:
        DevicePlacementError: the device does not exist and soft placement is off, or it
            names no process of the group.
    """
    if spec is None:
        return default_device()
    if isinstance(spec, str):
        spec = DeviceSpec.from_string(spec)
    with _table.lock:
        remote = False
        if spec.job is None and spec.task is None and spec.replica is None:  # the common case: no group asked
            device, reason = _available(spec)
        else:
            group = _group()
            task, problem = _task_of(spec, group)
            if task == group.me:
                device, reason = _available(spec)
            elif task is not None:
                device, remote = None, True
                reason = (f"it is a device of task {task}, another process; this process is "
                          f"/job:worker/task:{group.me} and a variable lives on its own process's devices")
            elif group.joined:
                raise DevicePlacementError(
                    f"Could not satisfy device specification '{spec.short_string()}' for {what}: {problem}; "
                    f"{group.what_exists()}. Soft placement does not apply to a device outside the group. "
                    f"This process's devices: {list_devices()}; every process's: {_every_processs_devices()}"
                )
            else:
                device, reason = None, f"it names another job, replica or task than this process: {problem}; {group.what_exists()}"
        if device is not None:
            return device
        existing = list_devices()
        if not config.get_soft_device_placement():
            raise DevicePlacementError(
                f"Could not satisfy device specification '{spec.short_string()}' for {what}: {reason}. "
                f"Soft placement is off (gv.config.set_soft_device_placement(True) would fall back). "
                f"Available devices: {existing}"
            )
        fallback = _fallback(spec, remote)
    warnings.warn(
        # the message names the spec, not the variable: Python shows it once per spec and line
        f"Soft device placement: '{spec.short_string()}' is not available ({reason}); "
        f"using '{fallback.name}' instead. Available devices: {existing}",
        PlacementWarning,
        stacklevel=stacklevel + 1,
    )
    return fallback


def _every_processs_devices() -> str:
    """``list_devices(all_processes=True)`` for an error message, or how to get it if the
    group cannot answer now (the message must still say what went wrong)."""
    try:
        return str(list_devices(all_processes=True))
    except DistributedError as exc:
        return f"gv.list_devices(all_processes=True) (unavailable now: {exc})"


def _fallback(spec: DeviceSpec, remote: bool = False) -> PhysicalDevice:
    """For another task's device, this process's device of the same type and index if it has
    one. Otherwise keep the device type if any device of it exists (index 0); else the
    default device when no type was asked for (another job or task); else ``/cpu:0``."""
    if remote:
        local, _ = _available(spec)
        if local is not None:
            return local
    if spec.device_type is None:
        return default_device()
    pool = _table.gpu_devices() if spec.device_type == "GPU" else _table.cpu_devices()
    return pool[0] if pool else _table.cpu_devices()[0]


def host_device() -> PhysicalDevice:
    """numpy on the host, outside the device table (fixes no setting, imports no GPU library)."""
    return PhysicalDevice("cpu", 0, backends.get("numpy", "cpu"), 0)


def devices_of_platform(platform: str) -> list[PhysicalDevice]:
    """This process's devices of ``platform`` ("cpu" or "gpu"), building the table if needed."""
    return _table.gpu_devices() if platform == "gpu" else _table.cpu_devices()


def _reset_for_tests() -> None:
    """Forget the device table (tests only; variables placed before keep their devices)."""
    global _table
    _table = _Table()
