"""Tasks in device specs: ``/job:worker/task:K`` names process K's devices.

Without a process group this process is task 0 of job ``worker`` (and
``/job:localhost/replica:0/task:0``). The group cases are checked here on one process
by standing in for the runtime's answers (process id, count, JAX's device counts); the
real two-process run is in ``test_multiprocess.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from typing import Iterator

import numpy as np
import pytest

import gpuvars as gv
from gpuvars import config, placement
from gpuvars.distributed import _runtime

LOCAL_NAMES = [
    "/job:worker/task:0/cpu:0",
    "/job:worker/replica:0/task:0/device:CPU:0",
    "/task:0/cpu:0",
    "/job:worker/cpu:0",
    "/job:localhost/replica:0/task:0/cpu:0",
    "/job:localhost/cpu:0",
]


# --- without a process group: this process is task 0 -----------------------------------


@pytest.mark.parametrize("spec", LOCAL_NAMES)
def test_task_0_of_job_worker_is_this_process(spec: str) -> None:
    v = gv.Variable(np.ones(2, np.float32), name="w", device=spec)  # no warning (warnings are errors)
    assert v.device == "/cpu:0"


def test_a_task_scope_merges_with_an_inner_device(four_cpus: str) -> None:
    with gv.device("/job:worker/task:0"), gv.device("/cpu:2"):
        v = gv.Variable(1.0, name="w")
    assert v.device == "/cpu:2"


def test_list_devices_of_all_processes_without_a_group_is_this_process_as_task_0(four_cpus: str) -> None:
    local = gv.list_devices()
    assert local[:4] == ["/cpu:0", "/cpu:1", "/cpu:2", "/cpu:3"]
    assert gv.list_devices(all_processes=True) == [f"/job:worker/task:0{name}" for name in local]


def test_another_task_without_a_group_is_soft_placements_case() -> None:
    with pytest.warns(gv.PlacementWarning) as record:
        v = gv.Variable(1.0, name="w", device="/job:worker/task:1/cpu:0")
    assert v.device == "/cpu:0"
    text = str(record[0].message)
    assert "'/job:worker/task:1/cpu:0' is not available" in text
    assert "there is no task 1 (task 0 only)" in text and "also named /job:worker/task:0" in text
    assert "using '/cpu:0' instead" in text
    config.set_soft_device_placement(False)
    with pytest.raises(gv.DevicePlacementError) as info:
        gv.Variable(1.0, name="weights", device="/job:worker/task:1/cpu:0")
    text = str(info.value)
    assert "'/job:worker/task:1/cpu:0' for variable 'weights'" in text and "there is no task 1" in text


def test_placing_by_task_needs_no_gpu_library() -> None:
    code = (
        "import sys, gpuvars as gv\n"
        "v = gv.Variable(1.0, name='w', device='/job:worker/task:0/cpu:0')\n"
        "assert v.device == '/cpu:0', v.device\n"
        "print(sorted(m for m in ('jax', 'cupy') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_device_spec_without_a_group_stays_localhost() -> None:
    assert placement.resolve("/cpu:0").spec.to_string() == "/job:localhost/replica:0/task:0/device:CPU:0"


# --- in a group (process 1 of 2, the runtime's answers stood in for) -----------------------


@pytest.fixture
def process_1_of_2(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(_runtime, "is_initialized", lambda: True)
    monkeypatch.setattr(_runtime, "process_id", lambda: 1)
    monkeypatch.setattr(_runtime, "num_processes", lambda: 2)
    yield


@pytest.mark.parametrize("spec", ["/job:worker/task:1/cpu:0", "/job:worker/replica:0/task:1/device:CPU:0",
                                  "/task:1/cpu:0", "/cpu:0", "/job:worker/cpu:0", "/job:localhost/cpu:0"])
def test_in_a_group_this_process_is_its_own_task(process_1_of_2: None, spec: str) -> None:
    v = gv.Variable(1.0, name="w", device=spec)
    assert v.device == "/cpu:0"


def test_in_a_group_a_device_spec_names_the_task(process_1_of_2: None) -> None:
    device = placement.resolve("/cpu:0")
    assert device.spec.to_string() == "/job:worker/replica:0/task:1/device:CPU:0"
    assert placement.resolve(device.spec) is device  # a full spec resolves back to the device
    strategy = gv.MirroredStrategy(["/cpu:0"])  # its replicas are placed by their full specs
    with strategy.scope():
        w = gv.Variable(np.zeros(2, np.float32), name="w")
    assert w.values[0].device == "/cpu:0"


def test_another_tasks_device_under_soft_placement_warns_and_places_locally(
    process_1_of_2: None, four_cpus: str
) -> None:
    with pytest.warns(gv.PlacementWarning) as record:
        v = gv.Variable(1.0, name="w", device="/job:worker/task:0/cpu:2")
    assert v.device == "/cpu:2"  # this process's device of the same name
    (w,) = record
    text = str(w.message)
    assert "'/job:worker/task:0/cpu:2' is not available" in text
    assert "it is a device of task 0, another process" in text and "this process is /job:worker/task:1" in text
    assert "using '/cpu:2' instead" in text
    assert w.filename == __file__
    with pytest.warns(gv.PlacementWarning, match=re.escape("task 0, another process") + ".*using '/cpu:0'"):
        u = gv.Variable(1.0, name="u", device="/job:worker/task:0/cpu:9")  # none of that name here
    assert u.device == "/cpu:0"


def test_another_tasks_device_without_soft_placement_is_an_error(process_1_of_2: None) -> None:
    config.set_soft_device_placement(False)
    with pytest.raises(gv.DevicePlacementError) as info:
        gv.Variable(1.0, name="weights", device="/job:worker/task:0/cpu:0")
    text = str(info.value)
    assert "'/job:worker/task:0/cpu:0' for variable 'weights'" in text
    assert "it is a device of task 0, another process" in text and "/job:worker/task:1" in text
    assert "Available devices: ['/cpu:0'" in text
    assert gv.global_variables() == []


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("/job:ps/task:0/cpu:0", "there is no job 'ps'"),
        ("/job:ps", "there is no job 'ps'"),
        ("/job:worker/task:2/cpu:0", "there is no task 2 (tasks 0 to 1)"),
        ("/task:5", "there is no task 5 (tasks 0 to 1)"),
        ("/job:worker/replica:1/task:1/cpu:0", "there is no replica 1"),
        ("/job:localhost/task:1/cpu:0", "job 'localhost' is this process alone"),
    ],
)
@pytest.mark.parametrize("soft", [True, False])
def test_in_a_group_a_name_outside_it_is_an_error_saying_what_exists(
    process_1_of_2: None, spec: str, problem: str, soft: bool
) -> None:
    config.set_soft_device_placement(soft)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # soft placement does not apply: no fallback, no warning
        with pytest.raises(gv.DevicePlacementError) as info:
            gv.Variable(1.0, name="w", device=spec)
    text = str(info.value)
    assert f"'{gv.DeviceSpec.from_string(spec).short_string()}' for variable 'w'" in text
    assert problem in text
    assert "job 'worker' with tasks 0 to 1" in text and "this process is /job:worker/task:1" in text
    assert "every process's: ['/job:worker/task:0/cpu:0', '/job:worker/task:1/cpu:0']" in text


def test_list_devices_of_all_processes_with_numpy_cpus(process_1_of_2: None, monkeypatch: pytest.MonkeyPatch) -> None:
    config.set_logical_devices("cpu", 3)

    def counts(platform: str) -> list[int]:
        raise AssertionError(f"JAX's {platform} list does not describe numpy's devices")

    monkeypatch.setattr(_runtime, "device_counts", counts)
    names = gv.list_devices(all_processes=True)
    # numpy serves the CPUs: each process has as many as this one (the same configuration)
    cpus = [n for n in names if "/cpu:" in n]
    assert cpus == [f"/job:worker/task:{k}/cpu:{i}" for k in range(2) for i in range(3)]
    assert [n for n in names if n.startswith("/job:worker/task:1/")] == \
        [f"/job:worker/task:1{n}" for n in gv.list_devices()]


def test_list_devices_of_all_processes_reads_jax_counts_for_jax_cpus(
    process_1_of_2: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("jax")
    config.set_cpu_backend("jax")
    config.set_logical_devices("cpu", 2)
    asked: list[str] = []

    def counts(platform: str) -> list[int]:
        asked.append(platform)
        return [3, 4]

    monkeypatch.setattr(_runtime, "device_counts", counts)
    names = gv.list_devices(all_processes=True)
    cpus = [n for n in names if "/cpu:" in n]
    # task 0: JAX's 3, capped by the 2 logical devices every process asks for; task 1: this table
    assert cpus == ["/job:worker/task:0/cpu:0", "/job:worker/task:0/cpu:1",
                    "/job:worker/task:1/cpu:0", "/job:worker/task:1/cpu:1"]
    assert "cpu" in asked
