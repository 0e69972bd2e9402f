"""The safetensors reader/writer of gpuvars, held to the format by the safetensors package."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import struct
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy as stnp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gpuvars.checkpoint._stformat import (
    CHECKSUM_ALGORITHM,
    CHUNK_BYTES,
    MAX_HEADER_SIZE,
    SafetensorsReader,
    SafetensorsWriter,
    TensorInfo,
    checksum,
    layout,
    new_hasher,
    np_dtype,
    open_regular,
    st_dtype,
)
from gpuvars.errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    ResourceExhaustedError,
)

DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16,
    "I32": np.int32, "U32": np.uint32, "I64": np.int64, "U64": np.uint64, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64, "C64": np.complex64,
    "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E4M3": ml_dtypes.float8_e4m3fn,
}
# safetensors' numpy loaders know neither float8 (no numpy.float8_*) nor, in load_file, BF16
SAFE_OPEN_NP = [k for k in DTYPES if not k.startswith("F8")]
LOAD_FILE_NP = [k for k in SAFE_OPEN_NP if k != "BF16"]


def sample(dtype: Any, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Arbitrary bit patterns (NaNs included) of the dtype."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)
    if np.dtype(dtype) == np.bool_:
        raw &= 1
    out: np.ndarray = raw.view(dtype).reshape(shape)
    return out


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_same_file(ours: bytes, theirs: bytes) -> None:
    """Byte-identical but for the order of metadata keys (safetensors keeps them in a HashMap)."""
    assert len(ours) == len(theirs) and ours[:8] == theirs[:8]
    n = struct.unpack("<Q", ours[:8])[0]
    mine, other = json.loads(ours[8:8 + n]), json.loads(theirs[8:8 + n])
    assert mine == other and list(mine) == list(other)
    assert ours[8 + n:] == theirs[8 + n:]


def save(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Any:
    with SafetensorsWriter(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], metadata) as w:
        for name in w.order:
            w.write(name, tensors[name])
        return w.commit()


def load(path: Path) -> dict[str, np.ndarray]:
    with SafetensorsReader(path) as r:
        return {k: r.get_tensor(k) for k in r.keys()}


def craft(path: Path, header: Any, data: bytes = b"", *, raw: bytes | None = None) -> Path:
    """A file from a hand-made header (JSON-encoded unless ``raw``) and data bytes."""
    text = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


MIXED = {
    "w": sample(np.float32, (3, 4)),
    "scalar": sample(np.float64, (), 1),
    "empty": sample(np.int16, (0, 5)),
    "bf": sample(ml_dtypes.bfloat16, (5,), 2),
    "mask": sample(np.bool_, (7,), 3),
    "h": sample(np.float16, (2, 3), 4),
}


# ---- dtypes ---------------------------------------------------------------------------

def test_dtype_maps_round_trip() -> None:
    for name, dtype in DTYPES.items():
        assert st_dtype(dtype) == name
        assert np_dtype(name) == np.dtype(dtype)
    with pytest.raises(InvalidArgumentError, match="'z': dtype complex128"):
        st_dtype(np.complex128, key="z")
    for bad in (object, ">f4", "U3"):
        with pytest.raises(InvalidArgumentError):
            st_dtype(bad)
    with pytest.raises(InvalidArgumentError, match="F4"):
        np_dtype("F4")


# ---- round trips and interoperability ---------------------------------------------------

@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3, 4)])
@pytest.mark.parametrize("st_name", list(DTYPES))
def test_round_trip_every_dtype(tmp_path: Path, st_name: str, shape: tuple[int, ...]) -> None:
    arr = sample(DTYPES[st_name], shape)
    path = tmp_path / "t.safetensors"
    record = save(path, {"x": arr})
    got = load(path)["x"]
    assert same_bytes(got, arr)
    assert path.read_bytes() == stnp.save({"x": arr})  # byte-identical to safetensors' writer
    assert record.tensors == {"x": checksum(arr.tobytes())}
    with safetensors.safe_open(str(path), "np") as f:
        if st_name in SAFE_OPEN_NP:
            assert same_bytes(f.get_tensor("x"), arr)
        else:
            assert f.get_slice("x").get_dtype() == st_name


def test_our_file_opens_in_safetensors(tmp_path: Path) -> None:
    tensors = {**MIXED, **{f"t_{k}": sample(DTYPES[k], (2, 3), i) for i, k in enumerate(LOAD_FILE_NP)}}
    path = tmp_path / "ours.safetensors"
    record = save(path, tensors, {"format": "gpuvars", "json": '{"a": [1, 2]}'})
    assert record.file == "ours.safetensors" and record.size == path.stat().st_size
    loaded = stnp.load_file(str(path))
    for name, arr in tensors.items():
        if arr.dtype != ml_dtypes.bfloat16:
            assert same_bytes(loaded[name], arr), name
    with safetensors.safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "gpuvars", "json": '{"a": [1, 2]}'}
        assert set(f.keys()) == set(tensors)
        for name, arr in tensors.items():
            assert same_bytes(f.get_tensor(name), arr), name
    assert_same_file(path.read_bytes(), stnp.save(tensors, metadata={"format": "gpuvars", "json": '{"a": [1, 2]}'}))


def test_safetensors_file_read_by_us(tmp_path: Path) -> None:
    tensors = {**MIXED, **{f"t_{k}": sample(DTYPES[k], (4,), i) for i, k in enumerate(DTYPES)}}
    path = tmp_path / "theirs.safetensors"
    stnp.save_file(tensors, str(path), metadata={"k": "v", "ü": "é"})
    with SafetensorsReader(path) as r:
        assert r.metadata == {"k": "v", "ü": "é"}
        assert r.size == path.stat().st_size
        assert set(r.keys()) == set(tensors)
        for name, arr in tensors.items():
            assert same_bytes(r.get_tensor(name), arr), name


def test_header_layout_and_alignment(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save(path, MIXED, {"m": "x"})
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0 and blob[8 + n - 1:8 + n] in (b" ", b"}")
    header = json.loads(blob[8:8 + n])
    assert list(header)[0] == "__metadata__"
    with SafetensorsReader(path) as r:
        itemsizes = [info.dtype.itemsize for info in r.tensors.values()]
        assert itemsizes == sorted(itemsizes, reverse=True)
        for name, info in r.tensors.items():
            assert info.begin % info.dtype.itemsize == 0, name
            rel = header[name]["data_offsets"]
            assert (info.begin, info.end) == (8 + n + rel[0], 8 + n + rel[1])
    prefix, infos = layout([(k, v.dtype, v.shape) for k, v in MIXED.items()], {"m": "x"})
    assert blob.startswith(prefix) and list(infos) == list(r.tensors)


def test_large_tensor_streams_in_chunks(tmp_path: Path) -> None:
    arr = sample(np.float32, ((CHUNK_BYTES * 5 // 2) // 4 + 3,))
    path = tmp_path / "big.safetensors"
    record = save(path, {"big": arr, "small": arr[:3].copy()})
    assert record.tensors["big"] == checksum(arr.tobytes())
    hasher = new_hasher()
    hasher.update(arr.tobytes())
    assert hasher.hexdigest() == record.tensors["big"] and CHECKSUM_ALGORITHM == "xxh3_64"
    with SafetensorsReader(path) as r:
        out = np.empty_like(arr)
        r.read_into("big", out, expected_checksum=record.tensors["big"])
        assert same_bytes(out, arr)
        assert r.header_checksum == record.header_checksum
        assert r.verify(record.tensors) == []


TEXT = st.characters(exclude_categories=["Cs"])  # lone surrogates are not UTF-8
names = st.text(TEXT, min_size=1, max_size=12).filter(lambda s: s != "__metadata__")


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = DTYPES[draw(st.sampled_from(list(DTYPES)))]
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    return sample(dtype, shape, draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=st.dictionaries(names, arrays(), max_size=6),
       metadata=st.none() | st.dictionaries(names, st.text(TEXT), max_size=3))
def test_property_both_directions(tmp_path: Path, tensors: dict[str, np.ndarray],
                                  metadata: dict[str, str] | None) -> None:
    if not tensors and metadata == {}:
        metadata = None  # safetensors 0.8 writes '{},"__metadata__":{}}' here (its issue #466)
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save(ours, tensors, metadata)
    assert_same_file(ours.read_bytes(), stnp.save(tensors, metadata=metadata))
    stnp.save_file(tensors, str(theirs), metadata=metadata)
    with SafetensorsReader(theirs) as r:
        assert r.metadata == (metadata or {})
        for name, arr in tensors.items():
            assert same_bytes(r.get_tensor(name), arr), name
    with safetensors.safe_open(str(ours), "np") as f:
        assert f.metadata() == metadata or (f.metadata() is None and not metadata)
        for name, arr in tensors.items():
            if st_dtype(arr.dtype) in SAFE_OPEN_NP:
                assert same_bytes(f.get_tensor(name), arr), name


# ---- reader validation -------------------------------------------------------------------

def valid(tmp_path: Path) -> tuple[Path, bytes, int]:
    path = tmp_path / "v.safetensors"
    save(path, {"a": sample(np.float32, (4,)), "b": sample(np.int16, (3,))})
    blob = path.read_bytes()
    return path, blob, struct.unpack("<Q", blob[:8])[0]


def corrupt(path: Path, match: str, **kw: Any) -> CheckpointCorruptError:
    with pytest.raises(CheckpointCorruptError, match=match) as info:
        SafetensorsReader(path, **kw)
    assert str(path) in str(info.value)
    return info.value


def test_truncated_and_extended(tmp_path: Path) -> None:
    path, blob, _ = valid(tmp_path)
    path.write_bytes(blob[:-1])
    corrupt(path, "truncated")
    path.write_bytes(blob + b"\0")
    corrupt(path, "extended")
    path.write_bytes(blob[:5])
    corrupt(path, "truncated: 5 bytes")


def test_header_length_bounded_before_reading(tmp_path: Path) -> None:
    path, blob, n = valid(tmp_path)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob[8:])
    corrupt(path, "runs past the end")
    path.write_bytes(struct.pack("<Q", 2**63) + blob[8:])
    corrupt(path, "exceeds the limit")
    path.write_bytes(blob)
    corrupt(path, f"header length {n} exceeds the limit of 16", max_header_size=16)


@pytest.mark.parametrize("raw, match", [
    (b"{not json", "not valid UTF-8 JSON"),
    (b'{"a": \xff}', "not valid UTF-8 JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"a": NaN}', "not valid UTF-8 JSON"),
    (b'{"x": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}, '
     b'"x": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}', "duplicate keys"),
])
def test_bad_json(tmp_path: Path, raw: bytes, match: str) -> None:
    corrupt(craft(tmp_path / "j.safetensors", None, raw=raw), match)


def entry(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize("header, data, match", [
    ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, 12, "'b'.*overlaps"),
    ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 12, 20)}, 20, "'b'.*leaves a gap"),
    ({"a": entry("F32", [2], 4, 12)}, 12, "'a'.*leaves a gap"),
    ({"a": entry("F32", [3], 0, 8)}, 8, "'a'.*needs 12"),
    ({"a": entry("F9", [2], 0, 8)}, 8, "'a'.*unknown dtype 'F9'"),
    ({"a": entry("F32", [2, -1], 0, 8)}, 8, "'a'.*shape"),
    ({"a": entry("F32", [True], 0, 4)}, 4, "'a'.*shape"),
    ({"a": entry("F32", [2], 8, 0)}, 8, "'a'.*data_offsets"),
    ({"a": entry("F32", [2], 0, 8.0)}, 8, "'a'.*data_offsets"),
    ({"a": [1]}, 0, "'a'.*must be a JSON object"),
    ({"__metadata__": {"n": 1}}, 0, "__metadata__ must map str to str"),
    ({"__metadata__": ["x"]}, 0, "__metadata__ must map str to str"),
])
def test_bad_entries(tmp_path: Path, header: dict[str, Any], data: int, match: str) -> None:
    corrupt(craft(tmp_path / "e.safetensors", header, b"\0" * data), match)


# Each field of an entry (and __metadata__) with a JSON value of the wrong type: safetensors
# refuses every one of these too; ours must say so as CheckpointCorruptError naming the file,
# the tensor and the field, never a TypeError (e.g. "unhashable type: 'list'").
WRONG_TYPES: list[tuple[str, Any]] = [
    ("dtype", 5), ("dtype", ["F32"]), ("dtype", None), ("dtype", True), ("dtype", 4.0),
    ("dtype", {"x": 1}), ("dtype", "f32"),
    ("shape", "3"), ("shape", 3), ("shape", {"a": 1}), ("shape", None), ("shape", [2.0]),
    ("shape", [True, True]), ("shape", [[2]]), ("shape", ["2"]), ("shape", [None]),
    ("shape", [2**64]), ("shape", [-2]),
    ("data_offsets", {"a": 1}), ("data_offsets", "08"), ("data_offsets", [0]), ("data_offsets", [0, 8, 8]),
    ("data_offsets", [0.0, 8]), ("data_offsets", [False, 8]), ("data_offsets", [[0], [8]]),
    ("data_offsets", None), ("data_offsets", 8), ("data_offsets", [0, 2**64]), ("data_offsets", [-8, 0]),
]


@pytest.mark.parametrize("field, value", WRONG_TYPES, ids=[f"{f}={v!r}" for f, v in WRONG_TYPES])
def test_entry_field_of_the_wrong_json_type_is_corrupt(tmp_path: Path, field: str, value: Any) -> None:
    path = craft(tmp_path / "t.safetensors", {"a": {**entry("F32", [2], 0, 8), field: value}}, b"\0" * 8)
    with pytest.raises(Exception):
        stnp.load_file(str(path))
    corrupt(path, f"tensor 'a': .*{field}")


@pytest.mark.parametrize("field", ["dtype", "shape", "data_offsets"])
def test_entry_missing_a_field_is_corrupt(tmp_path: Path, field: str) -> None:
    value = entry("F32", [2], 0, 8)
    del value[field]
    corrupt(craft(tmp_path / "m.safetensors", {"a": value}, b"\0" * 8), f"tensor 'a': entry has no '{field}'")


@pytest.mark.parametrize("value", [5, "x", [], ["x"], True, {"k": 1}, {"k": None}, {"k": ["v"]}, {"k": {}}])
def test_metadata_of_the_wrong_json_type_is_corrupt(tmp_path: Path, value: Any) -> None:
    path = craft(tmp_path / "md.safetensors", {"__metadata__": value, "a": entry("U8", [1], 0, 1)}, b"\0")
    with pytest.raises(Exception):
        stnp.load_file(str(path))
    corrupt(path, "__metadata__ must map str to str")


@pytest.mark.parametrize("value", [5, "x", None, True, 2.5, [], ["F32", [2], [0, 8]]])
def test_entry_that_is_not_an_object_is_corrupt(tmp_path: Path, value: Any) -> None:
    corrupt(craft(tmp_path / "e.safetensors", {"a": value}, b""), "tensor 'a': entry must be a JSON object")


@pytest.mark.parametrize("shape", [[2**63, 0], [0, 2**40, 2**40], [0, 2**62, 4], [1] * 65])
def test_dims_beyond_numpy_are_corrupt(tmp_path: Path, shape: list[int]) -> None:
    # safetensors' header check passes these empty (or 65-dim) tensors; its numpy loader then
    # fails with a bare ValueError. Ours refuses them when it reads the header.
    nbytes = 4 if shape == [1] * 65 else 0
    path = craft(tmp_path / "d.safetensors", {"a": entry("F32", shape, 0, nbytes)}, b"\0" * nbytes)
    with pytest.raises(ValueError):
        stnp.load_file(str(path))
    corrupt(path, "tensor 'a': shape .* of F32 is beyond numpy: ")


def test_messages_about_huge_values_stay_short(tmp_path: Path) -> None:
    path = craft(tmp_path / "h.safetensors", {"k" * 10**6: {**entry("F32", [2], 0, 8), "dtype": ["x" * 10**6]}})
    assert len(str(corrupt(path, "dtype must be a JSON string"))) < 1000


def test_extra_entry_fields_are_ignored_as_safetensors_does(tmp_path: Path) -> None:
    # safetensors' TensorInfo is a serde struct without deny_unknown_fields: it skips unknown
    # fields, whatever their JSON value. A reader of the same format must open such files.
    a, b = sample(np.float32, (2,)), sample(np.int16, (3,), 1)
    header = {
        "a": {**entry("F32", [2], 0, 8), "extra": 1, "nested": {"x": [1, None, {"y": "z"}]}},
        "b": {"layout": "C", **entry("I16", [3], 8, 14), "data_offsets_v2": [0, 1], "shape2": None},
        "__metadata__": {"note": "extra fields"},
    }
    path = craft(tmp_path / "x.safetensors", header, a.tobytes() + b.tobytes())
    theirs = stnp.load_file(str(path))
    with SafetensorsReader(path) as r:
        assert r.metadata == {"note": "extra fields"}
        ours = {k: r.get_tensor(k) for k in r.keys()}
    assert sorted(ours) == sorted(theirs) == ["a", "b"]
    for k in ours:
        assert same_bytes(ours[k], theirs[k]) and same_bytes(ours[k], {"a": a, "b": b}[k])


JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2, 16) | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(TEXT, max_size=4)
                | st.sampled_from([*DTYPES, "F9", "f32", ""]))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(TEXT, max_size=3), kids, max_size=3),
    max_leaves=6,
)
FIELD_VALUES = {
    "dtype": JSON_VALUES | st.sampled_from(list(DTYPES)),
    "shape": JSON_VALUES | st.lists(JSON_SCALARS, max_size=3) | st.lists(st.integers(0, 12), max_size=3),
    "data_offsets": (JSON_VALUES | st.lists(JSON_SCALARS, min_size=2, max_size=2)
                     | st.lists(st.integers(0, 12), min_size=2, max_size=2)),
}


@st.composite
def damaged_headers(draw: st.DrawFn) -> dict[str, Any]:
    """The header of an 11-byte buffer (F32[2] then U8[3]) with 1-3 fields replaced by
    arbitrary JSON: a field's value, a whole entry, an extra field, a missing one, __metadata__."""
    header: dict[str, Any] = {"a": entry("F32", [2], 0, 8), "b": entry("U8", [3], 8, 11)}
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(["a", "b", "__metadata__"]))
        if key == "__metadata__":
            header[key] = draw(JSON_VALUES | st.dictionaries(st.text(TEXT, max_size=3), JSON_SCALARS, max_size=2))
            continue
        how = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", "drop", "whole"]))
        if how == "whole":
            header[key] = draw(JSON_VALUES)
        elif not isinstance(header[key], dict):
            continue
        elif how == "extra":
            header[key][draw(st.text(TEXT, max_size=6))] = draw(JSON_VALUES)
        elif how == "drop":
            header[key].pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        else:
            header[key][how] = draw(FIELD_VALUES[how])
    return header


def documented_difference(header: dict[str, Any]) -> bool:
    """Whether ``header`` holds what safetensors' header check accepts and this reader refuses
    on purpose: a dtype it lacks (or serde's ``{"F32": null}`` spelling of one), or a shape
    numpy cannot hold (a dim over 2**63 - 1, more than 64 dims, an empty tensor too big to index)."""
    for key, value in header.items():
        if key == "__metadata__" or not isinstance(value, dict):
            continue
        dtype, shape = value.get("dtype"), value.get("shape")
        if isinstance(dtype, dict) or (isinstance(dtype, str) and dtype not in DTYPES):
            return True
        if isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape):
            if len(shape) > 64 or any(d >= 2**63 for d in shape):
                return True
            itemsize = np.dtype(DTYPES[dtype]).itemsize if dtype in DTYPES else 1
            if int(np.prod([max(d, 1) for d in shape], dtype=object)) * itemsize >= 2**63:
                return True
    return False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=damaged_headers())
def test_fuzzed_headers_accepted_exactly_when_safetensors_accepts(tmp_path: Path, header: dict[str, Any]) -> None:
    path = craft(tmp_path / "f.safetensors", header, bytes(range(11)))
    try:
        with safetensors.safe_open(str(path), "np") as f:
            theirs: set[str] | None = set(f.keys())
    except Exception:  # SafetensorError, or a bare ValueError/TypeError from its numpy glue
        theirs = None
    try:  # anything but CheckpointCorruptError escaping here fails the test
        with SafetensorsReader(path) as r:
            ours: dict[str, np.ndarray] | None = {k: r.get_tensor(k) for k in r.keys()}
    except CheckpointCorruptError as exc:
        assert str(path) in str(exc)
        ours = None
    if theirs is None:
        assert ours is None, f"safetensors refuses {header!r}, gpuvars read it"
    elif ours is None:
        assert documented_difference(header), f"safetensors reads {header!r}, gpuvars refused it"
    else:
        assert set(ours) == theirs
        with safetensors.safe_open(str(path), "np") as f:
            for k, arr in ours.items():
                if st_dtype(arr.dtype) in SAFE_OPEN_NP:
                    assert same_bytes(f.get_tensor(k), arr)


def test_json_whitespace_and_empty_file(tmp_path: Path) -> None:
    header = {"a": entry("U8", [2], 0, 2), "__metadata__": None}
    path = craft(tmp_path / "ws.safetensors", None, b"\x01\x02",
                 raw=b"\n  " + json.dumps(header).encode() + b" " * 4093)
    with SafetensorsReader(path) as r:
        assert r.get_tensor("a").tolist() == [1, 2] and r.metadata == {}
    save(tmp_path / "none.safetensors", {})
    assert (tmp_path / "none.safetensors").read_bytes() == stnp.save({})
    assert load(tmp_path / "none.safetensors") == {}
    save(tmp_path / "meta.safetensors", {}, {})  # valid JSON, unlike safetensors 0.8 (#466)
    with SafetensorsReader(tmp_path / "meta.safetensors") as r:
        assert r.metadata == {} and r.keys() == []


def test_flipped_byte_caught_by_checksum(tmp_path: Path) -> None:
    path = tmp_path / "f.safetensors"
    record = save(path, {"good": sample(np.float32, (64,)), "bad": sample(np.float64, (64,), 1)})
    with SafetensorsReader(path) as r:
        at = r.tensors["bad"].begin + 100
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0x10
    path.write_bytes(bytes(blob))
    with SafetensorsReader(path) as r:
        r.get_tensor("bad")  # no checksum asked for: no check
        r.read_into("good", np.empty(64, np.float32), expected_checksum=record.tensors["good"])
        with pytest.raises(CheckpointCorruptError, match=f"{path}.*'bad'.*expected "
                                                         f"{record.tensors['bad']}, computed") as e:
            r.read_into("bad", np.empty(64, np.float64), expected_checksum=record.tensors["bad"])
        assert "xxh3_64" in str(e.value)
        with pytest.raises(CheckpointCorruptError, match="'bad'"):
            list(r.read_chunks("bad", np.empty(48, np.uint8), expected_checksum=record.tensors["bad"]))
        assert r.verify(record.tensors) == ["bad"]


def test_missing_file_and_unknown_key(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointNotFoundError, match="nope.safetensors") as e:
        SafetensorsReader(missing)
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(CheckpointCorruptError, match="is a directory, not a regular file"):
        SafetensorsReader(tmp_path)
    path, _, _ = valid(tmp_path)
    with SafetensorsReader(path) as r:
        with pytest.raises(CheckpointMismatchError, match=r"no tensor 'zz'.*holds 2: 'a', 'b'"):
            r.get_tensor("zz")
        with pytest.raises(CheckpointMismatchError, match="'zz'"):
            r.verify({"zz": "0"})
    with pytest.raises(InvalidArgumentError, match="closed"):
        r.get_tensor("a")


def test_read_into_checks_destination(tmp_path: Path) -> None:
    path, _, _ = valid(tmp_path)
    with SafetensorsReader(path) as r:
        with pytest.raises(InvalidArgumentError, match="'a'.*16 bytes.*received float32\\[5\\]"):
            r.read_into("a", np.empty(5, np.float32))
        ro = np.empty(4, np.float32)
        ro.flags.writeable = False
        with pytest.raises(InvalidArgumentError, match="'a'.*read-only"):
            r.read_into("a", ro)
        with pytest.raises(InvalidArgumentError, match="'a'.*C-contiguous"):
            r.read_into("a", np.empty((4, 2), np.float32)[:, 0])
        out = np.empty(16, np.uint8)  # dtype is the caller's concern, bytes are not
        r.read_into("a", out)
        assert out.tobytes() == r.get_tensor("a").tobytes()


@pytest.mark.parametrize("size", [1, 7, 16, 1000])
def test_read_chunks_reassembles(tmp_path: Path, size: int) -> None:
    arr = sample(np.float64, (13,))
    path = tmp_path / "c.safetensors"
    record = save(path, {"x": arr, "e": arr[:0].copy()})
    with SafetensorsReader(path) as r:
        for buffer in (np.zeros(size, np.uint8), memoryview(bytearray(size))):
            parts = [bytes(p) for p in r.read_chunks("x", buffer, expected_checksum=record.tensors["x"])]
            assert b"".join(parts) == arr.tobytes()
            assert all(len(p) == size for p in parts[:-1])
        assert list(r.read_chunks("e", np.zeros(size, np.uint8), expected_checksum=record.tensors["e"])) == []
        with pytest.raises(InvalidArgumentError, match="'x'.*received 0 bytes"):
            r.read_chunks("x", memoryview(bytearray(0)))
        with pytest.raises(InvalidArgumentError, match="'x'.*read-only=True"):
            r.read_chunks("x", memoryview(b"abc"))
        with pytest.raises(InvalidArgumentError, match="'x'.*read-only=True"):
            r.read_chunks("x", np.frombuffer(b"abc", np.uint8))



@pytest.mark.parametrize("size", [1, 7, 16, 1000])
def test_read_chunks_alternates_with_a_spare_buffer(tmp_path: Path, size: int) -> None:
    """With ``spare`` chunk k lands in buffer k % 2 and the previous chunk stays intact
    while the next is read: what double-buffered restores to a device rely on."""
    arr = sample(np.float64, (13,))
    path = tmp_path / "c.safetensors"
    record = save(path, {"x": arr})
    a, b = np.zeros(size, np.uint8), np.zeros(size, np.uint8)
    with SafetensorsReader(path) as r:
        parts, previous = [], None
        for k, part in enumerate(r.read_chunks("x", a, spare=b, expected_checksum=record.tensors["x"])):
            owner = a if k % 2 == 0 else b
            assert np.shares_memory(np.frombuffer(part, np.uint8), owner)
            if previous is not None:  # the chunk before is untouched by this read
                assert bytes(previous[1]) == previous[0]
            parts.append(bytes(part))
            previous = (bytes(part), part)
        assert b"".join(parts) == arr.tobytes()
        with pytest.raises(InvalidArgumentError, match="'x'.*spare buffer must match"):
            r.read_chunks("x", a, spare=np.zeros(size + 1, np.uint8))
        with pytest.raises(InvalidArgumentError, match="'x'.*read-only=True"):
            r.read_chunks("x", a, spare=memoryview(bytes(size)))
        bad = dict(record.tensors, x="0" * 16)
        with pytest.raises(CheckpointCorruptError, match="checksum mismatch"):
            list(r.read_chunks("x", a, spare=b, expected_checksum=bad["x"]))


# ---- writer ------------------------------------------------------------------------------

def test_layout_validation() -> None:
    f32 = np.dtype(np.float32)
    cases: list[tuple[Any, str]] = [
        ([("a", f32, (1,)), ("a", f32, (2,))], "'a' appears twice"),
        ([("", f32, (1,))], "''"),
        ([("__metadata__", f32, (1,))], "__metadata__"),
        ([("a", f32, (-1,))], "'a'.*negative"),
        ([("a", f32, (1.5,))], "'a'.*shape"),
        ([("c", np.complex128, (1,))], "'c'.*complex128"),
    ]
    for entries, match in cases:
        with pytest.raises(InvalidArgumentError, match=match):
            layout(entries)
    with pytest.raises(InvalidArgumentError, match="str to str"):
        layout([("a", f32, (1,))], {"n": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidArgumentError, match=f"at most {MAX_HEADER_SIZE}"):
        layout([], {"big": "x" * MAX_HEADER_SIZE})
    prefix, infos = layout([("a", f32, (2,)), ("b", np.dtype(np.uint8), (3,)), ("c", np.dtype(np.int64), ())])
    assert list(infos) == ["c", "a", "b"]
    assert infos["a"] == TensorInfo("a", f32, (2,), len(prefix) + 8, len(prefix) + 16)


def test_abort_leaves_no_temp_and_destination_intact(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    save(path, {"old": sample(np.int32, (3,))})
    before = path.read_bytes()
    w = SafetensorsWriter(path, [("new", np.dtype(np.float32), (2,))])
    assert os.path.basename(w.temp_path).startswith(f".d.safetensors.tmp-{os.getpid()}-")
    assert temp_files(tmp_path) == [os.path.basename(w.temp_path)]
    w.write("new", np.ones(2, np.float32))
    w.abort()
    w.abort()
    assert temp_files(tmp_path) == [] and path.read_bytes() == before
    with pytest.raises(InvalidArgumentError, match="closed"):
        w.write("new", np.ones(2, np.float32))
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(path, [("new", np.dtype(np.float32), (2,))]) as w:
            w.write("new", np.ones(2, np.float32))
            raise RuntimeError("boom")
    with SafetensorsWriter(path, [("new", np.dtype(np.float32), (2,))]) as w:
        w.write("new", np.ones(2, np.float32))  # body ends without commit
    assert temp_files(tmp_path) == [] and path.read_bytes() == before


def test_commit_with_missing_tensor(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    w = SafetensorsWriter(path, [("a", np.dtype(np.float32), (2,)), ("b", np.dtype(np.uint8), (1,))])
    w.write("a", np.ones(2, np.float32))
    with pytest.raises(InvalidArgumentError, match=r"1 tensor\(s\) never written: 'b'"):
        w.commit()
    assert not path.exists() and temp_files(tmp_path) == []


def test_write_checks_data(tmp_path: Path) -> None:
    with SafetensorsWriter(tmp_path / "w.safetensors", [("a", np.dtype(np.float32), (2, 2))]) as w:
        with pytest.raises(InvalidArgumentError, match="'a'.*float32 with 16 bytes.*received float64"):
            w.write("a", np.ones((2, 2), np.float64))
        with pytest.raises(InvalidArgumentError, match="'a'.*16 bytes.*received float32 with 12"):
            w.write("a", np.ones(3, np.float32))
        with pytest.raises(InvalidArgumentError, match="'a'.*C-contiguous"):
            w.write("a", np.ones((2, 4), np.float32)[:, ::2])
        with pytest.raises(InvalidArgumentError, match="'a'.*expected 16 bytes, received 15"):
            w.write("a", [b"x" * 8, b"y" * 7])
        with pytest.raises(InvalidArgumentError, match="'a'.*expected 16 bytes, received at least 17"):
            w.write("a", [b"x" * 8, b"y" * 9])
        with pytest.raises(InvalidArgumentError, match="'a'.*int"):
            w.write("a", [1, 2])
        with pytest.raises(InvalidArgumentError, match="'a'.*received int"):
            w.write("a", 5)
        with pytest.raises(InvalidArgumentError, match="'a'.*object array has no raw bytes"):
            w.write("a", [np.array([None, 1], dtype=object)])
        with pytest.raises(InvalidArgumentError, match="'zz' was not declared"):
            w.write("zz", b"")
        w.write("a", np.ones((2, 2), np.float32))
        with pytest.raises(InvalidArgumentError, match="'a' was already written"):
            w.write("a", np.ones((2, 2), np.float32))


def test_chunked_iterable_input(tmp_path: Path) -> None:
    arr = sample(np.float32, (6, 5))
    raw = arr.tobytes()
    pieces = (raw[:7], memoryview(raw)[7:40], np.frombuffer(raw[40:64], np.uint8),
              arr.reshape(-1)[16:20], bytearray(raw[80:]))
    path = tmp_path / "chunks.safetensors"
    with SafetensorsWriter(path, [("x", arr.dtype, arr.shape), ("s", np.dtype(np.uint8), (3,))]) as w:
        w.write("s", b"abc")  # a single buffer is one chunk, and any order works
        w.write("x", iter(pieces))
        record = w.commit()
    assert record.tensors == {"x": checksum(raw), "s": checksum(b"abc")}
    got = load(path)
    assert same_bytes(got["x"], arr) and got["s"].tobytes() == b"abc"


def test_overwrite_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "o.safetensors"
    old = {"v": sample(np.float32, (8,))}
    save(path, old)
    new = {"v": sample(np.float32, (8,), 9), "w": sample(np.int8, (2,))}
    with SafetensorsWriter(path, [(k, v.dtype, v.shape) for k, v in new.items()]) as w:
        for name in w.order:
            w.write(name, new[name])
            assert same_bytes(load(path)["v"], old["v"]) and set(load(path)) == {"v"}
        record = w.commit()
    got = load(path)
    assert same_bytes(got["v"], new["v"]) and same_bytes(got["w"], new["w"])
    assert temp_files(tmp_path) == [] and record.size == path.stat().st_size
    with SafetensorsReader(path) as r:
        assert r.header_checksum == record.header_checksum


# ---- files that are not regular files ------------------------------------------------------

@pytest.fixture
def no_hang() -> Iterator[None]:
    """Fail (rather than hang the suite) when something blocks for 10 s, e.g. open() of a FIFO."""
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("blocked for 10 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 10)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def special_files(folder: Path) -> Iterator[list[tuple[Path, str]]]:
    """A FIFO, a directory, a socket and a character device, each named like a safetensors file."""
    fifo, folder_, sock = folder / "fifo.safetensors", folder / "dir.safetensors", folder / "sock.safetensors"
    os.mkfifo(fifo)
    folder_.mkdir()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    device = folder / "null.safetensors"
    device.symlink_to("/dev/null")
    try:
        yield [(fifo, "a FIFO"), (folder_, "a directory"), (sock, "a socket"), (device, "a character device")]
    finally:
        server.close()


def test_reader_refuses_fifo_directory_socket_and_device_at_once(tmp_path: Path, no_hang: None) -> None:
    with special_files(tmp_path) as cases:
        for path, kind in cases:
            with pytest.raises(CheckpointCorruptError, match=f"{path}: safetensors file is {kind}.*not a regular file"):
                SafetensorsReader(path)


def test_open_regular(tmp_path: Path, no_hang: None) -> None:
    path, blob, _ = valid(tmp_path)
    fd = open_regular(path, "checkpoint index")
    try:
        assert os.read(fd, 8) == blob[:8]
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK  # reads block as usual again
    finally:
        os.close(fd)
    with pytest.raises(CheckpointNotFoundError, match=r"nope\.json: no such checkpoint state") as info:
        open_regular(tmp_path / "nope.json", "checkpoint state")
    assert isinstance(info.value, FileNotFoundError)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(CheckpointNotFoundError):
        open_regular(tmp_path / "dangling", "checkpoint state")
    with special_files(tmp_path) as cases:
        for special, kind in cases:
            with pytest.raises(CheckpointCorruptError, match=f"{special}: checkpoint state is {kind}"):
                open_regular(special, "checkpoint state")


# ---- tensors larger than host memory ------------------------------------------------------

from conftest import HUGE, huge_file  # noqa: E402 - shared with test_reader.py


def test_tensor_larger_than_host_memory_is_resource_exhausted(tmp_path: Path) -> None:
    path = huge_file(tmp_path / "huge.safetensors")
    try:
        with SafetensorsReader(path) as r:
            assert r.tensors["big"].nbytes == HUGE
            with pytest.raises(ResourceExhaustedError, match=rf"tensor 'big' \({HUGE} bytes\) of {path}.*memory") as info:
                r.get_tensor("big")
            assert isinstance(info.value, MemoryError) and isinstance(info.value.__cause__, MemoryError)
    finally:
        path.unlink()
