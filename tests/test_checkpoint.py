"""Checkpoints: format, interop with safetensors, Saver, VariablePolicy, load_checkpoint, reader.

Damage and crash tests live in test_checkpoint_damage.py and test_checkpoint_crash.py.
The four_cpus tests come first: a JAX-served four-device table needs JAX not yet started
with one device in this process (conftest skips them otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import xxhash

import gpuvars as gv
from gpuvars.checkpoint import _stformat as st

# --- helpers ---------------------------------------------------------------------------------------

_KEPT: list[gv.Variable] = []


def hold(var: gv.Variable) -> gv.Variable:
    """Hold ``var`` for the test (the registry holds variables weakly)."""
    _KEPT.append(var)
    return var


@pytest.fixture(autouse=True)
def _release_kept() -> Any:
    yield
    _KEPT.clear()


def files_of(folder: Path) -> set[str]:
    return set(os.listdir(folder))


def read_index(prefix: str) -> dict[str, Any]:
    with open(prefix + ".index.json") as f:
        return json.load(f)  # type: ignore[no-any-return]


def data_ptr(var: gv.Variable) -> int:
    return int(np.asarray(var).__array_interface__["data"][0])


class CountingZeros(gv.initializers.Initializer):
    """An initializer that counts its runs (a restore must never run it)."""

    calls = 0

    def _draw(self, device: Any, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        CountingZeros.calls += 1
        return device.backend.full(shape, 0, dtype, device.backend_index)


def must_not_run() -> np.ndarray[Any, Any]:
    raise AssertionError("the initial value callable ran; a restore must not run it")


# A child imports the gpuvars this process imported: same interpreter, environment and working directory.
SUBPROCESS_ENV = dict(os.environ)


# --- VariablePolicy with several devices (first: see the module docstring) ----------------------


def test_save_variable_devices_puts_each_variable_back(four_cpus: str, tmp_path: Path) -> None:
    opts = gv.SaveOptions(experimental_variable_policy=gv.VariablePolicy.SAVE_VARIABLE_DEVICES)
    with gv.Registry():
        vs = [gv.Variable(np.full((2, 3), i, np.float32), name=f"v{i}", device=f"/cpu:{i}") for i in range(4)]
        assert [v.device for v in vs] == ["/cpu:0", "/cpu:1", "/cpu:2", "/cpu:3"]
        prefix = gv.Saver(options=opts).save(tmp_path / "m", global_step=1)
    assert (tmp_path / "m-1.devices.json").exists()
    devices = json.loads((tmp_path / "m-1.devices.json").read_text())["devices"]
    assert {k: d["device"] for k, d in devices.items()} == {f"v{i}": f"/cpu:{i}" for i in range(4)}
    assert gv.CheckpointReader(prefix).get_variable_to_device_map() == {f"v{i}": f"/cpu:{i}" for i in range(4)}

    with gv.device("/cpu:2"):  # the saved map beats the scope
        loaded = gv.load_checkpoint(prefix)
    assert loaded.moved == {}
    for i in range(4):
        v = loaded[f"v{i}"]
        assert v.device == f"/cpu:{i}"
        assert v.backend == four_cpus
        np.testing.assert_array_equal(v.numpy(), np.full((2, 3), i, np.float32))
        if four_cpus == "jax":
            assert v.value().devices() == vs[i].value().devices()


def test_device_map_remaps_and_reports_moves(four_cpus: str, tmp_path: Path) -> None:
    opts = gv.SaveOptions(experimental_variable_policy="SAVE_VARIABLE_DEVICES")
    with gv.Registry():
        held = [gv.Variable(np.full(3, i, np.float32), name=f"v{i}", device=f"/cpu:{i}") for i in range(4)]
        prefix = gv.Saver(options=opts).save(tmp_path / "m")
    del held

    with gv.Registry():
        loaded = gv.load_checkpoint(prefix, device_map={"/cpu:3": "/cpu:0"})
        assert {k: v.device for k, v in loaded.items()} == {"v0": "/cpu:0", "v1": "/cpu:1", "v2": "/cpu:2", "v3": "/cpu:0"}
        assert loaded.moved == {"v3": ("/cpu:3", "/cpu:0")}
        np.testing.assert_array_equal(loaded["v3"].numpy(), np.full(3, 3, np.float32))
    with gv.Registry():
        loaded = gv.load_checkpoint(prefix, device_map={"/cpu:*": "/cpu:1"})
        assert {v.device for v in loaded.values()} == {"/cpu:1"}
        assert loaded.moved == {"v0": ("/cpu:0", "/cpu:1"), "v2": ("/cpu:2", "/cpu:1"), "v3": ("/cpu:3", "/cpu:1")}
    with gv.Registry():
        loaded = gv.load_checkpoint(prefix, device_map=lambda d: "/cpu:2" if d == "/cpu:1" else None)
        assert {k: v.device for k, v in loaded.items()} == {"v0": "/cpu:0", "v1": "/cpu:2", "v2": "/cpu:2", "v3": "/cpu:3"}
        assert loaded.moved == {"v1": ("/cpu:1", "/cpu:2")}
    with gv.Registry():
        loaded = gv.load_checkpoint(prefix, device="/cpu:3")  # device= overrides the map
        assert {v.device for v in loaded.values()} == {"/cpu:3"}
        assert set(loaded.moved) == {"v0", "v1", "v2"}
    with pytest.raises(gv.InvalidArgumentError, match="device_map must be a dict or a callable"):
        gv.load_checkpoint(prefix, device_map=["/cpu:0"])  # type: ignore[arg-type]


def test_saver_restore_never_moves_and_reports_device_differences(four_cpus: str, tmp_path: Path) -> None:
    opts = gv.SaveOptions(experimental_variable_policy=gv.VariablePolicy.SAVE_VARIABLE_DEVICES)
    w = gv.Variable(np.arange(4, dtype=np.float32), name="w", device="/cpu:3")
    b = gv.Variable(np.ones(2, np.float32), name="b", device="/cpu:1")
    prefix = gv.Saver(options=opts).save(tmp_path / "m")
    with gv.Registry():
        w2 = gv.Variable(np.zeros(4, np.float32), name="w", device="/cpu:1")
        b2 = gv.Variable(CountingZeros(), shape=(2,), name="b", device="/cpu:1")
        result = gv.Saver().restore(prefix)
        assert (w2.device, b2.device) == ("/cpu:1", "/cpu:1")
        assert result.device_differences == {"w": ("/cpu:3", "/cpu:1")}
        assert result.restored == ("w", "b")
        np.testing.assert_array_equal(w2.numpy(), w.numpy())
        np.testing.assert_array_equal(b2.numpy(), b.numpy())


def test_policy_none_places_by_scope_or_device(four_cpus: str, tmp_path: Path) -> None:
    with gv.Registry():
        w = gv.Variable(np.arange(3, dtype=np.float32), name="w", device="/cpu:2")
        prefix = gv.Saver().save(tmp_path / "m")
    del w
    assert not (tmp_path / "m.devices.json").exists()
    assert gv.CheckpointReader(prefix).get_variable_to_device_map() == {}
    with gv.Registry():
        assert gv.load_checkpoint(prefix)["w"].device == "/cpu:0"
    with gv.Registry(), gv.device("/cpu:3"):
        assert gv.load_checkpoint(prefix)["w"].device == "/cpu:3"
    with gv.Registry():
        loaded = gv.load_checkpoint(prefix, device="/cpu:1")
        assert loaded["w"].device == "/cpu:1"
        assert loaded.moved == {}
        np.testing.assert_array_equal(loaded["w"].numpy(), np.arange(3, dtype=np.float32))


def test_expand_with_plain_variables_is_like_save_variable_devices(four_cpus: str, tmp_path: Path) -> None:
    opts = gv.SaveOptions(experimental_variable_policy="expand_distributed_variables")
    hold(gv.Variable(np.arange(3, dtype=np.float32), name="a", device="/cpu:1"))
    hold(gv.Variable(np.arange(2, dtype=np.float32), name="b", device="/cpu:2"))
    prefix = gv.Saver(options=opts).save(tmp_path / "m", global_step=5)
    assert files_of(tmp_path) == {"checkpoint", "m-5.safetensors", "m-5.devices.json", "m-5.index.json"}
    assert read_index(prefix)["policy"] == "EXPAND_DISTRIBUTED_VARIABLES"
    with gv.Registry():
        loaded = gv.load_checkpoint(prefix)
        assert {k: v.device for k, v in loaded.items()} == {"a": "/cpu:1", "b": "/cpu:2"}
        assert loaded.moved == {}


# --- a checkpoint saved by a 4-device process, loaded in this 1-device one -----------------------


@pytest.fixture(scope="module")
def four_device_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("four")
    script = textwrap.dedent(
        """
        import sys, numpy as np, gpuvars as gv
        gv.config.set_logical_devices("cpu", 4)
        a = gv.Variable(np.arange(3, dtype=np.float32), name="a", device="/cpu:0")
        b = gv.Variable(np.full((2, 2), 7, np.int64), name="b", device="/cpu:3")
        opts = gv.SaveOptions(experimental_variable_policy="save_variable_devices")
        print(gv.Saver(options=opts).save(sys.argv[1] + "/m", global_step=9))
        """
    )
    out = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, env=SUBPROCESS_ENV, check=True)
    return out.stdout.strip()


def test_missing_saved_device_soft_placement_warns_and_reports(four_device_checkpoint: str) -> None:
    assert gv.list_devices() == ["/cpu:0"]
    assert gv.CheckpointReader(four_device_checkpoint).get_variable_to_device_map() == {"a": "/cpu:0", "b": "/cpu:3"}
    with pytest.warns(gv.PlacementWarning, match=r"'b' /cpu:3 -> /cpu:0"):
        loaded = gv.load_checkpoint(four_device_checkpoint)
    assert loaded.moved == {"b": ("/cpu:3", "/cpu:0")}
    assert loaded["b"].device == "/cpu:0"
    np.testing.assert_array_equal(loaded["b"].numpy(), np.full((2, 2), 7, np.int64))


def test_missing_saved_device_remapped_explicitly_does_not_warn(four_device_checkpoint: str) -> None:
    loaded = gv.load_checkpoint(four_device_checkpoint, device_map={"/cpu:3": "/cpu:0"})
    assert loaded.moved == {"b": ("/cpu:3", "/cpu:0")}


def test_missing_saved_device_without_soft_placement_is_an_error(four_device_checkpoint: str, fresh_state: gv.Registry) -> None:
    gv.config.set_soft_device_placement(False)
    with pytest.raises(gv.DevicePlacementError, match=r"(?i)cpu:3' for checkpoint key 'b'"):
        gv.load_checkpoint(four_device_checkpoint)
    assert len(fresh_state) == 0
    assert gv.global_variables() == []


# --- format ----------------------------------------------------------------------------------------


def test_files_of_a_prefix_and_the_state_file(tmp_path: Path) -> None:
    hold(gv.Variable(np.ones((2, 3), np.float32), name="w"))
    saver = gv.Saver()
    p1 = saver.save(str(tmp_path / "model.ckpt"), global_step=1000)
    assert p1 == str(tmp_path / "model.ckpt-1000")
    assert files_of(tmp_path) == {"checkpoint", "model.ckpt-1000.safetensors", "model.ckpt-1000.index.json"}
    p2 = saver.save(tmp_path / "model.ckpt", global_step=2000)
    state = json.loads((tmp_path / "checkpoint").read_text())
    assert state["latest"] == "model.ckpt-2000"  # relative names only
    assert [e["prefix"] for e in state["all"]] == ["model.ckpt-1000", "model.ckpt-2000"]
    ts = [e["timestamp"] for e in state["all"]]
    assert ts == sorted(ts) and abs(ts[-1] - time.time()) < 60
    assert gv.latest_checkpoint(tmp_path) == p2
    cs = gv.get_checkpoint_state(str(tmp_path))
    assert cs is not None
    assert cs.model_checkpoint_path == p2
    assert cs.all_model_checkpoint_paths == [p1, p2]
    assert cs.all_model_checkpoint_timestamps == ts
    assert gv.get_checkpoint_state(tmp_path / "nothing-here") is None


@pytest.mark.parametrize("policy", ["SAVE_VARIABLE_DEVICES", "EXPAND_DISTRIBUTED_VARIABLES"])
def test_devices_file_only_with_a_device_policy(tmp_path: Path, policy: str) -> None:
    hold(gv.Variable(np.ones(3, np.float32), name="w"))
    gv.Saver().save(tmp_path / "none")
    gv.Saver(options=gv.SaveOptions(experimental_variable_policy=policy)).save(tmp_path / "dev")
    assert not (tmp_path / "none.devices.json").exists()
    assert (tmp_path / "dev.devices.json").exists()
    assert not [n for n in os.listdir(tmp_path) if "replica" in n]  # no distributed variables: no replica files


def test_index_contents(tmp_path: Path) -> None:
    w = gv.Variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="w")
    step = gv.Variable(np.int64(0), name="global_step", trainable=False)
    m = gv.Variable(np.zeros((0, 4), ml_dtypes.bfloat16), name="m", trainable=False)
    opts = gv.SaveOptions(experimental_variable_policy="save_variable_devices")
    step.assign(42)
    prefix = gv.Saver(options=opts).save(tmp_path / "m", global_step=step)
    assert prefix.endswith("m-42")
    index = read_index(prefix)
    assert index["format"] == "gpuvars-checkpoint"
    assert index["version"] == 1
    assert index["policy"] == "SAVE_VARIABLE_DEVICES"
    assert index["global_step"] == 42
    assert index["checksum_algorithm"] == "xxh3_64"
    variables = index["variables"]
    assert {k: (v["shape"], v["dtype"], v["kind"], v["trainable"]) for k, v in variables.items()} == {
        "w": ([2, 3], "F32", "plain", True),
        "global_step": ([], "I64", "plain", False),
        "m": ([0, 4], "BF16", "plain", False),
    }
    assert variables["w"]["checksum"] == xxhash.xxh3_64_hexdigest(w.numpy().tobytes())
    assert variables["global_step"]["checksum"] == xxhash.xxh3_64_hexdigest(np.int64(42).tobytes())
    assert variables["m"]["checksum"] == xxhash.xxh3_64_hexdigest(b"")
    files = index["files"]
    assert set(files) == {"m-42.safetensors", "m-42.devices.json"}
    for name, rec in files.items():
        assert rec["size"] == (tmp_path / name).stat().st_size
    data = (tmp_path / "m-42.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    assert files["m-42.safetensors"]["checksum"] == xxhash.xxh3_64_hexdigest(data[: 8 + header_len])
    assert files["m-42.devices.json"]["checksum"] == xxhash.xxh3_64_hexdigest((tmp_path / "m-42.devices.json").read_bytes())
    assert all(v["file"] == "m-42.safetensors" for v in variables.values())
    assert m.shape == (0, 4)


ALL_DTYPES = {
    "f32": np.arange(6, dtype=np.float32).reshape(2, 3) / 3,
    "f64": np.linspace(-1, 1, 5),
    "f16": np.array([1.5, -2.25, 65504.0], np.float16),
    "bf16": np.array([[1.0, -3.5], [1e30, 0.0078125]], ml_dtypes.bfloat16),
    "i8": np.array([-128, 0, 127], np.int8),
    "u8": np.arange(10, dtype=np.uint8),
    "i16": np.array([-5, 5], np.int16),
    "i32": np.array([[1, 2], [3, 4]], np.int32),
    "i64": np.array([2**40, -(2**40)], np.int64),
    "u64": np.array([2**63], np.uint64),
    "c64": np.array([1 + 2j, -3j], np.complex64),
    "bool": np.array([True, False, True]),
    "scalar": np.float32(3.25),
    "empty": np.zeros((0, 3), np.float32),
}


def _make_all_dtypes() -> None:
    for name, value in ALL_DTYPES.items():
        hold(gv.Variable(value, name=name))


def _assert_same(actual: Any, expected: Any) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes()


def test_our_file_is_plain_safetensors(tmp_path: Path) -> None:
    _make_all_dtypes()
    prefix = gv.Saver().save(tmp_path / "m", global_step=3)
    path = prefix + ".safetensors"
    loaded = safetensors.numpy.load_file(path)
    assert set(loaded) == set(ALL_DTYPES)
    for name, value in ALL_DTYPES.items():
        _assert_same(loaded[name], value)
    with safetensors.safe_open(path, framework="np") as f:
        assert set(f.keys()) == set(ALL_DTYPES)
        assert f.metadata() == {"format": "gpuvars-checkpoint", "version": "1"}
        for name, value in ALL_DTYPES.items():
            _assert_same(f.get_tensor(name), value)
            assert f.get_slice(name).get_shape() == list(np.shape(value))


def test_our_file_is_byte_identical_to_safetensors_own_writer(tmp_path: Path) -> None:
    _make_all_dtypes()
    prefix = gv.Saver().save(tmp_path / "m")
    tensors = {k: np.asarray(v) for k, v in ALL_DTYPES.items()}
    theirs = safetensors.numpy.save(tensors, metadata={"format": "gpuvars-checkpoint", "version": "1"})
    ours = Path(prefix + ".safetensors").read_bytes()
    # safetensors keeps __metadata__ in a hash map: its key order (only) varies between processes
    n = int.from_bytes(ours[:8], "little")
    assert ours[:8] == theirs[:8]
    assert json.loads(ours[8 : 8 + n]) == json.loads(theirs[8 : 8 + n])
    assert ours[8 + n :] == theirs[8 + n :]
    assert [k for k in json.loads(ours[8 : 8 + n]) if k != "__metadata__"] == [k for k in json.loads(theirs[8 : 8 + n]) if k != "__metadata__"]


def test_plain_safetensors_file_restores_into_variables(tmp_path: Path) -> None:
    path = str(tmp_path / "plain.safetensors")
    safetensors.numpy.save_file({k: np.asarray(v) for k, v in ALL_DTYPES.items()}, path, metadata={"who": "hf"})
    # gv.load_checkpoint: one variable per tensor
    loaded = gv.load_checkpoint(path)
    assert set(loaded) == set(ALL_DTYPES)
    for name, value in ALL_DTYPES.items():
        _assert_same(loaded[name].numpy(), value)
        assert loaded[name].trainable
    assert loaded.moved == {}
    # Saver.restore into existing variables, deferred ones included (no initializer runs)
    with gv.Registry():
        f32 = gv.Variable(np.zeros((2, 3), np.float32), name="f32")
        bf16 = gv.Variable(CountingZeros(), shape=(2, 2), dtype=ml_dtypes.bfloat16, name="bf16")
        CountingZeros.calls = 0
        result = gv.Saver([f32, bf16]).restore(path)
        assert result.restored == ("f32", "bf16")
        assert CountingZeros.calls == 0
        _assert_same(f32.numpy(), ALL_DTYPES["f32"])
        _assert_same(bf16.numpy(), ALL_DTYPES["bf16"])
        with pytest.raises(gv.CheckpointMismatchError, match=r"'f32': shape \(2, 3\) in the checkpoint.*accepts \(3,\)"):
            gv.Saver({"f32": gv.Variable(np.zeros(3, np.float32), name="x")}).restore(path)
    # the reader and verify (structure only: a plain file has no checksums)
    reader = gv.CheckpointReader(path)
    assert reader.plain
    assert reader.keys() == sorted(ALL_DTYPES)
    assert reader.get_variable_to_shape_map()["empty"] == (0, 3)
    assert reader.get_variable_to_dtype_map()["bf16"] == np.dtype(ml_dtypes.bfloat16)
    _assert_same(reader.get_tensor("c64"), ALL_DTYPES["c64"])
    assert reader.verify() == []


def test_data_file_of_a_committed_checkpoint_opens_as_that_checkpoint(tmp_path: Path) -> None:
    hold(gv.Variable(np.arange(3.0), name="w"))
    prefix = gv.Saver().save(tmp_path / "m")
    reader = gv.CheckpointReader(prefix + ".safetensors")
    assert not reader.plain and reader.prefix == prefix
    with gv.Registry():
        assert gv.load_checkpoint(prefix + ".safetensors")["w"].numpy().tolist() == [0.0, 1.0, 2.0]


def test_data_file_without_its_index_is_not_a_checkpoint(tmp_path: Path) -> None:
    hold(gv.Variable(np.arange(3.0), name="w"))
    prefix = gv.Saver().save(tmp_path / "m")
    os.unlink(prefix + ".index.json")
    for path in (prefix, prefix + ".safetensors"):
        with pytest.raises(gv.CheckpointNotFoundError, match="m.index.json"):
            gv.load_checkpoint(path)
        with pytest.raises(gv.CheckpointNotFoundError):
            gv.Saver().restore(path)
        with pytest.raises(gv.CheckpointNotFoundError):
            gv.CheckpointReader(path)


def test_torch_written_file_restores(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed (optional: interop with safetensors.torch)")
    import safetensors.torch

    path = str(tmp_path / "torch.safetensors")
    tensors = {
        "linear.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "linear.bias": torch.tensor([0.5, -0.5], dtype=torch.bfloat16),
        "step": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "half": torch.tensor([1.5, 2.5], dtype=torch.float16),
    }
    safetensors.torch.save_file(tensors, path)
    loaded = gv.load_checkpoint(path)
    assert set(loaded) == set(tensors)
    for key, t in tensors.items():
        got = loaded[key].numpy()
        expected = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        np.testing.assert_array_equal(got.astype(expected.dtype), expected)
        assert got.shape == tuple(t.shape)
    assert loaded["linear.bias"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert loaded["step"].dtype == np.int64
    # and the other way: torch reads our file
    prefix = gv.Saver(list(loaded.values())).save(tmp_path / "ours")
    back = safetensors.torch.load_file(prefix + ".safetensors")
    for key, t in tensors.items():
        assert back[key].dtype == t.dtype
        assert torch.equal(back[key], t)


# --- Saver: var_list ------------------------------------------------------------------------------


def test_var_list_forms_and_renaming(tmp_path: Path) -> None:
    a = gv.Variable(np.ones(2, np.float32), name="a")
    b = gv.Variable(np.zeros(3, np.float32), name="scope/b")
    assert set(read_index(gv.Saver().save(tmp_path / "all"))["variables"]) == {"a", "scope/b"}
    assert set(read_index(gv.Saver([b]).save(tmp_path / "list"))["variables"]) == {"scope/b"}
    assert set(read_index(gv.Saver(a).save(tmp_path / "one"))["variables"]) == {"a"}
    prefix = gv.Saver({"renamed/a": a, "b": b}).save(tmp_path / "dict")
    assert set(read_index(prefix)["variables"]) == {"renamed/a", "b"}
    with gv.Registry():
        x = gv.Variable(np.zeros(2, np.float32), name="x")
        gv.Saver({"renamed/a": x}).restore(prefix, var_list={"renamed/a": x})
        assert x.numpy().tolist() == [1.0, 1.0]
    saver = gv.Saver([a, b])
    assert saver.var_map == {"a": a, "scope/b": b}


def test_var_list_errors(fresh_state: gv.Registry) -> None:
    a = gv.Variable(1.0, name="w")
    with gv.Registry():
        other = gv.Variable(2.0, name="w")  # same name in another registry
    with pytest.raises(gv.InvalidArgumentError, match="At least two variables have the same name: w"):
        gv.Saver([a, other])
    with pytest.raises(gv.InvalidArgumentError, match="appears twice"):
        gv.Saver({"x": a, "y": a})
    with pytest.raises(gv.InvalidArgumentError, match="not a gv.Variable"):
        gv.Saver([a, np.zeros(3)])
    with pytest.raises(gv.InvalidArgumentError, match="not a gv.Variable"):
        gv.Saver({"k": "nope"})
    with pytest.raises(gv.InvalidArgumentError, match="must be a non-empty string"):
        gv.Saver({"": a})
    with pytest.raises(gv.InvalidArgumentError, match="must be None, a list or a dict"):
        gv.Saver(42)
    with pytest.raises(gv.InvalidArgumentError, match="No variables to save"):
        gv.Saver([])
    with gv.Registry(), pytest.raises(gv.InvalidArgumentError, match="No variables to save"):
        gv.Saver()
    assert gv.Saver([], allow_empty=True).var_map == {}
    with pytest.raises(gv.InvalidArgumentError, match="max_to_keep"):
        gv.Saver(max_to_keep=-1)
    with pytest.raises(gv.InvalidArgumentError, match="keep_checkpoint_every_n_hours"):
        gv.Saver(keep_checkpoint_every_n_hours=0)
    with pytest.raises(gv.InvalidArgumentError, match="options must be a gv.SaveOptions"):
        gv.Saver(options="save_variable_devices")  # type: ignore[arg-type]
    assert isinstance(gv.InvalidArgumentError("x"), ValueError)


# --- Saver: save ----------------------------------------------------------------------------------


def test_global_step_forms(tmp_path: Path) -> None:
    hold(gv.Variable(np.ones(2, np.float32), name="w"))
    saver = gv.Saver(max_to_keep=None)
    assert saver.save(tmp_path / "m") == str(tmp_path / "m")
    assert saver.save(tmp_path / "m", global_step=1000) == str(tmp_path / "m-1000")
    assert saver.save(tmp_path / "m", global_step=np.int64(7)) == str(tmp_path / "m-7")
    step = gv.Variable(12, name="global_step", trainable=False)
    assert step.dtype == np.int32
    assert saver.save(tmp_path / "m", global_step=step) == str(tmp_path / "m-12")
    assert read_index(str(tmp_path / "m-12"))["global_step"] == 12
    assert read_index(str(tmp_path / "m"))["global_step"] is None
    for bad in (1.5, True, "3", gv.Variable(2.0, name="float_step"), gv.Variable([1, 2], name="vector_step")):
        with pytest.raises(gv.InvalidArgumentError, match="global_step"):
            saver.save(tmp_path / "m", global_step=bad)
    for bad_path in ("", str(tmp_path) + os.sep, str(tmp_path / ".hidden")):
        with pytest.raises(gv.InvalidArgumentError, match="prefix"):
            saver.save(bad_path)


def test_save_creates_the_folder(tmp_path: Path) -> None:
    hold(gv.Variable(np.ones(2, np.float32), name="w"))
    prefix = gv.Saver().save(tmp_path / "a" / "b" / "m", global_step=1)
    assert gv.latest_checkpoint(tmp_path / "a" / "b") == prefix


def test_uninitialized_variable_save_writes_nothing(tmp_path: Path) -> None:
    hold(gv.Variable(np.ones(2, np.float32), name="ok"))
    hold(gv.Variable(gv.zeros([3]), name="deferred"))
    folder = tmp_path / "ckpt"
    with pytest.raises(gv.UninitializedVariableError, match="'deferred'.*nothing was written"):
        gv.Saver().save(folder / "m", global_step=1)
    assert not folder.exists()


def test_unsupported_dtype_save_writes_nothing(tmp_path: Path) -> None:
    hold(gv.Variable(np.ones(2, np.complex128), name="z"))
    with pytest.raises(gv.InvalidArgumentError, match="'z'.*complex128"):
        gv.Saver().save(tmp_path / "m")
    assert files_of(tmp_path) == set()


def test_max_to_keep_default_five_deletes_every_file(tmp_path: Path) -> None:
    hold(gv.Variable(np.ones(2, np.float32), name="w"))
    saver = gv.Saver(options=gv.SaveOptions(experimental_variable_policy="save_variable_devices"))
    prefixes = [saver.save(tmp_path / "m", global_step=s) for s in range(1, 8)]
    assert saver.last_checkpoints == prefixes[2:]
    kept = {f"m-{s}{ext}" for s in range(3, 8) for ext in (".safetensors", ".index.json", ".devices.json")}
    assert files_of(tmp_path) == kept | {"checkpoint"}
    cs = gv.get_checkpoint_state(tmp_path)
    assert cs is not None and cs.all_model_checkpoint_paths == prefixes[2:]
    # re-saving a kept prefix moves it to the end of the list
    saver.save(tmp_path / "m", global_step=4)
    assert saver.last_checkpoints == [prefixes[i] for i in (2, 4, 5, 6, 3)]


@pytest.mark.parametrize("keep", [None, 0])
def test_max_to_keep_none_keeps_all(tmp_path: Path, keep: int | None) -> None:
    hold(gv.Variable(np.ones(2, np.float32), name="w"))
    saver = gv.Saver(max_to_keep=keep)
    for s in range(8):
        saver.save(tmp_path / "m", global_step=s)
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".index.json")]) == 8
    assert len(saver.last_checkpoints) == 8


def test_retention_deletes_only_after_a_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpuvars.checkpoint import _transfer

    hold(gv.Variable(np.ones(2, np.float32), name="w"))
    saver = gv.Saver(max_to_keep=2)
    p1, p2 = saver.save(tmp_path / "m", global_step=1), saver.save(tmp_path / "m", global_step=2)

    def failing_source(*args: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_transfer, "source", failing_source)
    with pytest.raises(OSError, match="No space left"):
        saver.save(tmp_path / "m", global_step=3)
    assert files_of(tmp_path) == {"checkpoint", "m-1.safetensors", "m-1.index.json", "m-2.safetensors", "m-2.index.json"}
    assert saver.last_checkpoints == [p1, p2]
    assert gv.latest_checkpoint(tmp_path) == p2


def test_keep_checkpoint_every_n_hours_preserves(tmp_path: Path) -> None:
    hold(gv.Variable(np.ones(2, np.float32), name="w"))
    saver = gv.Saver(max_to_keep=2, keep_checkpoint_every_n_hours=1e-6)  # every 3.6 ms
    for s in range(1, 5):
        time.sleep(0.01)
        saver.save(tmp_path / "m", global_step=s)
    # m-1 and m-2 left the rotation but, each past the next keep mark, stay on disk for good
    assert [os.path.basename(p) for p in saver.last_checkpoints] == ["m-3", "m-4"]
    assert {n for n in os.listdir(tmp_path) if n.endswith(".index.json")} == {f"m-{s}.index.json" for s in range(1, 5)}
    cs = gv.get_checkpoint_state(tmp_path)
    assert cs is not None
    assert [os.path.basename(p) for p in cs.all_model_checkpoint_paths] == ["m-3", "m-4"]
    assert cs.last_preserved_timestamp > 0
    with gv.Registry():
        assert gv.load_checkpoint(tmp_path / "m-1")["w"].numpy().tolist() == [1.0, 1.0]


def test_saving_over_a_prefix_retires_its_index_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpuvars.checkpoint import _transfer

    w = gv.Variable(np.ones(2, np.float32), name="w")
    saver = gv.Saver()
    prefix = saver.save(tmp_path / "m")
    w.assign([5.0, 6.0])
    assert saver.save(tmp_path / "m") == prefix  # a whole new checkpoint replaces it
    assert gv.CheckpointReader(prefix).get_tensor("w").tolist() == [5.0, 6.0]
    assert files_of(tmp_path) == {"checkpoint", "m.safetensors", "m.index.json"}

    seen: list[bool] = []

    def failing_source(*args: Any) -> Any:
        seen.append(os.path.exists(prefix + ".index.json"))
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_transfer, "source", failing_source)
    with pytest.raises(OSError):
        saver.save(tmp_path / "m")
    assert seen == [False]  # the old index was gone before any new byte was written
    with pytest.raises(gv.CheckpointNotFoundError, match="not a valid checkpoint"):
        gv.CheckpointReader(prefix)
    assert gv.latest_checkpoint(tmp_path) is None
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # the failed save removed its temp file


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp_of(path: Path, pid: int) -> str:
    """The name a writer with ``pid`` on this host would give a temporary sibling of ``path``."""
    from gpuvars.checkpoint import _atomic

    me = _atomic.this_writer()
    start = me.start if pid == me.pid else (_atomic._proc_start(pid) or 0)
    return os.path.basename(_atomic.temp_path(str(path), dataclasses.replace(me, pid=pid, start=start)))


def test_save_removes_stale_temps_of_dead_processes_only(tmp_path: Path) -> None:
    hold(gv.Variable(np.ones(2, np.float32), name="w"))
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [_temp_of(tmp_path / "model.ckpt-1.safetensors", dead), _temp_of(tmp_path / "model.ckpt-1.index.json", dead)]
        keep = [_temp_of(tmp_path / "model.ckpt-2.safetensors", live.pid),
                _temp_of(tmp_path / "model.ckpt-2.safetensors", os.getpid()), "notes.tmp-1-x"]
        for name in stale + keep:
            (tmp_path / name).write_bytes(b"partial")
        gv.Saver().save(tmp_path / "model.ckpt", global_step=3)
        names = files_of(tmp_path)
        assert not names & set(stale)
        assert set(keep) <= names
    finally:
        live.kill()
        live.wait()


# --- Saver: restore -------------------------------------------------------------------------------


def test_restore_initializes_without_running_the_initializer(tmp_path: Path) -> None:
    hold(gv.Variable(np.full((3, 2), 4.0, np.float32), name="w"))
    hold(gv.Variable(np.arange(3, dtype=np.int64), name="c"))
    prefix = gv.Saver().save(tmp_path / "m")
    with gv.Registry():
        CountingZeros.calls = 0
        w = gv.Variable(CountingZeros(), shape=(3, 2), name="w")
        c = gv.Variable(must_not_run, name="c")  # a deferred callable: dtype and shape unknown yet
        assert not w.initialized and not c.initialized
        with pytest.raises(gv.UninitializedVariableError, match="no known dtype"):
            _ = c.dtype
        result = gv.Saver().restore(prefix)
        assert result.restored == ("w", "c")
        assert CountingZeros.calls == 0
        assert w.initialized and c.initialized
        np.testing.assert_array_equal(w.numpy(), np.full((3, 2), 4.0, np.float32))
        assert c.numpy().tolist() == [0, 1, 2]
        # the restore was c's first initialization: it fixed its dtype and shape
        assert c.dtype == np.int64 and c.shape == (3,)
        c.assign([5, 6, 7])
        with pytest.raises(gv.InvalidArgumentError):
            c.assign([1, 2])
        assert gv.report_uninitialized_variables() == []


def test_restore_writes_into_the_same_buffer(tmp_path: Path) -> None:
    w = gv.Variable(np.arange(12, dtype=np.float32).reshape(3, 4), name="w")
    prefix = gv.Saver().save(tmp_path / "m")
    before = data_ptr(w)
    w.assign(np.zeros((3, 4)))
    gv.Saver().restore(prefix)
    assert data_ptr(w) == before
    np.testing.assert_array_equal(w.numpy(), np.arange(12, dtype=np.float32).reshape(3, 4))


def test_restore_into_a_dynamic_shape_variable(tmp_path: Path) -> None:
    hold(gv.Variable(np.ones((5, 3), np.float32), name="rows"))
    prefix = gv.Saver().save(tmp_path / "m")
    with gv.Registry():
        rows = gv.Variable(np.zeros((2, 3), np.float32), name="rows", shape=(None, 3))
        gv.Saver().restore(prefix)
        assert rows.shape == (5, 3) and rows.declared_shape == (None, 3)
        np.testing.assert_array_equal(rows.numpy(), np.ones((5, 3), np.float32))
    with gv.Registry():
        anything = gv.Variable(np.zeros(2, np.float32), name="rows", validate_shape=False)
        gv.Saver().restore(prefix)
        assert anything.shape == (5, 3)


def test_strict_restore_lists_every_culprit_and_writes_nothing(tmp_path: Path) -> None:
    hold(gv.Variable(np.ones((2, 3), np.float32), name="shape"))
    hold(gv.Variable(np.ones(4, np.float32), name="dtype"))
    hold(gv.Variable(np.ones(2, np.float32), name="good"))
    prefix = gv.Saver().save(tmp_path / "m")
    with gv.Registry():
        good = gv.Variable(np.full(2, 9.0, np.float32), name="good")
        shape = gv.Variable(np.full((3, 2), 9.0, np.float32), name="shape")
        dtype = gv.Variable(np.full(4, 9.0, np.float64), name="dtype")
        missing1 = gv.Variable(np.zeros(1, np.float32), name="missing1")
        missing2 = gv.Variable(gv.zeros([1]), name="missing2")
        with pytest.raises(gv.CheckpointMismatchError) as info:
            gv.Saver([good, shape, dtype, missing1, missing2]).restore(prefix)
        msg = str(info.value)
        assert "m" in msg and "nothing was restored" in msg
        assert "missing keys: 'missing1', 'missing2'" in msg
        assert "'shape': shape (2, 3) in the checkpoint, variable 'shape' accepts (3, 2)" in msg
        assert "'dtype': dtype float32 in the checkpoint, variable 'dtype' has float64" in msg
        assert isinstance(info.value, ValueError)
        for v in (good, shape, dtype):
            assert np.all(v.numpy() == 9.0)
        assert not missing2.initialized


def test_partial_restore_of_a_subset(tmp_path: Path) -> None:
    a = gv.Variable(np.ones(2, np.float32), name="a")
    b = gv.Variable(np.ones(2, np.float32), name="b")
    saver = gv.Saver()
    prefix = saver.save(tmp_path / "m")
    a.assign([0.0, 0.0])
    b.assign([0.0, 0.0])
    result = saver.restore(prefix, var_list=[b])
    assert result.restored == ("b",)
    assert a.numpy().tolist() == [0.0, 0.0] and b.numpy().tolist() == [1.0, 1.0]
    # a checkpoint with more keys than the saver asks for is fine
    with gv.Registry():
        only = gv.Variable(np.zeros(2, np.float32), name="a")
        assert gv.Saver().restore(prefix).restored == ("a",)
        assert only.numpy().tolist() == [1.0, 1.0]


def test_restore_errors(tmp_path: Path) -> None:
    hold(gv.Variable(np.ones(2, np.float32), name="w"))
    saver = gv.Saver()
    with pytest.raises(gv.InvalidArgumentError, match="Can't load save_path when it is None"):
        saver.restore(None)  # type: ignore[arg-type]
    with pytest.raises(gv.CheckpointNotFoundError, match="not a valid checkpoint.*nope") as info:
        saver.restore(tmp_path / "nope")
    assert isinstance(info.value, FileNotFoundError)


def test_latest_checkpoint_none_cases(tmp_path: Path) -> None:
    assert gv.latest_checkpoint(tmp_path) is None
    assert gv.latest_checkpoint(tmp_path / "missing") is None
    hold(gv.Variable(np.ones(2, np.float32), name="w"))
    saver = gv.Saver()
    p1 = saver.save(tmp_path / "m", global_step=1)
    p2 = saver.save(tmp_path / "m", global_step=2)
    assert gv.latest_checkpoint(tmp_path) == p2
    os.unlink(p2 + ".index.json")
    assert gv.latest_checkpoint(tmp_path) is None
    cs = gv.get_checkpoint_state(tmp_path)
    assert cs is not None and cs.all_model_checkpoint_paths == [p1, p2]


def test_restore_on_the_cpu_backends(cpu_backend: str, tmp_path: Path) -> None:
    w = gv.Variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="w")
    h = gv.Variable(np.array([1.5, -2.0], ml_dtypes.bfloat16), name="h")
    s = gv.Variable(np.int32(3), name="s")
    assert w.backend == cpu_backend
    prefix = gv.Saver().save(tmp_path / "m")
    before = w.value()
    device_before = w.physical_device
    w.assign(np.zeros((2, 3)))
    h.assign(np.zeros(2))
    s.assign(0)
    gv.Saver().restore(prefix)
    np.testing.assert_array_equal(w.numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))
    _assert_same(h.numpy(), np.array([1.5, -2.0], ml_dtypes.bfloat16))
    assert int(s.numpy()) == 3
    assert w.physical_device is device_before and w.device == "/cpu:0"
    if cpu_backend == "jax":
        import jax

        value = w.value()
        assert isinstance(value, jax.Array)
        assert value is not before  # JAX storage is rebound ...
        assert value.devices() == before.devices()  # ... on the same device
        assert h.value().dtype == ml_dtypes.bfloat16
    else:
        assert np.shares_memory(np.asarray(w), before)
    with gv.Registry():
        loaded = gv.load_checkpoint(prefix)
        assert {v.backend for v in loaded.values()} == {cpu_backend}
        np.testing.assert_array_equal(loaded["w"].numpy(), w.numpy())


# --- load_checkpoint and CheckpointReader --------------------------------------------------------


def test_load_checkpoint_without_model_code(tmp_path: Path) -> None:
    hold(gv.Variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="dense/kernel"))
    hold(gv.Variable(np.int64(100), name="global_step", trainable=False))
    hold(gv.Variable(np.array([True, False]), name="mask", trainable=False))
    prefix = gv.Saver().save(tmp_path / "m", global_step=100)
    with gv.Registry() as reg:
        loaded = gv.load_checkpoint(prefix)
        assert isinstance(loaded, dict) and loaded.prefix == prefix
        assert {k: (v.name, v.shape, v.dtype, v.trainable) for k, v in loaded.items()} == {
            "dense/kernel": ("dense/kernel", (2, 3), np.float32, True),
            "global_step": ("global_step", (), np.int64, False),
            "mask": ("mask", (2,), np.bool_, False),
        }
        assert [v.name for v in reg.variables()] == ["dense/kernel", "global_step", "mask"]
        assert gv.trainable_variables() == [loaded["dense/kernel"]]
        assert int(loaded["global_step"].numpy()) == 100


def test_load_checkpoint_keys_stay_stable_when_names_are_uniquified(tmp_path: Path) -> None:
    a = gv.Variable(np.ones(2, np.float32), name="w")
    b = gv.Variable(np.zeros(2, np.float32), name="b")
    prefix = gv.Saver({"w": a, "odd key:0": b}).save(tmp_path / "m")
    # this registry already has "w" (and "W" clashes case-insensitively)
    loaded = gv.load_checkpoint(prefix)
    assert set(loaded) == {"w", "odd key:0"}
    assert loaded["w"].name == "w_1"
    assert loaded["odd key:0"].name == "odd_key_0"
    assert loaded["w"].numpy().tolist() == [1.0, 1.0]
    # a restore through a saver built from the loaded dict uses the keys again
    loaded["w"].assign([3.0, 3.0])
    gv.Saver(dict(loaded)).restore(prefix)
    assert loaded["w"].numpy().tolist() == [1.0, 1.0]


def test_loaded_variable_initializer_rereads_the_checkpoint(tmp_path: Path) -> None:
    hold(gv.Variable(np.arange(3.0), name="w"))
    prefix = gv.Saver().save(tmp_path / "m")
    with gv.Registry():
        w = gv.load_checkpoint(prefix)["w"]
        w.assign([0.0, 0.0, 0.0])
        hold(gv.Variable(gv.ones([2]), name="new"))  # made later, initialized with everything
        gv.global_variables_initializer().run()
        assert w.numpy().tolist() == [0.0, 1.0, 2.0]


def test_checkpoint_reader(tmp_path: Path) -> None:
    hold(gv.Variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="w"))
    hold(gv.Variable(np.array([1, 2], np.int16), name="a"))
    prefix = gv.Saver().save(tmp_path / "m", global_step=4)
    reader = gv.CheckpointReader(prefix)
    assert reader.prefix == prefix and reader.global_step == 4 and reader.policy == "NONE" and not reader.plain
    assert reader.keys() == ["a", "w"]
    assert reader.has_tensor("w") and not reader.has_tensor("x")
    assert reader.get_variable_to_shape_map() == {"a": (2,), "w": (2, 3)}
    assert reader.get_variable_to_dtype_map() == {"a": np.dtype(np.int16), "w": np.dtype(np.float32)}
    assert reader.get_variable_to_trainable_map() == {"a": True, "w": True}
    np.testing.assert_array_equal(reader.get_tensor("w"), np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(gv.CheckpointMismatchError, match="Key 'x' not found in checkpoint.*it has: a, w"):
        reader.get_tensor("x")
    assert reader.verify() == []
    # the maps never read tensor data: damage the data (same size), the maps still answer
    path = prefix + ".safetensors"
    with st.SafetensorsReader(path) as r:
        offset = r.tensors["w"].begin
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff\xff")
    reader = gv.CheckpointReader(prefix)
    assert reader.get_variable_to_shape_map() == {"a": (2,), "w": (2, 3)}
    assert reader.verify() == ["w"]
    with pytest.raises(gv.CheckpointCorruptError, match="'w'.*checksum"):
        reader.get_tensor("w")
    assert reader.get_tensor("a").tolist() == [1, 2]


# --- SaveOptions / VariablePolicy ----------------------------------------------------------------


def test_save_options_policy_values() -> None:
    P = gv.VariablePolicy
    assert gv.SaveOptions().experimental_variable_policy is P.NONE
    assert gv.SaveOptions(experimental_variable_policy=None).policy is P.NONE
    for value, expected in [
        (P.SAVE_VARIABLE_DEVICES, P.SAVE_VARIABLE_DEVICES),
        ("save_variable_devices", P.SAVE_VARIABLE_DEVICES),
        ("SAVE_VARIABLE_DEVICES", P.SAVE_VARIABLE_DEVICES),
        ("Expand_Distributed_Variables", P.EXPAND_DISTRIBUTED_VARIABLES),
        ("none", P.NONE),
    ]:
        assert gv.SaveOptions(experimental_variable_policy=value).experimental_variable_policy is expected
    assert not P.NONE.saves_devices() and P.SAVE_VARIABLE_DEVICES.saves_devices() and P.EXPAND_DISTRIBUTED_VARIABLES.saves_devices()
    with pytest.raises(gv.InvalidArgumentError, match='Invalid VariablePolicy value "x"'):
        gv.SaveOptions(experimental_variable_policy="x")
    with pytest.raises(gv.InvalidArgumentError, match='Invalid VariablePolicy value "3"'):
        gv.SaveOptions(experimental_variable_policy=3)  # type: ignore[arg-type]
    with pytest.raises(gv.InvalidArgumentError, match="progress"):
        gv.SaveOptions(progress="yes")  # type: ignore[arg-type]
    assert gv.SaveOptions().commit_timeout == 300.0 and gv.SaveOptions(commit_timeout=2).commit_timeout == 2
    for bad in (0, -1.0, float("nan"), float("inf"), True, "60"):
        with pytest.raises(gv.InvalidArgumentError, match="SaveOptions.commit_timeout must be a finite number"):
            gv.SaveOptions(commit_timeout=bad)  # type: ignore[arg-type]


def test_save_options_per_call_override(tmp_path: Path) -> None:
    hold(gv.Variable(np.ones(2, np.float32), name="w"))
    saver = gv.Saver()
    prefix = saver.save(tmp_path / "m", options=gv.SaveOptions(experimental_variable_policy="save_variable_devices"))
    assert read_index(prefix)["policy"] == "SAVE_VARIABLE_DEVICES"
    with pytest.raises(gv.InvalidArgumentError, match="options must be a gv.SaveOptions"):
        saver.save(tmp_path / "m", options="none")  # type: ignore[arg-type]


def test_state_file_lists_only_its_own_folder(tmp_path: Path) -> None:
    hold(gv.Variable(np.ones(2, np.float32), name="w"))
    saver = gv.Saver(max_to_keep=3)
    a1 = saver.save(tmp_path / "a" / "m", global_step=1)
    b2 = saver.save(tmp_path / "b" / "m", global_step=2)
    a3 = saver.save(tmp_path / "a" / "m", global_step=3)
    cs = gv.get_checkpoint_state(tmp_path / "a")
    assert cs is not None and cs.all_model_checkpoint_paths == [a1, a3]
    cs = gv.get_checkpoint_state(tmp_path / "b")
    assert cs is not None and cs.all_model_checkpoint_paths == [b2]
    assert saver.last_checkpoints == [a1, b2, a3]
    saver.save(tmp_path / "a" / "m", global_step=4)  # retention still spans both folders: a1 goes
    assert not os.path.exists(a1 + ".index.json") and os.path.exists(b2 + ".index.json")


def test_reader_streams_an_empty_tensor_through_an_empty_buffer(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    safetensors.numpy.save_file({"e": np.zeros((0, 3), np.float32)}, str(path))
    with st.SafetensorsReader(path) as reader:
        assert list(reader.read_chunks("e", bytearray(0), expected_checksum=xxhash.xxh3_64_hexdigest(b""))) == []
        with pytest.raises(gv.InvalidArgumentError, match="staging buffer"):
            reader.read_chunks("e", memoryview(b"x"))  # read-only


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc to tell a zombie from a live process")
def test_temps_of_a_dead_unreaped_process_are_stale(tmp_path: Path) -> None:
    hold(gv.Variable(np.ones(2, np.float32), name="w"))
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stale = tmp_path / _temp_of(tmp_path / "m.safetensors", zombie.pid)
        stale.write_bytes(b"partial")
        gv.Saver().save(tmp_path / "m")
        assert not stale.exists()
    finally:
        zombie.wait()


def test_progress_bar_on_request_and_silent_by_default(tmp_path, capsys) -> None:
    pytest.importorskip("tqdm", reason="the progress bar needs tqdm (the test extra installs it)")
    w = gv.Variable(np.zeros((64, 64), np.float32), name="w")  # noqa: F841 (the registry is weak)
    saver = gv.Saver()
    prefix = saver.save(str(tmp_path / "m"))  # small and not a terminal: no bar
    saver.restore(prefix)
    assert capsys.readouterr().err == ""
    prefix = saver.save(str(tmp_path / "m2"), options=gv.SaveOptions(progress=True))
    assert "saving m2" in capsys.readouterr().err
    saver.restore(prefix, progress=True)
    assert "restoring m2" in capsys.readouterr().err
    with pytest.raises(gv.InvalidArgumentError, match="progress must be"):
        saver.restore(prefix, progress="yes")  # type: ignore[arg-type]
