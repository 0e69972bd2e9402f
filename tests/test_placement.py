"""Placement and process settings: the device table, soft placement, config, transfer guard."""

from __future__ import annotations

import logging
import re
import threading
import warnings

import numpy as np
import pytest

import gpuvars_backends as backends
import gpuvars as gv
from gpuvars import _transfer
from conftest import _gpu_count, jax_device_of, needs_jax
from gpuvars import config, placement

HAS_GPU = _gpu_count()[0] > 0
cpu_only = pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU; the test is about a CPU-only one")


# --- the device table -------------------------------------------------------------------


@cpu_only
def test_list_devices_cpu_only() -> None:
    assert gv.list_devices() == ["/cpu:0"]


def test_list_devices_canonical_short_form(cpu_backend: str) -> None:
    names = gv.list_devices()
    assert names[0] == "/cpu:0"
    assert all(re.fullmatch(r"/(cpu|gpu):\d+", n) for n in names)
    cpus = [n for n in names if n.startswith("/cpu")]
    assert cpus == [f"/cpu:{i}" for i in range(len(cpus))]  # CPUs first, in order


@cpu_only
def test_default_device_is_cpu0_here(cpu_backend: str) -> None:
    assert placement.default_device().name == "/cpu:0"
    v = gv.Variable(1.0, name="v")
    assert v.device == "/cpu:0" and v.backend == cpu_backend


def test_physical_device_spec_is_the_full_form() -> None:
    dev = placement.resolve("/cpu:0")
    assert dev.spec.to_string() == "/job:localhost/replica:0/task:0/device:CPU:0"
    assert dev.name == "/cpu:0" and "numpy" in repr(dev)


@pytest.mark.parametrize(
    "spec",
    ["/cpu:0", "/device:CPU:0", "cpu:0", "/job:localhost/replica:0/task:0/cpu:0", "/cpu", gv.DeviceSpec(device_type="CPU")],
)
def test_resolve_forms_of_this_process(spec: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert placement.resolve(spec).name == "/cpu:0"  # type: ignore[arg-type]


def test_set_logical_devices_gives_distinct_buffers(four_cpus: str) -> None:
    assert gv.list_devices()[:4] == ["/cpu:0", "/cpu:1", "/cpu:2", "/cpu:3"]
    vs = [gv.Variable(np.zeros(3, np.float32), name=f"v{i}", device=f"/cpu:{i}") for i in range(4)]
    assert [v.device for v in vs] == ["/cpu:0", "/cpu:1", "/cpu:2", "/cpu:3"]
    for i, v in enumerate(vs):
        v.assign_add(np.full(3, i, np.float32))
    for i, v in enumerate(vs):
        np.testing.assert_array_equal(v.numpy(), np.full(3, i, np.float32))
    hosts = [np.asarray(v) for v in vs] if four_cpus == "numpy" else []
    for a in hosts:
        assert sum(np.shares_memory(a, b) for b in hosts) == 1


def test_set_logical_devices_validation() -> None:
    with pytest.raises(gv.InvalidArgumentError, match=r"can only split the CPU, got device_type='gpu'"):
        config.set_logical_devices("gpu", 2)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(gv.InvalidArgumentError, match="logical device count must be an int >= 1"):
            config.set_logical_devices("cpu", bad)  # type: ignore[arg-type]
    assert config.get_logical_devices() is None


@pytest.mark.parametrize(
    "setter",
    [
        lambda: config.set_logical_devices("cpu", 2),
        lambda: config.set_gpu_backend("cupy"),
        lambda: config.set_gpu_backend(None),
        lambda: config.set_cpu_backend("numpy"),
    ],
    ids=["set_logical_devices", "set_gpu_backend", "set_gpu_backend-auto", "set_cpu_backend"],
)
@pytest.mark.parametrize("first_use", ["variable", "list_devices"])
def test_device_settings_freeze_at_first_placement(setter: object, first_use: str) -> None:
    if first_use == "variable":
        gv.Variable(1.0, name="v", device="/cpu:0")
    else:
        gv.list_devices()
    with pytest.raises(gv.InvalidArgumentError, match=r"must be set before the first variable is placed"):
        setter()  # type: ignore[operator]


def test_settings_before_first_placement_are_fine() -> None:
    config.set_gpu_backend("jax")
    config.set_gpu_backend(None)
    config.set_cpu_backend("numpy")
    config.set_logical_devices("cpu", 2)
    assert config.get_gpu_backend() is None and config.get_cpu_backend() == "numpy"
    assert gv.list_devices()[:2] == ["/cpu:0", "/cpu:1"]


# --- environment ------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("cupy", "cupy"), (" JAX ", "jax"), ("auto", None), ("", None)])
def test_env_gpu_backend(monkeypatch: pytest.MonkeyPatch, value: str, expected: str | None) -> None:
    monkeypatch.setenv("GPUVARS_GPU_BACKEND", value)
    assert config.get_gpu_backend() == expected


def test_env_gpu_backend_rejects_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUVARS_GPU_BACKEND", "tpu")
    with pytest.raises(gv.InvalidArgumentError, match=r"GPUVARS_GPU_BACKEND='tpu'; expected one of \('cupy', 'jax'\)"):
        config.get_gpu_backend()
    with pytest.raises(gv.InvalidArgumentError, match="GPUVARS_GPU_BACKEND"):
        gv.list_devices()


def test_explicit_setting_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUVARS_GPU_BACKEND", "jax")
    config.set_gpu_backend(None)  # explicit auto
    assert config.get_gpu_backend() is None
    config.set_gpu_backend("cupy")
    assert config.get_gpu_backend() == "cupy"


def test_set_gpu_backend_rejects_unknown() -> None:
    with pytest.raises(gv.InvalidArgumentError, match=r"GPU backend must be one of \('cupy', 'jax'\) or None, got 'torch'"):
        config.set_gpu_backend("torch")


def test_env_cpu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUVARS_CPU_BACKEND", "cupy")
    with pytest.raises(gv.InvalidArgumentError, match=r"GPUVARS_CPU_BACKEND='cupy'; expected one of \('numpy', 'jax'\)"):
        config.get_cpu_backend()
    monkeypatch.setenv("GPUVARS_CPU_BACKEND", "numpy")
    assert config.get_cpu_backend() == "numpy"
    with pytest.raises(gv.InvalidArgumentError, match="CPU backend must be one of"):
        config.set_cpu_backend("cupy")


@needs_jax
def test_gpu_backend_jax_on_cpu_only_machine_says_why() -> None:
    if backends.probe("jax", "gpu").usable:
        pytest.skip("JAX sees a GPU here")
    config.set_gpu_backend("jax")
    config.set_soft_device_placement(False)
    with pytest.raises(gv.DevicePlacementError, match=r"'/gpu:0' for variable 'w': no GPU \(jax sees no GPU"):
        gv.Variable(1.0, name="w", device="/gpu:0")
    assert gv.list_devices() == [d for d in gv.list_devices() if d.startswith("/cpu")]


def test_gpu_backend_cupy_missing_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "cupy", None)
    backends.reset()
    config.set_gpu_backend("cupy")
    config.set_soft_device_placement(False)
    try:
        with pytest.raises(gv.DevicePlacementError, match=r"no GPU \(cupy is not installed\)"):
            gv.Variable(1.0, name="w", device="/gpu:1")
    finally:
        backends.reset()


# --- soft placement ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "shown", "needs_cpu_only"),
    [
        ("/gpu:0", "/gpu:0", True),
        ("/gpu:7", "/gpu:7", False),
        ("/cpu:9", "/cpu:9", False),
        ("/job:ps/task:1", "/job:ps/task:1", False),
        ("/job:localhost/replica:3/cpu:0", "/job:localhost/replica:3/cpu:0", False),
    ],
)
def test_soft_placement_falls_back_with_a_warning(spec: str, shown: str, needs_cpu_only: bool) -> None:
    if needs_cpu_only and HAS_GPU:
        pytest.skip("this machine has a GPU")
    expected = "/cpu:0" if not spec.startswith("/gpu") or not HAS_GPU else "/gpu:0"
    pattern = re.escape(f"'{shown}' is not available") + r".*" + re.escape(f"using '{expected}' instead")
    with pytest.warns(gv.PlacementWarning, match=pattern):
        v = gv.Variable(np.ones(2), name="v", device=spec)
    assert v.device == expected
    np.testing.assert_array_equal(v.numpy(), [1.0, 1.0])


def test_soft_placement_warning_says_why_and_points_at_the_caller() -> None:
    with pytest.warns(gv.PlacementWarning) as record:
        gv.Variable(1.0, name="v", device="/cpu:5")
    (w,) = record
    assert "this process has 1 CPU device(s)" in str(w.message)
    assert "Available devices: ['/cpu:0'" in str(w.message)
    assert w.filename == __file__


def test_soft_placement_warns_once_per_spec_and_line() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        for _ in range(3):
            gv.Variable(1.0, name="v", device="/cpu:5")
    assert len(record) == 1 and record[0].category is gv.PlacementWarning


def test_unsupported_device_type_falls_back() -> None:
    with pytest.warns(gv.PlacementWarning, match=r"'/tpu:0' is not available \(device type 'TPU' is not served"):
        v = gv.Variable(1.0, name="v", device="/tpu:0")
    assert v.device == "/cpu:0"


def test_soft_placement_off_lists_devices_and_names_the_variable() -> None:
    config.set_soft_device_placement(False)
    assert not config.get_soft_device_placement()
    with pytest.raises(gv.DevicePlacementError) as info:
        gv.Variable(1.0, name="weights", device="/cpu:3")
    text = str(info.value)
    assert "'/cpu:3' for variable 'weights'" in text
    assert "Available devices: ['/cpu:0'" in text
    assert isinstance(info.value, ValueError)
    assert gv.global_variables() == []  # the failed variable left nothing behind
    with pytest.raises(gv.DevicePlacementError, match=r"'/job:ps/task:1' for variable 'w'.*another job"):
        gv.Variable(1.0, name="w", device="/job:ps/task:1")


def test_set_soft_device_placement_needs_a_bool() -> None:
    with pytest.raises(gv.InvalidArgumentError, match="expects a bool, got 0"):
        config.set_soft_device_placement(0)  # type: ignore[arg-type]


def test_jax_logical_devices_beyond_what_jax_started_with() -> None:
    pytest.importorskip("jax")
    import jax

    started = len(jax.devices("cpu"))
    config.set_cpu_backend("jax")
    config.set_logical_devices("cpu", started + 1)
    with pytest.raises(gv.DevicePlacementError, match=rf"asks for {started + 1} JAX CPU devices, but JAX started with {started}"):
        gv.list_devices()


def test_jax_logical_devices_fewer_than_jax_has() -> None:
    pytest.importorskip("jax")
    config.set_cpu_backend("jax")
    config.set_logical_devices("cpu", 2)
    assert [d for d in gv.list_devices() if d.startswith("/cpu")] == ["/cpu:0", "/cpu:1"]


# --- transfer guard -----------------------------------------------------------------------


def test_transfer_guard_scopes_and_restores_on_error() -> None:
    assert config.get_transfer_guard() == "allow"
    with config.transfer_guard("log"):
        assert config.get_transfer_guard() == "log"
        with pytest.raises(KeyError):
            with config.transfer_guard("disallow"):
                assert config.get_transfer_guard() == "disallow"
                raise KeyError("boom")
        assert config.get_transfer_guard() == "log"
    assert config.get_transfer_guard() == "allow"


def test_transfer_guard_is_per_thread() -> None:
    seen: list[str] = []
    with config.transfer_guard("disallow"):
        t = threading.Thread(target=lambda: seen.append(config.get_transfer_guard()))
        t.start()
        t.join()
    assert seen == ["allow"]


def test_transfer_guard_rejects_unknown_kind() -> None:
    with pytest.raises(gv.InvalidArgumentError, match=r"transfer_guard kind must be one of \('allow', 'log', 'disallow'\), got 'deny'"):
        with config.transfer_guard("deny"):
            pass


def test_host_value_into_host_variable_is_never_a_transfer(cpu_backend: str) -> None:
    v = gv.Variable(np.zeros(3, np.float32), name="v", device="/cpu:0")
    with config.transfer_guard("disallow"):
        v.assign(np.ones(3, np.float32))
        v.assign([1.0, 2.0, 3.0])
        v.assign_add(np.ones(3))
        v.assign_sub([1.0, 1.0, 1.0])
        v.scatter_update([0], [9.0])
        w = gv.Variable(v, name="w", device="/cpu:0")  # same device: no transfer
        v.assign(w)
    np.testing.assert_array_equal(v.numpy(), [9.0, 2.0, 3.0])


def test_device_to_device_refused_under_disallow(four_cpus: str) -> None:
    a = gv.Variable(np.zeros(3, np.float32), name="a", device="/cpu:0")
    b = gv.Variable(np.arange(3, dtype=np.float32), name="b", device="/cpu:1")
    with config.transfer_guard("disallow"):
        for op in (a.assign, a.assign_add, a.assign_sub):
            with pytest.raises(gv.TransferGuardError) as info:
                op(b)
            text = str(info.value)
            assert "variable 'a' on /cpu:0" in text and "variable 'b' on /cpu:1" in text
            assert "device-to-device" in text and "gv.copy_to(x, '/cpu:0')" in text
        with pytest.raises(gv.TransferGuardError, match="scatter_update on variable 'a'"):
            a.scatter_update([0, 1, 2], b)
        with pytest.raises(gv.TransferGuardError):
            gv.Variable(b.initialized_value(), name="c", device="/cpu:0").assign(b)
        # an explicit copy is always allowed
        a.assign(gv.copy_to(b, "/cpu:0"))
    np.testing.assert_array_equal(a.numpy(), [0.0, 1.0, 2.0])
    a.assign_add(b)  # allowed outside the guard
    np.testing.assert_array_equal(a.numpy(), [0.0, 2.0, 4.0])


def test_transfer_guard_log(four_cpus: str, caplog: pytest.LogCaptureFixture) -> None:
    a = gv.Variable(np.zeros(2, np.float32), name="a", device="/cpu:0")
    b = gv.Variable(np.ones(2, np.float32), name="b", device="/cpu:1")
    with caplog.at_level(logging.WARNING, logger="gpuvars"), config.transfer_guard("log"):
        a.assign(b)
        a.assign(np.ones(2, np.float32))  # host: not logged
    records = [r for r in caplog.records if r.name == "gpuvars"]
    assert len(records) == 1
    assert "implicit device-to-device copy of variable 'b' on /cpu:1" in records[0].getMessage()
    assert "assign to variable 'a' on /cpu:0" in records[0].getMessage()
    np.testing.assert_array_equal(a.numpy(), [1.0, 1.0])


def test_copy_to(four_cpus: str) -> None:
    b = gv.Variable(np.arange(3, dtype=np.float32), name="b", device="/cpu:1")
    with config.transfer_guard("disallow"):
        out = gv.copy_to(b, "/cpu:2")
        host = gv.copy_to([1.0, 2.0], "/cpu:0")
    assert out.dtype == np.float32 and host.dtype == np.float32  # Python floats: float32
    np.testing.assert_array_equal(np.asarray(out), [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(np.asarray(host), [1.0, 2.0])
    if four_cpus == "jax":
        import jax

        assert jax_device_of(out) == jax.devices("cpu")[2]
    else:
        assert not np.shares_memory(out, np.asarray(b))
    with pytest.raises(gv.InvalidArgumentError, match=r"gv.copy_to to /cpu:0: cannot convert str 'text' to a numeric array"):
        gv.copy_to("text", "/cpu:0")
    if four_cpus == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            with pytest.raises(gv.InvalidArgumentError, match=r"gv.copy_to to /cpu:1: JAX would store float64 as float32"):
                gv.copy_to(np.ones(2), "/cpu:1")


@needs_jax
def test_jax_array_from_another_cpu_is_device_to_device() -> None:
    import jax

    config.set_cpu_backend("jax")
    config.set_logical_devices("cpu", 4)
    cpus = jax.devices("cpu")
    v = gv.Variable(np.zeros(3, np.float32), name="v", device="/cpu:0")
    elsewhere = jax.device_put(np.arange(3, dtype=np.float32), cpus[1])
    with config.transfer_guard("disallow"):
        with pytest.raises(gv.TransferGuardError, match=r"assign to variable 'v' on /cpu:0: implicit device-to-device copy of ArrayImpl on /cpu:1"):
            v.assign(elsewhere)
        v.assign(np.ones(3, np.float32))  # host numpy into a CPU variable: no transfer
        same = jax.device_put(np.full(3, 2.0, np.float32), cpus[0])
        v.assign_add(same)  # already on the variable's device
    np.testing.assert_array_equal(v.numpy(), [3.0, 3.0, 3.0])
    v.assign(elsewhere)
    assert jax_device_of(v.value()) == cpus[0]
    np.testing.assert_array_equal(v.numpy(), [0.0, 1.0, 2.0])


def test_device_of_array(four_cpus: str) -> None:
    v = gv.Variable(np.zeros(2, np.float32), name="v", device="/cpu:3")
    backend, dev = _transfer.device_of_array(v.value())
    assert backend is v.physical_device.backend
    # host numpy memory has no device; a JAX array knows its own
    assert dev is (v.physical_device if four_cpus == "jax" else None)
    assert _transfer.device_of_array([1, 2]) == (None, None)
