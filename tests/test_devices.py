"""Tests for gpuvars.devices: TF's device grammar, merging, scopes and device functions."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpuvars.devices import (
    DeviceOp,
    DeviceSpec,
    current_device_spec,
    device,
    replica_device_setter,
)
from gpuvars.errors import InvalidArgumentError

# --- strategies -----------------------------------------------------------------

_ints = st.none() | st.integers(0, 1000)
_types = st.sampled_from(["CPU", "GPU", "TPU", "CUSTOM", "EPU", "cpu", "gpu", "Gpu"])
specs = st.builds(
    DeviceSpec,
    job=st.none() | st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=8),
    replica=_ints,
    task=_ints,
    device_type=st.none() | _types,
    device_index=_ints,
).filter(lambda s: s.device_type is not None or s.device_index is None)
typed_indexed = st.builds(
    DeviceSpec,
    job=st.none() | st.sampled_from(["ps", "worker", "localhost"]),
    replica=_ints,
    task=_ints,
    device_type=_types,
    device_index=st.integers(0, 1000),
)


# --- DeviceSpec: properties ---------------------------------------------------------


@given(specs)
def test_to_string_round_trips(spec: DeviceSpec) -> None:
    assert DeviceSpec.from_string(spec.to_string()) == spec
    assert str(spec) == spec.to_string()


@given(specs, specs)
def test_merge_other_wins_where_set(a: DeviceSpec, b: DeviceSpec) -> None:
    merged = a.make_merged_spec(b)
    for field in ("job", "replica", "task", "device_type", "device_index"):
        expected = getattr(b, field) if getattr(b, field) is not None else getattr(a, field)
        assert getattr(merged, field) == expected


@given(specs)
def test_merge_with_empty_is_identity(spec: DeviceSpec) -> None:
    assert spec.make_merged_spec(DeviceSpec()) == spec
    assert DeviceSpec().make_merged_spec(spec) == spec


@given(typed_indexed)
def test_short_string_round_trips(spec: DeviceSpec) -> None:
    short = spec.short_string()
    assert f"/{spec.device_type.lower()}:{spec.device_index}" in short  # type: ignore[union-attr]
    assert "device:" not in short
    assert DeviceSpec.from_string(short) == spec


@given(specs, specs)
def test_eq_and_hash_follow_to_string(a: DeviceSpec, b: DeviceSpec) -> None:
    assert (a == b) == (a.to_string() == b.to_string())
    if a == b:
        assert hash(a) == hash(b)


# --- DeviceSpec: grammar ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", DeviceSpec()),
        ("/", DeviceSpec()),
        ("cpu", DeviceSpec(device_type="CPU")),
        ("gpu:1", DeviceSpec(device_type="GPU", device_index=1)),
        ("/GPU:1", DeviceSpec(device_type="GPU", device_index=1)),
        ("GPU:1", DeviceSpec(device_type="GPU", device_index=1)),
        ("/gpu:*", DeviceSpec(device_type="GPU")),
        ("/device:GPU:1", DeviceSpec(device_type="GPU", device_index=1)),
        ("/device:gpu:*", DeviceSpec(device_type="GPU")),
        ("/device:MyChip:3", DeviceSpec(device_type="MyChip", device_index=3)),
        (
            "/job:ps/task:7/device:CPU:0",
            DeviceSpec(job="ps", task=7, device_type="CPU", device_index=0),
        ),
        (
            "/job:localhost/replica:0/task:0/device:GPU:1",
            DeviceSpec(job="localhost", replica=0, task=0, device_type="GPU", device_index=1),
        ),
        ("//job:ps//gpu:0/", DeviceSpec(job="ps", device_type="GPU", device_index=0)),
        ("/tpu:2/job:w", DeviceSpec(job="w", device_type="TPU", device_index=2)),
    ],
)
def test_from_string_grammar(text: str, expected: DeviceSpec) -> None:
    spec = DeviceSpec.from_string(text)
    assert spec == expected
    assert spec.job == expected.job and spec.device_type == expected.device_type


@pytest.mark.parametrize(
    ("text", "full", "short"),
    [
        ("gpu:1", "/device:GPU:1", "/gpu:1"),
        ("cpu:0", "/device:CPU:0", "/cpu:0"),
        ("gpu", "/device:GPU:*", "/device:GPU:*"),
        ("/job:ps/task:7/device:CPU:0", "/job:ps/task:7/device:CPU:0", "/job:ps/task:7/cpu:0"),
        ("/device:MyChip:3", "/device:MyChip:3", "/device:MyChip:3"),
        ("/job:ps", "/job:ps", "/job:ps"),
        ("", "", ""),
    ],
)
def test_to_string_and_short_string(text: str, full: str, short: str) -> None:
    spec = DeviceSpec.from_string(text)
    assert spec.to_string() == full
    assert spec.short_string() == short


def test_device_type_normalised_in_constructor() -> None:
    assert DeviceSpec(device_type="gpu").device_type == "GPU"
    assert DeviceSpec(device_type="custom").device_type == "CUSTOM"
    assert DeviceSpec(device_type="MyChip").device_type == "MyChip"


def test_eq_and_hash_across_spellings() -> None:
    spellings = ["/GPU:0", "gpu:0", "/device:GPU:0", "/device:gpu:0", "GPU:0"]
    specs_ = {DeviceSpec.from_string(s) for s in spellings}
    assert specs_ == {DeviceSpec(device_type="gpu", device_index=0)}
    assert DeviceSpec.from_string("/gpu:0") != DeviceSpec.from_string("/gpu:1")
    assert DeviceSpec.from_string("/gpu:0") != "/gpu:0"
    # An index without a type is not dropped by equality although to_string hides it.
    assert DeviceSpec(device_index=1).to_string() == ""
    assert DeviceSpec(device_index=1) != DeviceSpec()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("/gpu:x", r"invalid literal for int: 'x' in '/gpu:x'"),
        ("/device:GPU:one", r"invalid literal for int: 'one' in '/device:GPU:one'"),
        ("/task:-1", r"invalid literal for int: '-1' in '/task:-1'"),
        ("/replica:*", r"invalid literal for int: '\*' in '/replica:\*'"),
        ("/cpu:0/gpu:1", r"Cannot specify multiple device types: /cpu:0/gpu:1"),
        ("/device:GPU:0/cpu", r"Cannot specify multiple device types: /device:GPU:0/cpu"),
        ("/foo:1", r"Unknown attribute: 'foo' in '/foo:1'"),
        ("/JOB:ps", r"Unknown attribute: 'JOB' in '/JOB:ps'"),
        ("/device:GPU", r"Unknown attribute: 'device' in '/device:GPU'"),
        ("/gpu:0:1", r"Unknown attribute: 'gpu' in '/gpu:0:1'"),
        ("/job:ps:x", r"Unknown attribute: 'job' in '/job:ps:x'"),
        ("/job:", r"DeviceSpec job must be .* in '/job:'"),
        ("/device::0", r"DeviceSpec device_type must be .* in '/device::0'"),
    ],
)
def test_from_string_errors(text: str, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        DeviceSpec.from_string(text)


def test_from_string_rejects_non_str() -> None:
    with pytest.raises(InvalidArgumentError, match=r"must be a str, got int\(3\)"):
        DeviceSpec.from_string(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # InvalidArgumentError is a ValueError
        DeviceSpec.from_string(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"task": -1}, r"task must be a non-negative int or None, got int\(-1\)"),
        ({"replica": "0"}, r"replica must be a non-negative int or None, got str\('0'\)"),
        ({"device_index": True}, r"device_index must be .* got bool\(True\)"),
        ({"job": 3}, r"job must be a non-empty str .* got int\(3\)"),
        ({"job": "a/b"}, r"job must be"),
        ({"device_type": ""}, r"device_type must be"),
    ],
)
def test_constructor_validates(fields: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        DeviceSpec(**fields)  # type: ignore[arg-type]


def test_spec_is_frozen() -> None:
    spec = DeviceSpec(job="ps")
    with pytest.raises(AttributeError):
        spec.job = "worker"  # type: ignore[misc]


def test_make_merged_spec_and_replace() -> None:
    base = DeviceSpec.from_string("/job:ps/task:1/device:CPU:0")
    merged = base.make_merged_spec(DeviceSpec.from_string("/gpu:2"))
    assert merged.to_string() == "/job:ps/task:1/device:GPU:2"
    assert base.to_string() == "/job:ps/task:1/device:CPU:0"
    assert base.replace(task=3, job=None).to_string() == "/task:3/device:CPU:0"
    assert base.replace(device_type="gpu").device_type == "GPU"
    with pytest.raises(InvalidArgumentError, match=r"no field color; expected some of job"):
        base.replace(color="red")
    with pytest.raises(InvalidArgumentError, match=r"task must be a non-negative int"):
        base.replace(task=-2)
    with pytest.raises(InvalidArgumentError, match=r"expects a DeviceSpec, got str"):
        base.make_merged_spec("/gpu:0")  # type: ignore[arg-type]


def test_coerce() -> None:
    spec = DeviceSpec(device_type="CPU", device_index=0)
    assert DeviceSpec.coerce(spec) is spec
    assert DeviceSpec.coerce("/cpu:0") == spec
    with pytest.raises(InvalidArgumentError, match=r"got float\(1.5\)"):
        DeviceSpec.coerce(1.5)  # type: ignore[arg-type]


# --- scopes -------------------------------------------------------------------------


def _current() -> str | None:
    spec = current_device_spec()
    return None if spec is None else spec.to_string()


def test_no_scope_gives_none() -> None:
    assert current_device_spec() is None


def test_nested_scopes_merge_inner_wins() -> None:
    with device("/job:ps"):
        assert _current() == "/job:ps"
        with device("/gpu:1"):
            assert _current() == "/job:ps/device:GPU:1"
            with device("/job:worker/cpu:0"):
                assert _current() == "/job:worker/device:CPU:0"
            with device(DeviceSpec(task=3)):
                assert _current() == "/job:ps/task:3/device:GPU:1"
        assert _current() == "/job:ps"
    assert _current() is None


def test_none_resets_and_empty_string_is_noop() -> None:
    with device("/job:ps/gpu:0"):
        with device(None):
            assert current_device_spec() is None
            with device("/cpu:1"):
                assert _current() == "/device:CPU:1"
        with device(""):
            assert _current() == "/job:ps/device:GPU:0"
            with device(None), device(""):
                assert current_device_spec() is None
        assert _current() == "/job:ps/device:GPU:0"


def test_device_rejects_other_types_at_call() -> None:
    match = r"Expecting a string device name, .* Got int\(3\)"
    with pytest.raises(InvalidArgumentError, match=match):
        device(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"Unknown attribute: 'bogus'"):
        device("/bogus:1")


def test_scope_restored_after_exception() -> None:
    with device("/job:ps"):
        with pytest.raises(RuntimeError, match="boom"):
            with device("/gpu:0"), device(None):
                raise RuntimeError("boom")
        assert _current() == "/job:ps"
    assert current_device_spec() is None


def test_device_function_sees_inner_device_and_replaces_it() -> None:
    seen: list[DeviceOp] = []

    def fn(op: DeviceOp) -> str:
        seen.append(op)
        return "/job:w/cpu:0"

    with device("/task:4"), device(fn), device("/gpu:1"):
        spec = current_device_spec(op_type="Op", name="matmul")
    assert seen == [DeviceOp(type="Op", name="matmul", device="/device:GPU:1")]
    # The function's result replaces the inner /gpu:1; the outer scope fills gaps.
    assert spec is not None and spec.to_string() == "/job:w/task:4/device:CPU:0"


def test_device_function_none_leaves_device() -> None:
    with device("/job:ps"), device(lambda op: None), device("/gpu:0"):
        assert _current() == "/job:ps/device:GPU:0"
    with device(lambda op: DeviceSpec(device_type="TPU", device_index=0)):
        assert current_device_spec() == DeviceSpec.from_string("/tpu:0")


def test_device_function_bad_result() -> None:
    with device(lambda op: 42):  # type: ignore[arg-type,return-value]
        match = r"must return a str, DeviceSpec or None, got int\(42\)"
        with pytest.raises(InvalidArgumentError, match=match):
            current_device_spec()
    with device(lambda op: "/nope:0"):
        with pytest.raises(InvalidArgumentError, match=r"Unknown attribute: 'nope'"):
            current_device_spec()


def test_scopes_isolated_across_threads() -> None:
    barrier = threading.Barrier(2, timeout=10)
    results: dict[str, str | None] = {}
    errors: list[BaseException] = []

    def run(name: str, spec: str) -> None:
        try:
            with device(spec):
                barrier.wait()  # both threads are inside their scopes now
                results[name] = _current()
                barrier.wait()  # neither leaves before both have looked
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=("a", "/gpu:0")),
        threading.Thread(target=run, args=("b", "/job:ps")),
    ]
    with device("/cpu:7"):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _current() == "/device:CPU:7"
    assert not errors
    assert results == {"a": "/device:GPU:0", "b": "/job:ps"}


def test_scopes_isolated_across_asyncio_tasks() -> None:
    async def task(spec: str, entered: asyncio.Event, other: asyncio.Event) -> str | None:
        with device(spec):
            entered.set()
            await other.wait()  # the other task is inside its scope too
            return _current()

    async def main() -> list[str | None]:
        e1, e2 = asyncio.Event(), asyncio.Event()
        with device("/job:outer"):
            results = await asyncio.gather(task("/gpu:0", e1, e2), task("/gpu:1", e2, e1))
            assert _current() == "/job:outer"
        return list(results)

    assert asyncio.run(main()) == ["/job:outer/device:GPU:0", "/job:outer/device:GPU:1"]
    assert current_device_spec() is None


# --- replica_device_setter -------------------------------------------------------------


def _setter(**kwargs: object) -> Callable[[DeviceOp], DeviceSpec]:
    setter = replica_device_setter(**kwargs)  # type: ignore[arg-type]
    assert setter is not None
    return setter


def test_setter_zero_tasks_is_none() -> None:
    assert replica_device_setter() is None
    assert replica_device_setter(ps_tasks=0) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ps_tasks": -1}, r"ps_tasks must be a non-negative int, got int\(-1\)"),
        ({"ps_tasks": 2.0}, r"ps_tasks must be a non-negative int, got float"),
        ({"ps_tasks": 2, "ps_strategy": 3}, r"ps_strategy must be callable"),
        ({"ps_tasks": 2, "ps_device": "/bad:0"}, r"Unknown attribute: 'bad'"),
    ],
)
def test_setter_validates(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        replica_device_setter(**kwargs)  # type: ignore[arg-type]


def test_setter_round_robin_over_three_tasks() -> None:
    with device(_setter(ps_tasks=3)):
        tasks = [current_device_spec(name=f"v{i}") for i in range(6)]
    assert [str(t) for t in tasks] == [f"/job:ps/task:{k}" for k in (0, 1, 2, 0, 1, 2)]


def test_setter_counters_are_per_setter() -> None:
    a, b = _setter(ps_tasks=2), _setter(ps_tasks=2)
    op = DeviceOp(type="Variable", name="v", device="")
    assert [a(op).task, a(op).task, b(op).task, a(op).task] == [0, 1, 0, 0]


def test_setter_merges_inner_scope_device() -> None:
    with device(_setter(ps_tasks=2)):
        with device("/gpu:0"):
            first = current_device_spec()
            second = current_device_spec()
    assert str(first) == "/job:ps/task:0/device:GPU:0"
    assert str(second) == "/job:ps/task:1/device:GPU:0"


def test_setter_op_on_other_job_keeps_it_and_draws_no_task() -> None:
    setter = _setter(ps_tasks=2)
    assert str(setter(DeviceOp("Variable", "v", "/job:worker/cpu:0"))) == "/job:worker/device:CPU:0"
    assert setter(DeviceOp("Variable", "v", "")).task == 0


def test_setter_non_variable_ops_get_worker_device() -> None:
    with device(_setter(ps_tasks=2, worker_device="/job:worker/task:1")):
        assert str(current_device_spec(op_type="Op")) == "/job:worker/task:1"
        with device("/gpu:3"):
            assert str(current_device_spec(op_type="MatMul")) == "/job:worker/task:1/device:GPU:3"
        assert str(current_device_spec()) == "/job:ps/task:0"


def test_setter_without_merge_keeps_existing_device() -> None:
    setter = _setter(ps_tasks=2, merge_devices=False)
    assert str(setter(DeviceOp("Variable", "v", "/gpu:0"))) == "/device:GPU:0"
    assert str(setter(DeviceOp("Variable", "v", ""))) == "/job:ps/task:0"
    assert str(setter(DeviceOp("Op", "x", "/cpu:0"))) == "/device:CPU:0"
    assert str(setter(DeviceOp("Op", "x", ""))) == "/job:worker"


def test_setter_custom_strategy_and_ps_device() -> None:
    calls: list[str] = []

    def strategy(op: DeviceOp) -> int:
        calls.append(op.name)
        return len(op.name)

    setter = _setter(ps_tasks=4, ps_device="/job:ps/cpu:0", ps_strategy=strategy)
    with device(setter):
        assert str(current_device_spec(name="abc")) == "/job:ps/task:3/device:CPU:0"
    assert calls == ["abc"]


def test_setter_round_robin_is_thread_safe() -> None:
    setter = _setter(ps_tasks=3)
    op = DeviceOp(type="Variable", name="v", device="")
    counts = [0, 0, 0]
    lock = threading.Lock()
    barrier = threading.Barrier(8, timeout=10)

    def work() -> None:
        barrier.wait()
        for _ in range(300):
            task = setter(op).task
            assert task is not None
            with lock:
                counts[task] += 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts == [800, 800, 800]
