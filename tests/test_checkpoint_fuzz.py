"""Fuzzed files: the folder's state file, the index and the device map, one JSON field at a
time, and the raw bytes of every file of a checkpoint.

Whatever value a field holds (any JSON type, a name of another file, a device string that
does not parse, a huge number) and whatever bytes a file holds, reading the checkpoint
either works or raises a CheckpointError: never a KeyError, TypeError, ValueError or
InvalidArgumentError from deeper down, and never a hang (each example has a deadline). A
restore that fails leaves every variable it touched uninitialized or holding its old value:
never a half-restored variable marked initialized; one that works restores the saved
values. The safetensors headers are fuzzed field by field in tests/test_stformat.py and,
through every read path, tests/test_reader.py. ``GPUVARS_LONG_FAULTS=1`` runs ten times
the examples.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import gpuvars as gv
from conftest import fault_cases

INTERESTING = [
    "", ".", "..", "../m-1", "m-1", "m-1.safetensors", "m-1.index.json", "m-1.devices.json",
    "m-1.replica-0-of-2.safetensors", "m-1.replica-1-of-2.safetensors", "checkpoint", "/etc/passwd",
    "x" * 300, "/gpu:x:y", "/cpu:0", "/cpu:9", "/gpu:0", "/job:ps/task:3/cpu:0", "/job:", "F32", "I64",
    "plain", "sharded", "mirrored", "sync_on_read", "SUM", "MEAN", "ON_READ", "NONE", "xxh3_64",
    "SAVE_VARIABLE_DEVICES", "EXPAND_DISTRIBUTED_VARIABLES", "gpuvars-checkpoint", "gpuvars-devices",
    "gpuvars-checkpoint-state", -1, 0, 1, 2, 3, 6, 2**63, 2**70, 1e308, -0.0, True, False, None, [], {},
    [4, 4], [6], [3], [0], [-1],
]

JSON = hs.recursive(
    hs.none() | hs.booleans() | hs.integers(-(2**70), 2**70) | hs.floats(allow_nan=False, allow_infinity=False)
    | hs.text(max_size=12),
    lambda inner: hs.lists(inner, max_size=3) | hs.dictionaries(hs.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
VALUE = hs.one_of(hs.sampled_from(INTERESTING), JSON)


def paths_of(obj: Any, here: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON document (the root is ``()``)."""
    yield here
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths_of(v, here + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths_of(v, here + (i,))


@hs.composite
def mutated(draw: hs.DrawFn, doc: Any) -> Any:
    """``doc`` with one place replaced, deleted, or given an extra key."""
    doc = copy.deepcopy(doc)
    where = draw(hs.sampled_from(sorted(paths_of(doc), key=repr)))
    action = draw(hs.sampled_from(["replace", "replace", "delete", "add"]))
    if not where:
        return draw(VALUE) if action != "add" or not isinstance(doc, dict) else {**doc, draw(hs.text(max_size=8)): draw(VALUE)}
    parent = doc
    for step in where[:-1]:
        parent = parent[step]
    last = where[-1]
    if action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent[last], dict):
        parent[last][draw(hs.sampled_from(INTERESTING[:10]) | hs.text(max_size=8))] = draw(VALUE)
    else:
        parent[last] = draw(VALUE)
    return doc


SAVED = {
    "a": np.arange(16, dtype=np.float32).reshape(4, 4),
    "b": np.arange(3, dtype=np.int64),
    "s": np.arange(6.0, dtype=np.float32),
}


class Pristine:
    """A committed EXPAND checkpoint (a plain and a sharded variable) and its files' bytes."""

    def __init__(self, folder: Path) -> None:
        opts = gv.SaveOptions(experimental_variable_policy="expand_distributed_variables")
        with gv.Registry():
            a = gv.Variable(SAVED["a"], name="a")
            b = gv.Variable(SAVED["b"], name="b")
            s = gv.ShardedVariable(SAVED["s"], 2, name="s")
            self.prefix = gv.Saver([a, b, s], max_to_keep=None, options=opts).save(folder / "m", global_step=1)
        self.folder = folder
        self.index_path = Path(self.prefix + ".index.json")
        self.devices_path = Path(self.prefix + ".devices.json")
        self.state_path = folder / "checkpoint"
        self.index = json.loads(self.index_path.read_text())
        self.devices = json.loads(self.devices_path.read_text())
        self.state = json.loads(self.state_path.read_text())
        self.raw = {folder / name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}
        assert len(self.raw) == 6, sorted(self.raw)  # data, 2 replica files, index, device map, state

    def reset(self) -> None:
        for path, raw in self.raw.items():
            path.write_bytes(raw)
        for name in os.listdir(self.folder):
            if name.startswith("fz"):
                os.unlink(self.folder / name)

    def write_devices(self, devices: Any) -> None:
        """A device map whose size and checksum the index records: only its content is wrong."""
        raw = json.dumps(devices).encode()
        self.devices_path.write_bytes(raw)
        index = copy.deepcopy(self.index)
        index["files"][self.devices_path.name].update(size=len(raw), checksum=xxhash.xxh3_64_hexdigest(raw))
        self.index_path.write_text(json.dumps(index))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    return Pristine(tmp_path_factory.mktemp("fuzz"))


def only_checkpoint_errors(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except gv.CheckpointError:
        return None
    except BaseException as exc:
        raise AssertionError(f"{getattr(fn, '__qualname__', fn)} raised {type(exc).__name__}, not a CheckpointError: {exc}") from exc


class Hang(Exception):
    """An example ran past its deadline."""


@contextlib.contextmanager
def deadline(seconds: float = 20.0) -> Iterator[None]:
    """Fail with :class:`Hang` (not a CheckpointError: the checks below report it) when the
    block runs longer than ``seconds``; a read of a checkpoint this small takes milliseconds."""

    def expire(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def no_half_restore(targets: dict[str, Any], before: dict[str, np.ndarray | None], worked: bool) -> None:
    """After a restore: all saved values if it worked; else each variable uninitialized or as it was."""
    for key, v in targets.items():
        if worked:
            assert v.initialized and np.array_equal(v.numpy(), SAVED[key]), f"restored {key!r}: {v.numpy()!r}"
        elif v.initialized:
            old = before[key]
            assert old is not None, f"a failed restore marked {key!r} initialized"
            assert np.array_equal(v.numpy(), old), f"a failed restore left {key!r} initialized with {v.numpy()!r}"


def read_everything(p: Pristine) -> None:
    with warnings.catch_warnings(), deadline():
        warnings.simplefilter("ignore", gv.PlacementWarning)  # a valid saved device that is missing here
        with gv.Registry():  # initialized targets: a failed restore keeps or uninitializes them
            targets: dict[str, Any] = {
                "a": gv.Variable(np.zeros((4, 4), np.float32), name="a"),
                "b": gv.Variable(np.zeros(3, np.int64), name="b"),
                "s": gv.ShardedVariable(np.zeros(6, np.float32), 3, name="s"),
            }
            before: dict[str, np.ndarray | None] = {k: v.numpy() for k, v in targets.items()}
            worked = only_checkpoint_errors(gv.Saver(list(targets.values())).restore, p.prefix) is not None
            no_half_restore(targets, before, worked)
        with gv.Registry():  # deferred targets: a failed restore leaves them uninitialized
            targets = {"a": gv.Variable(gv.zeros([4, 4]), name="a"), "b": gv.Variable(gv.zeros([3], np.int64), name="b")}
            worked = only_checkpoint_errors(gv.Saver(list(targets.values())).restore, p.prefix) is not None
            no_half_restore(targets, dict.fromkeys(targets), worked)
        with gv.Registry() as reg:
            loaded = only_checkpoint_errors(gv.load_checkpoint, p.prefix)
            if loaded is None:
                assert len(reg) == 0, "a failed load left variables registered"
            else:
                assert set(loaded) <= set(SAVED)  # an index edited to drop a variable is a smaller checkpoint
                for key, v in loaded.items():
                    assert np.array_equal(v.numpy(), SAVED[key]), f"loaded {key!r}: {v.numpy()!r}"
        reader = only_checkpoint_errors(gv.CheckpointReader, p.prefix)
        if reader is not None:
            only_checkpoint_errors(reader.verify)
            reader.close()
        latest = only_checkpoint_errors(gv.latest_checkpoint, p.folder)
        assert latest is None or isinstance(latest, str)
        state = only_checkpoint_errors(gv.get_checkpoint_state, p.folder)
        if state is not None:
            assert all(isinstance(x, str) for x in state.all_model_checkpoint_paths)
            assert all(isinstance(t, float) for t in state.all_model_checkpoint_timestamps)
            assert isinstance(state.last_preserved_timestamp, float)


FUZZ = settings(max_examples=fault_cases(120), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=hs.data())
def test_fuzzed_index_gives_only_checkpoint_errors(pristine: Pristine, data: hs.DataObject) -> None:
    try:
        pristine.index_path.write_text(json.dumps(data.draw(mutated(pristine.index))))
        read_everything(pristine)
    finally:
        pristine.reset()


@FUZZ
@given(data=hs.data())
def test_fuzzed_device_map_gives_only_checkpoint_errors(pristine: Pristine, data: hs.DataObject) -> None:
    try:
        pristine.write_devices(data.draw(mutated(pristine.devices)))
        read_everything(pristine)
    finally:
        pristine.reset()


@FUZZ
@given(data=hs.data())
def test_fuzzed_state_file_gives_only_checkpoint_errors(pristine: Pristine, data: hs.DataObject) -> None:
    try:
        pristine.state_path.write_text(json.dumps(data.draw(mutated(pristine.state))))
        read_everything(pristine)
        with gv.Registry():  # a restarted job's first save adopts what it can and always commits
            v = gv.Variable(np.ones(2, np.float32), name="v")
            gv.Saver([v], max_to_keep=None).save(pristine.folder / "fz")
        assert gv.latest_checkpoint(pristine.folder) == str(pristine.folder / "fz")
    finally:
        pristine.reset()



@hs.composite
def damaged_bytes(draw: hs.DrawFn, raw: bytes) -> bytes:
    """``raw`` with 1-3 edits: a flipped bit, bytes overwritten, cut, inserted, or the end cut or grown."""
    out = bytearray(raw)
    for _ in range(draw(hs.integers(1, 3))):
        at = draw(hs.integers(0, max(len(out) - 1, 0)))
        how = draw(hs.sampled_from(["flip", "overwrite", "cut", "insert", "truncate", "append"]))
        if how == "flip" and out:
            out[at] ^= 1 << draw(hs.integers(0, 7))
        elif how == "overwrite":
            chunk = draw(hs.binary(min_size=1, max_size=16) | hs.sampled_from([b"\0" * 8, b"\xff" * 8, b'"', b"}"]))
            out[at:at + len(chunk)] = chunk
        elif how == "cut":
            del out[at:at + draw(hs.integers(1, 64))]
        elif how == "insert":
            out[at:at] = draw(hs.binary(min_size=1, max_size=16))
        elif how == "truncate":
            del out[at:]
        else:
            out += draw(hs.binary(min_size=1, max_size=16))
    return bytes(out)


@FUZZ
@given(data=hs.data())
def test_fuzzed_bytes_of_any_file_give_only_checkpoint_errors(pristine: Pristine, data: hs.DataObject) -> None:
    """Raw damage to one file (data, replica, index, device map or state file), then every read
    path: header damage refuses before a byte is written, tensor damage fails its checksum while
    streaming, and either way no variable is left half-restored and marked initialized."""
    path = data.draw(hs.sampled_from(sorted(pristine.raw)), label="file")
    try:
        path.write_bytes(data.draw(damaged_bytes(pristine.raw[path]), label="bytes"))
        read_everything(pristine)
    finally:
        pristine.reset()
