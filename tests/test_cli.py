"""``python -m gpuvars``: inspect (TF's inspect_checkpoint), verify, devices and the demo job."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst
import safetensors.numpy

import gpuvars as gv
from gpuvars.checkpoint import _stformat as st
from gpuvars.cli import main

# A child imports the gpuvars this process imported: same interpreter, environment and working directory.
ENV = dict(os.environ)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpuvars", *args], capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.fixture
def prefix(tmp_path: Path) -> str:
    w = gv.Variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="dense/w")
    b = gv.Variable(np.array([1, 2, 3], np.int64), name="dense/b", trainable=False)
    opts = gv.SaveOptions(experimental_variable_policy="save_variable_devices")
    out = gv.Saver([w, b], options=opts).save(tmp_path / "model.ckpt", global_step=7)
    return out


def test_inspect_lists_tensors(prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", prefix]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"# checkpoint {prefix} (policy SAVE_VARIABLE_DEVICES, global_step 7)"
    assert out[1:] == ["dense/b (I64) [3] /cpu:0", "dense/w (F32) [2,3] /cpu:0", "# Total number of params: 9"]


def test_inspect_without_devices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = gv.Variable(np.float32(2.5), name="scalar")
    e = gv.Variable(np.zeros((0, 4), np.float16), name="empty")
    p = gv.Saver([s, e]).save(tmp_path / "m")
    assert main(["inspect", p]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == ["empty (F16) [0,4]", "scalar (F32) []", "# Total number of params: 1"]


def test_inspect_tensor_and_all(prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", prefix, "--tensor", "dense/w"]) == 0
    assert capsys.readouterr().out == "tensor_name:  dense/w\n[[0. 1. 2.]\n [3. 4. 5.]]\n"
    assert main(["inspect", prefix, "--all"]) == 0
    out = capsys.readouterr().out
    assert "tensor_name:  dense/b\n[1 2 3]\n" in out
    assert "tensor_name:  dense/w\n[[0. 1. 2.]\n [3. 4. 5.]]\n" in out
    assert out.rstrip().endswith("# Total number of params: 9")


def test_inspect_unknown_tensor(prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", prefix, "--tensor", "nope"]) == 1
    captured = capsys.readouterr()
    assert "Key nope not found in checkpoint" in captured.err and captured.out == ""


def test_inspect_plain_safetensors_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "hf.safetensors")
    safetensors.numpy.save_file({"embed": np.ones((4, 2), np.float32), "ids": np.arange(3, dtype=np.int32)}, path)
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"# plain safetensors file {path}")
    assert out[1:] == ["embed (F32) [4,2]", "ids (I32) [3]", "# Total number of params: 11"]
    assert main(["inspect", path, "--tensor", "ids"]) == 0
    assert capsys.readouterr().out == "tensor_name:  ids\n[0 1 2]\n"
    assert main(["verify", path]) == 0
    assert "structure valid" in capsys.readouterr().out


def test_verify(prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", prefix]) == 0
    assert capsys.readouterr().out == f"ok: {prefix}: 2 tensors verified\n"
    data = prefix + ".safetensors"
    with st.SafetensorsReader(data) as r:
        offset = r.tensors["dense/w"].end - 1
    with open(data, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))
    assert main(["verify", prefix]) == 1
    err = capsys.readouterr().err
    assert "DAMAGED" in err and "dense/w" in err and "dense/b" not in err


def test_verify_structural_damage(prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    os.truncate(prefix + ".safetensors", 100)
    assert main(["verify", prefix]) == 1
    assert "error:" in capsys.readouterr().err


def test_nonexistent_prefix_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    for command in ("inspect", "verify"):
        result = run_cli(command, str(tmp_path / "nope"))
        assert result.returncode == 1
        assert "error: The passed save_path is not a valid checkpoint" in result.stderr and "nope" in result.stderr
        assert "Traceback" not in result.stderr


def test_inspect_through_python_dash_m(prefix: str) -> None:
    result = run_cli("inspect", prefix)
    assert result.returncode == 0, result.stderr
    assert "dense/w (F32) [2,3] /cpu:0" in result.stdout.splitlines()


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["demo", "--steps", "0"])
    assert info.value.code == 2
    assert "--steps" in capsys.readouterr().err


def test_devices_command() -> None:
    result = run_cli("devices")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "/cpu:0"
    assert "# CPU backend:" in result.stdout


def test_demo_job(tmp_path: Path) -> None:
    result = run_cli("demo", "--steps", "20", "--every", "10", "--ckpt-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("ok: training continued from the checkpoint")
    assert "saving model.ckpt-10 in the background" in result.stdout
    assert "saving model.ckpt-20 in the background" in result.stdout
    assert gv.latest_checkpoint(tmp_path) == str(tmp_path / "model.ckpt-20")
    assert main(["verify", str(tmp_path / "model.ckpt-20")]) == 0


def test_demo_job_default_folder_is_removed() -> None:
    result = run_cli("demo", "--steps", "20", "--every", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout
    folder = result.stdout.split("checkpoints in ", 1)[1].split()[0].rstrip(";")
    assert not os.path.exists(folder)


def test_demo_replicas_trains_mirrored_and_loads_expand_without_strategy(tmp_path: Path) -> None:
    result = run_cli("demo", "--replicas", "2", "--steps", "20", "--every", "10", "--ckpt-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 replicas on ['/cpu:0', '/cpu:1']" in result.stdout
    assert "loaded model.ckpt-20 without a strategy: MirroredVariable on ['/cpu:0', '/cpu:1']" in result.stdout
    assert (tmp_path / "model.ckpt-20.replica-1-of-2.safetensors").exists()
    assert result.stdout.rstrip().endswith("ok: training continued from the checkpoint")
    single = run_cli("demo", "--steps", "20", "--every", "10")
    # MEAN-aggregated data parallelism over equal shards takes the full-batch step: same losses
    assert [l for l in result.stdout.splitlines() if "step    10" in l][0].split("saving")[0] == [
        l for l in single.stdout.splitlines() if "step    10" in l
    ][0].split("saving")[0]


@pytest.mark.parametrize("field, value", [("dtype", ["F32"]), ("dtype", 5), ("shape", "3"), ("data_offsets", {"a": 1})])
def test_inspect_header_field_of_the_wrong_json_type(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     field: str, value: object) -> None:
    path = tmp_path / "bad.safetensors"
    text = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], field: value}}).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 8)
    for command in (["inspect", str(path)], ["verify", str(path)]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(path) in err and "'w'" in err and field in err
    result = run_cli("inspect", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr and "'w'" in result.stderr


def test_fifo_in_place_of_the_index_is_an_error_not_a_hang(prefix: str) -> None:
    index = prefix + ".index.json"
    os.unlink(index)
    os.mkfifo(index)
    for command in ("inspect", "verify"):
        result = run_cli(command, prefix, timeout=60)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "error:" in result.stderr and "index.json: checkpoint index is a FIFO" in result.stderr


def test_inspect_all_reads_each_file_once_and_closes_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keep = [gv.Variable(np.full(2, i, np.int16), name=f"v{i:03d}") for i in range(200)]
    prefix = gv.Saver(keep).save(tmp_path / "m")
    fds = len(os.listdir("/proc/self/fd"))
    assert main(["inspect", prefix, "--all"]) == 0
    out = capsys.readouterr().out
    assert out.count("tensor_name:") == 200 and "tensor_name:  v199\n[199 199]\n" in out
    assert len(os.listdir("/proc/self/fd")) == fds
    assert main(["verify", prefix]) == 0
    assert len(os.listdir("/proc/self/fd")) == fds


def test_inspect_absurd_index_shape_is_an_error_not_a_traceback(prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    index_path = Path(prefix + ".index.json")
    index = json.loads(index_path.read_text())
    for shape in ([10**30], [2**62, 4]):  # the second overflowed np.prod(dtype=int64)
        index["variables"]["dense/w"]["shape"] = shape
        index_path.write_text(json.dumps(index))
        assert main(["inspect", prefix]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: checkpoint index") and "'dense/w'" in err and str(shape[0]) in err
    result = run_cli("inspect", prefix)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "'dense/w'" in result.stderr


# --- any damage: an error line and exit 1, never a traceback ----------------------------------------

JSON_SCALARS = (hst.none() | hst.booleans() | hst.integers() | hst.integers(-(2**80), 2**80) | hst.just(10**30)
                | hst.floats(allow_nan=False) | hst.text(max_size=6) | hst.sampled_from(["F32", "I64", "mirrored", "data"]))
JSON_VALUES = hst.recursive(
    JSON_SCALARS, lambda kids: hst.lists(kids, max_size=3) | hst.dictionaries(hst.text(max_size=4), kids, max_size=3),
    max_leaves=6,
)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out += _paths(v, path + (k,))
    return out


def _set(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    node[path[0]] = _set(node[path[0]], path[1:], value)
    return node


def _run(*argv: str) -> None:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(list(argv))  # an exception escaping here fails the test
    assert code in (0, 1) and "Traceback" not in err.getvalue()
    assert code == 0 or err.getvalue().startswith(("error: ", "DAMAGED: "))


def test_cli_survives_any_damage_to_any_file(tmp_path: Path) -> None:
    """Bit flips and truncations of each file of an EXPAND checkpoint (data, replica files,
    device map, index), and arbitrary JSON anywhere in the index."""
    gv.config.set_logical_devices("cpu", 2)
    with gv.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
        w = gv.Variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="w")
    b = gv.Variable(np.arange(3, dtype=np.int64), name="b")
    opts = gv.SaveOptions(experimental_variable_policy="expand_distributed_variables")
    prefix = gv.Saver([w, b], options=opts).save(tmp_path / "m", global_step=3)
    pristine = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "checkpoint"}
    assert sorted(pristine) == ["m-3.devices.json", "m-3.index.json", "m-3.replica-0-of-2.safetensors",
                                "m-3.replica-1-of-2.safetensors", "m-3.safetensors"]
    index = json.loads(pristine["m-3.index.json"])
    paths = _paths(index)[1:]
    shapes = [p for p in paths if p[-1] == "shape"]

    damage = hst.one_of(
        hst.tuples(hst.just("flip"), hst.sampled_from(sorted(pristine)), hst.integers(0, 10**6), hst.integers(0, 7)),
        hst.tuples(hst.just("truncate"), hst.sampled_from(sorted(pristine)), hst.integers(0, 10**6)),
        hst.tuples(hst.just("json"), hst.sampled_from(paths), JSON_VALUES),
        hst.tuples(hst.just("json"), hst.sampled_from(shapes),
                   hst.lists(hst.integers(0, 8) | hst.integers(0, 2**70) | hst.just(10**30), max_size=3)),
    )

    @settings(max_examples=250, deadline=None)
    @given(damages=hst.lists(damage, min_size=1, max_size=3))
    def check(damages: list[tuple[Any, ...]]) -> None:
        files = dict(pristine)
        obj = json.loads(files["m-3.index.json"])
        for d in damages:  # JSON edits first (a later one may find its path replaced: skipped)
            if d[0] == "json":
                try:
                    obj = _set(obj, d[1], d[2])
                except (KeyError, IndexError, TypeError):
                    pass
        files["m-3.index.json"] = json.dumps(obj).encode()
        for d in damages:
            if d[0] == "flip" and files[d[1]]:
                raw = bytearray(files[d[1]])
                raw[d[2] % len(raw)] ^= 1 << d[3]
                files[d[1]] = bytes(raw)
            elif d[0] == "truncate" and files[d[1]]:
                files[d[1]] = files[d[1]][: d[2] % len(files[d[1]])]
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
        _run("inspect", prefix)
        _run("inspect", prefix, "--all")
        _run("inspect", prefix, "--tensor", "w")
        _run("verify", prefix)

    check()
    for name, data in pristine.items():
        (tmp_path / name).write_bytes(data)
    _run("verify", prefix)


def test_cli_damage_through_python_dash_m(prefix: str) -> None:
    data = Path(prefix + ".safetensors")
    raw = bytearray(data.read_bytes())
    raw[12] ^= 0x20  # inside the header's JSON
    data.write_bytes(bytes(raw))
    for command in ("inspect", "verify"):
        result = run_cli(command, prefix, *(["--all"] if command == "inspect" else []))
        assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
