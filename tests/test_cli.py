"""``python -m gpuvars``: inspect (TF's inspect_checkpoint), verify, devices and the demo job."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import gpuvars as gv
from gpuvars.checkpoint import _stformat as st
from gpuvars.cli import main

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}


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
    assert "saved model.ckpt-10" in result.stdout and "saved model.ckpt-20" in result.stdout
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
    assert [l for l in result.stdout.splitlines() if "step    10" in l][0].split("saved")[0] == [
        l for l in single.stdout.splitlines() if "step    10" in l
    ][0].split("saved")[0]


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
