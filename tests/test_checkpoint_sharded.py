"""The sharded layout (issue 11, item 4): ``SaveOptions(max_shard_size=...)`` writes
``P-0000K-of-0000N.safetensors`` plus a ``weight_map`` (index version 2); Hugging Face
sharded folders (``model.safetensors.index.json``) written by other tools load; and
``export_hf`` / ``python -m gpuvars export`` write one that ``safetensors`` reads."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import gpuvars as gv
from gpuvars import cli
from gpuvars.checkpoint import _format
from gpuvars.checkpoint import _stformat as st
from gpuvars.checkpoint._write import shard_entries
from gpuvars.checkpoint.export import export_hf

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _shards(folder: pathlib.Path, base: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if _format.shard_base(n) == base)


def _index(prefix: str) -> dict[str, Any]:
    return json.loads(pathlib.Path(prefix + ".index.json").read_text())


def _model(n: int = 10, size: int = 100) -> list[gv.Variable]:
    return [gv.Variable(np.arange(size, dtype=np.float32) + 1000 * i, name=f"layer{i}/w") for i in range(n)]


# --- saving sharded -----------------------------------------------------------------------------


@pytest.mark.parametrize("shard_size, expected", [(400, 10), (800, 5), (1000, 5), (1200, 4), (4000, 1), ("1MB", 1)])
def test_round_trip_at_several_shard_sizes(cpu_backend: str, tmp_path: pathlib.Path, shard_size: Any,
                                           expected: int) -> None:
    variables = _model()  # 10 tensors of 400 bytes
    saver = gv.Saver()
    prefix = saver.save(str(tmp_path / "m"), options=gv.SaveOptions(max_shard_size=shard_size))
    names = _shards(tmp_path, "m")
    assert names == [f"m-{k:05d}-of-{expected:05d}.safetensors" for k in range(1, expected + 1)]
    assert not (tmp_path / "m.safetensors").exists()
    index = _index(prefix)
    assert index["version"] == 2
    assert set(index["files"]) == set(names) and all(index["files"][n]["role"] == "data" for n in names)
    assert list(index["weight_map"]) == [f"layer{i}/w" for i in range(10)]
    assert {k: v["file"] for k, v in index["variables"].items()} == index["weight_map"]
    limit = gv.SaveOptions(max_shard_size=shard_size).shard_bytes
    assert limit is not None
    for name in names:  # each shard: at most the limit in tensor bytes, a plain safetensors file
        tensors = safetensors_numpy.load_file(str(tmp_path / name))
        assert sum(t.nbytes for t in tensors.values()) <= limit
        for key, value in tensors.items():
            assert index["weight_map"][key] == name
            i = int(key[5:].split("/")[0])
            np.testing.assert_array_equal(value, np.arange(100, dtype=np.float32) + 1000 * i)
    for v in variables:
        v.assign(np.zeros(100, np.float32))
    result = saver.restore(prefix)
    assert set(result.restored) == {v.name for v in variables} and result.unused == ()
    for i, v in enumerate(variables):
        np.testing.assert_array_equal(v.numpy(), np.arange(100) + 1000 * i)
    with gv.Registry():
        loaded = gv.load_checkpoint(prefix, verify_first=True)
        np.testing.assert_array_equal(loaded["layer7/w"].numpy(), np.arange(100) + 7000)
    with gv.CheckpointReader(prefix) as reader:
        assert reader.verify() == []
        assert reader.data_files == names
        np.testing.assert_array_equal(reader.get_tensor("layer3/w"), np.arange(100) + 3000)


def test_a_tensor_larger_than_the_shard_size_gets_a_shard_of_its_own(cpu_backend: str, tmp_path: pathlib.Path) -> None:
    small_a = gv.Variable(np.ones(10, np.float32), name="a")
    big = gv.Variable(np.arange(2000, dtype=np.float32), name="big")  # 8000 bytes
    small_b = gv.Variable(np.full(10, 2, np.float32), name="b")
    small_c = gv.Variable(np.full(10, 3, np.float32), name="c")
    saver = gv.Saver()
    prefix = saver.save(str(tmp_path / "m"), options=gv.SaveOptions(max_shard_size=100))
    wm = _index(prefix)["weight_map"]
    assert wm == {"a": "m-00001-of-00003.safetensors", "big": "m-00002-of-00003.safetensors",
                  "b": "m-00003-of-00003.safetensors", "c": "m-00003-of-00003.safetensors"}
    assert list(safetensors_numpy.load_file(str(tmp_path / wm["big"]))) == ["big"]
    for v in (small_a, big, small_b, small_c):
        v.assign(np.zeros(v.shape, v.dtype))
    saver.restore(prefix, verify_first=True)
    np.testing.assert_array_equal(big.numpy(), np.arange(2000))
    np.testing.assert_array_equal(small_c.numpy(), np.full(10, 3))


def test_shard_entries_cuts_greedily() -> None:
    assert shard_entries([], [], 10) == [[]]
    assert shard_entries("abcd", [5, 5, 5, 5], 10) == [["a", "b"], ["c", "d"]]
    assert shard_entries("abc", [3, 30, 3], 10) == [["a"], ["b"], ["c"]]
    assert shard_entries("abc", [10, 0, 1], 10) == [["a", "b"], ["c"]]


def test_many_shards_in_parallel_and_a_big_checkpoint(cpu_backend: str, tmp_path: pathlib.Path) -> None:
    # 80 MiB: above _parallel.MIN_PARALLEL_BYTES, so the restore's threaded reads span the shards
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(1 << 20).astype(np.float32) for _ in range(20)]
    variables = [gv.Variable(v, name=f"t{i}") for i, v in enumerate(values)]
    saver = gv.Saver()
    prefix = saver.save(str(tmp_path / "m"), options=gv.SaveOptions(max_shard_size="9MiB"))
    assert len(_shards(tmp_path, "m")) == 10
    for v in variables:
        v.assign(np.zeros(1 << 20, np.float32))
    saver.restore(prefix)
    for v, want in zip(variables, values):
        np.testing.assert_array_equal(v.numpy(), want)


def test_an_empty_model_and_odd_dtypes_shard(tmp_path: pathlib.Path) -> None:
    a = gv.Variable(np.zeros((0, 3), np.float16), name="empty")
    b = gv.Variable(np.array([True, False]), name="mask")
    c = gv.Variable(np.arange(6, dtype=np.int64).reshape(2, 3), name="ints")
    prefix = gv.Saver().save(str(tmp_path / "m"), options=gv.SaveOptions(max_shard_size=16))
    with gv.Registry():
        loaded = gv.load_checkpoint(prefix)
        assert loaded["empty"].shape == (0, 3) and loaded["mask"].numpy().tolist() == [True, False]
        np.testing.assert_array_equal(loaded["ints"].numpy(), c.numpy())
    del a, b


def test_resaving_a_prefix_removes_the_other_layouts_files(tmp_path: pathlib.Path) -> None:
    _vars = _model()
    saver = gv.Saver()
    saver.save(str(tmp_path / "m"), options=gv.SaveOptions(max_shard_size=400))
    assert len(_shards(tmp_path, "m")) == 10
    saver.save(str(tmp_path / "m"), options=gv.SaveOptions(max_shard_size=2000))
    assert _shards(tmp_path, "m") == [f"m-0000{k}-of-00002.safetensors" for k in (1, 2)]
    prefix = saver.save(str(tmp_path / "m"))
    assert _shards(tmp_path, "m") == [] and (tmp_path / "m.safetensors").exists()
    assert _index(prefix)["version"] == 1 and "weight_map" not in _index(prefix)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "m.index.json", "m.safetensors"]


def test_resaving_over_a_damaged_index_still_removes_its_shards_and_nothing_outside(tmp_path: pathlib.Path) -> None:
    _vars = _model()
    saver = gv.Saver()
    prefix = saver.save(str(tmp_path / "m"), options=gv.SaveOptions(max_shard_size=400))
    os.unlink(tmp_path / _shards(tmp_path, "m")[3])  # the old checkpoint is damaged: its index names a missing shard
    saver.save(str(tmp_path / "m"))  # retiring it reads only its file names
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "m.index.json", "m.safetensors"]

    outside = tmp_path.parent / "m-outside.safetensors"
    outside.write_bytes(b"not ours")
    index = _index(prefix)
    index["files"]["../m-outside.safetensors"] = {"role": "data", "size": 8, "checksum": "0"}
    (tmp_path / "m.index.json").write_text(json.dumps(index))  # a hostile name: the whole list is ignored
    saver.save(str(tmp_path / "m"))
    assert outside.read_bytes() == b"not ours"
    assert gv.CheckpointReader(prefix).verify() == []
    outside.unlink()


def test_retention_deletes_every_shard(tmp_path: pathlib.Path) -> None:
    _vars = _model()
    saver = gv.Saver(max_to_keep=1, options=gv.SaveOptions(max_shard_size=800))
    saver.save(str(tmp_path / "m"), global_step=1)
    saver.save(str(tmp_path / "m"), global_step=2)
    assert _shards(tmp_path, "m-1") == [] and len(_shards(tmp_path, "m-2")) == 5


def test_a_shard_file_passed_directly_opens_its_checkpoint(tmp_path: pathlib.Path) -> None:
    _vars = _model(3)
    prefix = gv.Saver().save(str(tmp_path / "m"), options=gv.SaveOptions(max_shard_size=400))
    with gv.CheckpointReader(str(tmp_path / "m-00002-of-00003.safetensors")) as reader:
        assert not reader.plain and reader.prefix == prefix and len(reader.keys()) == 3
    os.unlink(prefix + ".index.json")  # retired: its shards are not a checkpoint
    with pytest.raises(gv.CheckpointNotFoundError, match=r"m\.index\.json is missing"):
        gv.CheckpointReader(str(tmp_path / "m-00002-of-00003.safetensors"))


def test_max_shard_size_validation() -> None:
    assert gv.SaveOptions(max_shard_size="5GB").max_shard_size == 5 * 10**9
    assert gv.SaveOptions(max_shard_size="500MB").shard_bytes == 500 * 10**6
    assert gv.SaveOptions(max_shard_size="2GiB").shard_bytes == 2 << 30
    assert gv.SaveOptions(max_shard_size="10kib").shard_bytes == 10 << 10
    assert gv.SaveOptions(max_shard_size=12345).shard_bytes == 12345
    assert gv.SaveOptions().shard_bytes is None
    for bad, msg in [(0, "positive"), (-5, "positive"), ("0MB", "positive"), (True, "positive int"),
                     (1.5, "positive int"), ("1.5GB", "not a size"), ("5 XB", "not a size"), ("", "not a size"),
                     ("5Gb", "ambiguous"), ("5mb", "ambiguous"), ([1], "positive int")]:
        with pytest.raises(gv.InvalidArgumentError, match=msg):
            gv.SaveOptions(max_shard_size=bad)
    with pytest.raises(gv.InvalidArgumentError, match="not a size"):
        export_hf("x", "y", max_shard_size="lots")


# --- distributed variables -------------------------------------------------------------------------


def test_expand_distributed_variables_with_sharding(four_cpus: str, tmp_path: pathlib.Path) -> None:
    devices = ["/cpu:0", "/cpu:1", "/cpu:2", "/cpu:3"]
    strategy = gv.MirroredStrategy(devices[:2])
    with strategy.scope():
        w = gv.Variable(np.arange(400, dtype=np.float32), name="w")
    emb = gv.ShardedVariable(np.arange(300, dtype=np.float32), 3, name="emb", devices=devices[1:])
    b = gv.Variable(np.ones(200, np.float32), name="b", device="/cpu:3")
    opts = gv.SaveOptions(experimental_variable_policy="expand_distributed_variables", max_shard_size=1000)
    saver = gv.Saver(options=opts)
    prefix = saver.save(str(tmp_path / "m"), global_step=3)
    files = sorted(os.listdir(tmp_path))
    assert [f for f in files if ".replica-" in f] == [f"m-3.replica-{k}-of-3.safetensors" for k in range(3)]
    assert len(_shards(tmp_path, "m-3")) == 3  # w (1600 bytes), emb (1200), b (800): one shard each
    index = _index(prefix)
    assert index["version"] == 2 and index["variables"]["w"]["components"]
    assert index["devices" if False else "files"]["m-3.devices.json"]["role"] == "devices"
    with gv.CheckpointReader(prefix) as reader:
        assert reader.verify() == []
    w.assign(np.zeros(400, np.float32))
    emb.assign(np.zeros(300, np.float32))
    saver.restore(prefix, verify_first=True)
    np.testing.assert_array_equal(w.numpy(), np.arange(400))
    np.testing.assert_array_equal(emb.numpy(), np.arange(300))
    with gv.Registry():
        loaded = gv.load_checkpoint(prefix)
        assert isinstance(loaded["w"], gv.MirroredVariable) and isinstance(loaded["emb"], gv.ShardedVariable)
        np.testing.assert_array_equal(loaded["emb"].numpy(), np.arange(300))
        assert loaded["b"].device == "/cpu:3"
    del b


# --- damage ----------------------------------------------------------------------------------------


def _flip(path: pathlib.Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def _tensor_offset(path: pathlib.Path, key: str) -> int:
    with st.SafetensorsReader(str(path)) as reader:
        return reader.tensors[key].begin


def test_damage_to_one_shard_is_caught_by_verify_and_restore(tmp_path: pathlib.Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    variables = _model()
    saver = gv.Saver()
    prefix = saver.save(str(tmp_path / "m"), options=gv.SaveOptions(max_shard_size=800))
    shard = tmp_path / "m-00003-of-00005.safetensors"
    _flip(shard, _tensor_offset(shard, "layer5/w") + 7)
    with gv.CheckpointReader(prefix) as reader:
        assert reader.verify() == ["layer5/w"]
    assert cli.main(["verify", prefix]) == 1
    assert "DAMAGED" in capsys.readouterr().err
    for v in variables:
        v.assign(np.zeros(100, np.float32))
    with pytest.raises(gv.CheckpointCorruptError, match=r"checksum failed for 'layer5/w'; nothing was restored"):
        saver.restore(prefix, verify_first=True)
    assert all(not v.numpy().any() for v in variables)  # untouched
    with pytest.raises(gv.CheckpointCorruptError, match="layer5/w"):
        saver.restore(prefix)
    with pytest.raises(gv.CheckpointCorruptError):
        export_hf(prefix, tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert [n for n in os.listdir(tmp_path / "hf")] == []  # nothing of the failed export is left


def test_a_truncated_missing_or_swapped_shard_is_caught_at_open(tmp_path: pathlib.Path) -> None:
    _vars = _model()
    prefix = gv.Saver().save(str(tmp_path / "m"), options=gv.SaveOptions(max_shard_size=800))
    one, two = tmp_path / "m-00001-of-00005.safetensors", tmp_path / "m-00002-of-00005.safetensors"
    data_one, data_two = one.read_bytes(), two.read_bytes()
    one.write_bytes(data_two)  # same size, another shard's header: fails the header checksum
    with gv.CheckpointReader(prefix) as reader:
        assert reader.verify() == ["<header of m-00001-of-00005.safetensors>"]
    with pytest.raises(gv.CheckpointCorruptError, match="header fails the checksum"):
        gv.Saver().restore(prefix)
    one.write_bytes(data_one[:-1])
    with pytest.raises(gv.CheckpointCorruptError, match=r"m-00001-of-00005\.safetensors' is .* bytes, the index recorded"):
        gv.CheckpointReader(prefix)
    one.unlink()
    with pytest.raises(gv.CheckpointCorruptError, match=r"m-00001-of-00005\.safetensors' listed in the index is missing"):
        gv.Saver().restore(prefix)


@pytest.mark.parametrize("case", ["not-object", "not-a-data-file", "wrong-file", "unknown-key", "missing-key",
                                  "v1-with-map"])
def test_a_bad_weight_map_in_a_gpuvars_index(tmp_path: pathlib.Path, case: str) -> None:
    _vars = _model(4)
    prefix = gv.Saver().save(str(tmp_path / "m"), options=gv.SaveOptions(max_shard_size=800))
    index = _index(prefix)
    wm = index["weight_map"]
    if case == "not-object":
        index["weight_map"] = ["m-00001-of-00002.safetensors"]
    elif case == "not-a-data-file":
        wm["layer0/w"] = "m.index.json"
    elif case == "wrong-file":
        wm["layer0/w"] = "m-00002-of-00002.safetensors"
    elif case == "unknown-key":
        wm["ghost"] = "m-00001-of-00002.safetensors"
    elif case == "missing-key":
        del wm["layer3/w"]
    else:
        index["version"] = 1
    pathlib.Path(prefix + ".index.json").write_text(json.dumps(index))
    with pytest.raises(gv.CheckpointCorruptError, match=r"m\.index\.json"):
        gv.Saver().restore(prefix)


# --- Hugging Face folders written by other tools ---------------------------------------------------


def _hf_folder(folder: pathlib.Path, index_name: str = "model.safetensors.index.json") -> dict[str, np.ndarray]:
    """What transformers' save_pretrained writes: shards with metadata format pt, an index."""
    rng = np.random.default_rng(1)
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((64, 16)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((16, 16)).astype(np.float16),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((32, 16)).astype(np.float32),
        "model.norm.weight": np.ones(16, np.float32),
        "lm_head.bias": np.arange(8, dtype=np.int32),
    }
    shards = {"model-00001-of-00002.safetensors": ["model.embed_tokens.weight", "model.norm.weight"],
              "model-00002-of-00002.safetensors": ["model.layers.0.self_attn.q_proj.weight",
                                                   "model.layers.0.mlp.up_proj.weight", "lm_head.bias"]}
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for name, keys in shards.items():
        safetensors_numpy.save_file({k: tensors[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(t.nbytes for t in tensors.values())
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return tensors


def test_an_hf_sharded_folder_loads_restores_and_inspects(cpu_backend: str, tmp_path: pathlib.Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "hf"
    tensors = _hf_folder(folder)
    for path in (folder, folder / "model.safetensors.index.json", str(folder) + os.sep):
        with gv.Registry():
            loaded = gv.load_checkpoint(path)
            assert set(loaded) == set(tensors)
            for key, value in tensors.items():
                np.testing.assert_array_equal(loaded[key].numpy(), value)
                assert loaded[key].dtype == value.dtype
    targets = {k: gv.Variable(np.zeros_like(v), name=f"t{i}") for i, (k, v) in enumerate(tensors.items())}
    result = gv.Saver(var_list=targets).restore(folder / "model.safetensors.index.json", verify_first=True)
    assert result.unused == ()
    for key, var in targets.items():
        np.testing.assert_array_equal(var.numpy(), tensors[key])
    with gv.CheckpointReader(folder) as reader:
        assert reader.plain and reader.verify() == []
        assert reader.data_files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert cli.main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "safetensors sharded index" in out and "model.norm.weight (F32) [16]" in out
    assert cli.main(["verify", str(folder)]) == 0
    assert "structure valid (5 tensors" in capsys.readouterr().out


def test_an_hf_folder_with_another_index_name_or_none(tmp_path: pathlib.Path) -> None:
    _hf_folder(tmp_path / "a", "diffusion_pytorch_model.safetensors.index.json")
    with gv.Registry():
        assert len(gv.load_checkpoint(tmp_path / "a")) == 5
    (tmp_path / "b").mkdir()
    safetensors_numpy.save_file({"x": np.ones(3, np.float32)}, str(tmp_path / "b" / "model.safetensors"))
    with gv.Registry():
        assert list(gv.load_checkpoint(tmp_path / "b")) == ["x"]
    (tmp_path / "c").mkdir()
    with pytest.raises(gv.CheckpointNotFoundError, match="folder without a model.safetensors.index.json"):
        gv.load_checkpoint(tmp_path / "c")
    _hf_folder(tmp_path / "d", "one.safetensors.index.json")
    (tmp_path / "d" / "two.safetensors.index.json").write_text("{}")
    with pytest.raises(gv.CheckpointNotFoundError, match="several safetensors indexes"):
        gv.load_checkpoint(tmp_path / "d")


def test_a_gpuvars_prefix_ending_in_safetensors_still_opens_as_gpuvars(tmp_path: pathlib.Path) -> None:
    _vars = _model(2)
    prefix = gv.Saver().save(str(tmp_path / "model.safetensors"))
    for path in (prefix, prefix + ".index.json"):
        with gv.CheckpointReader(path) as reader:
            assert not reader.plain and reader.prefix == prefix


def _bad_index(folder: pathlib.Path, body: Any) -> pathlib.Path:
    path = folder / "model.safetensors.index.json"
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return path


S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
GOOD_MAP = {"model.embed_tokens.weight": S1, "model.norm.weight": S1, "model.layers.0.self_attn.q_proj.weight": S2,
            "model.layers.0.mlp.up_proj.weight": S2, "lm_head.bias": S2}

BAD_INDEXES: dict[str, tuple[Any, str]] = {
    "not-json": ("{weight_map", "is not valid JSON"),
    "nan": ('{"weight_map": {}, "metadata": {"total_size": NaN}}', "is not valid JSON"),
    "list": ([GOOD_MAP], "not a JSON object"),
    "no-weight-map": ({"metadata": {}}, "'weight_map' is not an object"),
    "weight-map-list": ({"weight_map": [S1]}, "'weight_map' is not an object"),
    "metadata-list": ({"metadata": [1], "weight_map": GOOD_MAP}, "'metadata' is not an object"),
    "total-size-string": ({"metadata": {"total_size": "12"}, "weight_map": GOOD_MAP}, "total_size '12' is not a byte count"),
    "total-size-negative": ({"metadata": {"total_size": -1}, "weight_map": GOOD_MAP}, "is not a byte count"),
    "shard-int": ({"weight_map": {**GOOD_MAP, "lm_head.bias": 2}}, r"tensor 'lm_head.bias': its shard 2 is not a file name"),
    "shard-null": ({"weight_map": {**GOOD_MAP, "lm_head.bias": None}}, "its shard None is not a file name"),
    "traversal": ({"weight_map": {**GOOD_MAP, "lm_head.bias": "../" + S2}}, r"'lm_head.bias'.*not a plain file name"),
    "absolute": ({"weight_map": {**GOOD_MAP, "lm_head.bias": "/etc/passwd"}}, r"'lm_head.bias'.*not a plain file name"),
    "subfolder": ({"weight_map": {**GOOD_MAP, "lm_head.bias": "sub/" + S2}}, "not a plain file name"),
    "backslash": ({"weight_map": {**GOOD_MAP, "lm_head.bias": "..\\" + S2}}, "not a plain file name"),
    "hidden": ({"weight_map": {**GOOD_MAP, "lm_head.bias": ".x.safetensors"}}, "not a plain file name"),
    "empty-name": ({"weight_map": {**GOOD_MAP, "lm_head.bias": ""}}, "not a plain file name"),
    "pickle-shard": ({"weight_map": {**GOOD_MAP, "lm_head.bias": "pytorch_model.bin"}}, "not a .safetensors file"),
    "missing-shard": ({"weight_map": {**GOOD_MAP, "lm_head.bias": "model-00003-of-00003.safetensors"}},
                      r"'lm_head.bias': its shard 'model-00003-of-00003.safetensors' is missing"),
    "not-in-its-shard": ({"weight_map": {**GOOD_MAP, "ghost": S1}}, r"tensor 'ghost'.*it is not in its shard"),
    "in-two-shards": ({"weight_map": {**GOOD_MAP, "model.norm.weight": S2}},
                      r"'model.norm.weight'.*not in its shard|'model.norm.weight'.*in two shards"),
    "unlisted-tensor": ({"weight_map": {k: v for k, v in GOOD_MAP.items() if k != "lm_head.bias"}},
                        r"holds tensor 'lm_head.bias', which the weight_map does not name"),
    "duplicate-key": ('{"weight_map": {"lm_head.bias": "%s", "lm_head.bias": "%s"}}' % (S2, S2),
                      "the key 'lm_head.bias' appears twice"),
}


@pytest.mark.parametrize("case", sorted(BAD_INDEXES))
def test_bad_hf_index_json_is_a_corrupt_error_naming_file_and_key(tmp_path: pathlib.Path, case: str) -> None:
    folder = tmp_path / "hf"
    _hf_folder(folder)
    body, msg = BAD_INDEXES[case]
    path = _bad_index(folder, body)
    for attempt in (lambda: gv.load_checkpoint(folder), lambda: gv.CheckpointReader(path),
                    lambda: gv.Saver(var_list=[gv.Variable(np.zeros(8, np.int32), name="x")]).restore(path)):
        with pytest.raises(gv.CheckpointCorruptError, match=msg) as info:
            attempt()
        assert "model.safetensors.index.json" in str(info.value)
    assert cli.main(["inspect", str(folder)]) == 1


def test_a_tensor_in_two_shards_is_named(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "hf"
    _hf_folder(folder)
    # the second shard also holds model.norm.weight, which the map puts in the first
    extra = safetensors_numpy.load_file(str(folder / S2))
    extra["model.norm.weight"] = np.ones(16, np.float32)
    safetensors_numpy.save_file(extra, str(folder / S2))
    with pytest.raises(gv.CheckpointCorruptError, match=r"'model.norm.weight'.*in two shards: '%s'.*'%s'" % (S1, S2)):
        gv.load_checkpoint(folder)


def test_a_damaged_hf_shard_is_caught(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "hf"
    _hf_folder(folder)
    data = (folder / S2).read_bytes()
    (folder / S2).write_bytes(data[:-4])  # truncated: the header's offsets run past the end
    with pytest.raises(gv.CheckpointCorruptError, match=S2):
        gv.load_checkpoint(folder)
    (folder / S2).write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(gv.CheckpointCorruptError, match="header length"):
        gv.CheckpointReader(folder)


def test_an_hf_index_that_is_a_fifo_or_folder_never_blocks(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors.index.json").mkdir()
    with pytest.raises(gv.CheckpointCorruptError, match="not a regular file|a directory"):
        gv.load_checkpoint(folder)
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "f" / "model.safetensors.index.json"
        fifo.parent.mkdir()
        os.mkfifo(fifo)
        with pytest.raises(gv.CheckpointCorruptError, match="FIFO"):
            gv.CheckpointReader(fifo)


# --- export ----------------------------------------------------------------------------------------


def _transformers_style_load(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """What transformers' load_sharded_checkpoint does: read the index, open each shard
    once, check each shard's metadata format, collect every tensor of the weight_map."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert isinstance(index["metadata"]["total_size"], int)
    out: dict[str, np.ndarray] = {}
    from safetensors import safe_open

    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), framework="np") as f:
            assert f.metadata().get("format") in ("pt", "tf", "flax", "mlx")
            for key in f.keys():
                assert index["weight_map"][key] == shard
                out[key] = f.get_tensor(key)
    assert set(out) == set(index["weight_map"])
    assert sum(v.nbytes for v in out.values()) == index["metadata"]["total_size"]
    return out


@pytest.mark.parametrize("shard_size, count", [(1000, 5), (400, 10), (4000, 1), ("2KB", 2)])
def test_export_reads_back_with_safetensors(cpu_backend: str, tmp_path: pathlib.Path, shard_size: Any,
                                            count: int) -> None:
    variables = _model()
    prefix = gv.Saver().save(str(tmp_path / "ckpt" / "m"), global_step=5, options=gv.SaveOptions(max_shard_size=800))
    out = tmp_path / "hf"
    index_path = export_hf(prefix, out, max_shard_size=shard_size)
    assert index_path == str(out / "model.safetensors.index.json")
    names = [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    assert sorted(os.listdir(out)) == names + ["model.safetensors.index.json"]
    got = _transformers_style_load(out)
    for i, v in enumerate(variables):
        np.testing.assert_array_equal(got[v.name], np.arange(100) + 1000 * i)
    for name in names:  # each shard alone, through the safetensors package
        assert set(safetensors_numpy.load_file(str(out / name))) <= set(got)
    # and back into gpuvars
    for v in variables:
        v.assign(np.zeros(100, np.float32))
    gv.Saver().restore(out)
    np.testing.assert_array_equal(variables[9].numpy(), np.arange(100) + 9000)


def test_export_of_an_unsharded_checkpoint_and_over_an_earlier_export(tmp_path: pathlib.Path) -> None:
    _vars = _model()
    prefix = gv.Saver().save(str(tmp_path / "m"))
    out = tmp_path / "hf"
    export_hf(prefix, out, max_shard_size=400)
    assert len(os.listdir(out)) == 11
    (out / "README.md").write_text("mine")
    export_hf(prefix, out)  # 5GB: one shard; the earlier shards go, other files stay
    assert sorted(os.listdir(out)) == ["README.md", "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    assert len(_transformers_style_load(out)) == 10


def test_export_of_an_hf_folder_reshards_it(tmp_path: pathlib.Path) -> None:
    tensors = _hf_folder(tmp_path / "in")
    export_hf(tmp_path / "in", tmp_path / "out", max_shard_size=1)
    got = _transformers_style_load(tmp_path / "out")
    assert len(os.listdir(tmp_path / "out")) == 6
    for key, value in tensors.items():
        np.testing.assert_array_equal(got[key], value)


def test_export_refuses_to_overwrite_its_source(tmp_path: pathlib.Path) -> None:
    _vars = _model(2)
    prefix = gv.Saver().save(str(tmp_path / "model"), options=gv.SaveOptions(max_shard_size=400))
    with pytest.raises(gv.InvalidArgumentError, match="its own folder"):
        export_hf(prefix, tmp_path, max_shard_size=400)
    with gv.CheckpointReader(prefix) as reader:
        assert reader.verify() == []


def test_export_of_expand_checkpoints_writes_the_logical_tensors(four_cpus: str, tmp_path: pathlib.Path) -> None:
    emb = gv.ShardedVariable(np.arange(12, dtype=np.float32), 3, name="emb", devices=["/cpu:0", "/cpu:1", "/cpu:2"])
    opts = gv.SaveOptions(experimental_variable_policy="expand_distributed_variables")
    prefix = gv.Saver(options=opts).save(str(tmp_path / "m"))
    export_hf(prefix, tmp_path / "hf")
    np.testing.assert_array_equal(_transformers_style_load(tmp_path / "hf")["emb"], np.arange(12))
    del emb


def test_export_command_line(tmp_path: pathlib.Path) -> None:
    _vars = _model()
    prefix = gv.Saver().save(str(tmp_path / "m"))
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "gpuvars", "export", prefix, str(out), "--max-shard-size", "2KB"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "10 tensors in 2 shard(s)" in proc.stdout
    assert len(_transformers_style_load(out)) == 10
    proc = subprocess.run([sys.executable, "-m", "gpuvars", "export", prefix, str(out), "--max-shard-size", "5Gb"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "gpuvars", "export", str(tmp_path / "nope"), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "error: " in proc.stderr and "Traceback" not in proc.stderr


# --- version 1 -------------------------------------------------------------------------------------


def test_unsharded_saves_stay_version_1_and_v1_checkpoints_load(tmp_path: pathlib.Path) -> None:
    variables = _model(3)
    prefix = gv.Saver().save(str(tmp_path / "m"))
    index = _index(prefix)
    assert index["version"] == 1 and "weight_map" not in index
    with st.SafetensorsReader(prefix + ".safetensors") as reader:
        assert reader.metadata == {"format": "gpuvars-checkpoint", "version": "1"}
    # a version-1 index exactly as gpuvars 1 wrote it (no weight_map) restores and verifies
    for v in variables:
        v.assign(np.zeros(100, np.float32))
    gv.Saver().restore(prefix, verify_first=True)
    np.testing.assert_array_equal(variables[2].numpy(), np.arange(100) + 2000)
    assert cli.main(["verify", prefix]) == 0
    index["version"] = 3
    pathlib.Path(prefix + ".index.json").write_text(json.dumps(index))
    with pytest.raises(gv.CheckpointCorruptError, match=r"format version 3 is newer than this gpuvars reads \(2\)"):
        gv.load_checkpoint(prefix)


def test_a_failing_shard_write_leaves_nothing_and_names_the_shard(tmp_path: pathlib.Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from gpuvars.checkpoint import _write

    _vars = _model(6)
    saver = gv.Saver()
    real = _write._write_file

    def failing(path: str, *args: Any, **kwargs: Any) -> Any:
        if path.endswith("m-00002-of-00003.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(_write, "_write_file", failing)
    with pytest.raises(gv.CheckpointWriteError, match=r"writing m-00002-of-00003\.safetensors failed: No space") as info:
        saver.save(str(tmp_path / "m"), options=gv.SaveOptions(max_shard_size=800))
    assert info.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == []  # the shards that were committed are removed, no index
    monkeypatch.setattr(_write, "_write_file", real)
    prefix = saver.save(str(tmp_path / "m"), options=gv.SaveOptions(max_shard_size=800))
    with gv.CheckpointReader(prefix) as reader:
        assert reader.verify() == []
