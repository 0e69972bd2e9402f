"""The array layer: probes, the lazy registry and each usable backend's operations.

Every operation runs on numpy and on JAX's CPU devices (JAX on device 1, so a result
that drifts to device 0 is caught); CuPy's are in test_gpu.py.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gpuvars_backends as backends
from gpuvars_backends._util import draw_dtype, truncated, unique_rounds
from conftest import jax_device_of, needs_jax

try:
    import ml_dtypes

    BF16: np.dtype[Any] | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

REFERENCE = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.true_divide,
    "min": np.minimum,
    "max": np.maximum,
}


@pytest.fixture(autouse=True)
def _fresh_probes() -> Iterator[None]:
    yield
    backends.reset()  # tests below monkeypatch what the probes see


# --- probes and the registry ---------------------------------------------------------


def test_installed_does_not_import(monkeypatch: pytest.MonkeyPatch) -> None:
    assert backends.installed("numpy")
    assert not backends.installed("surely_no_such_library_gpuvars")
    monkeypatch.setitem(sys.modules, "cupy", None)  # Python's way to block an import
    assert not backends.installed("cupy")


def test_probe_cupy_missing_is_an_answer_not_an_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)
    backends.reset()
    probe = backends.probe("cupy", "gpu")
    assert probe == backends.Probe("cupy", "gpu", 0, "cupy is not installed")
    assert not probe.usable and probe.backend is None
    with pytest.raises(RuntimeError, match=r"cupy on gpu is not usable: cupy is not installed"):
        backends.get("cupy", "gpu")


@needs_jax
def test_probe_jax_without_gpu_says_no_gpu() -> None:
    probe = backends.probe("jax", "gpu")
    if probe.usable:
        pytest.skip("JAX sees a GPU here")
    assert probe.count == 0 and probe.backend is None
    assert "jax" in probe.reason and "no GPU" in probe.reason


def test_probe_of_a_failing_library_reports_why(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("jax")
    import gpuvars_backends.jax as jax_backend

    def broken(self: object, platform: str) -> None:
        raise RuntimeError("CUDA driver version is insufficient")

    monkeypatch.setattr(jax_backend.JaxBackend, "__init__", broken)
    backends.reset()
    probe = backends.probe("jax", "gpu")
    assert probe.count == 0
    assert probe.reason == "jax failed to start: RuntimeError: CUDA driver version is insufficient"


def test_probe_unknown_pair_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"no backend for library 'cupy' on platform 'cpu'; known: .*numpy/cpu"):
        backends.probe("cupy", "cpu")
    with pytest.raises(ValueError, match="torch"):
        backends.probe("torch", "gpu")


def test_probe_is_cached_until_reset() -> None:
    first = backends.probe("numpy", "cpu")
    assert backends.probe("numpy", "cpu") is first
    assert first.usable and first.count == 1 and first.reason == ""
    backends.reset()
    again = backends.probe("numpy", "cpu")
    assert again is not first and again.backend is not first.backend


def test_owner_of() -> None:
    numpy_backend = backends.get("numpy", "cpu")
    assert backends.owner_of(np.zeros(3)) is numpy_backend
    for not_an_array in ([1.0, 2.0], 3.0, 7, "x", None, np.float32(1.0)):
        assert backends.owner_of(not_an_array) is None


@needs_jax
def test_owner_of_jax_array() -> None:
    import jax.numpy as jnp

    owner = backends.owner_of(jnp.ones(3))
    assert owner is backends.get("jax", "cpu")


# --- each backend's operations ----------------------------------------------------------


class Case:
    """A backend and the device index the test uses (JAX: 1, to see drift to device 0)."""

    def __init__(self, library: str) -> None:
        self.backend = backends.get(library, "cpu")
        self.index = 1 if library == "jax" else 0
        self.library = library

    def check_home(self, array: Any) -> None:
        """``array`` is this backend's, on the test's device."""
        assert self.backend.owns(array)
        if self.library == "jax":
            import jax

            assert jax_device_of(array) == jax.devices("cpu")[self.index]
            assert array.committed
        else:
            assert isinstance(array, np.ndarray)

    def host(self, array: Any) -> np.ndarray[Any, Any]:
        out = self.backend.to_numpy(array)
        assert type(out) is np.ndarray
        return out


@pytest.fixture(params=["numpy", pytest.param("jax", marks=needs_jax)])
def case(request: pytest.FixtureRequest) -> Case:
    return Case(request.param)


def test_backend_satisfies_the_protocol(case: Case) -> None:
    assert isinstance(case.backend, backends.Backend)
    assert case.backend.name == case.library and case.backend.platform == "cpu"
    assert case.backend.inplace is (case.library == "numpy")
    assert case.backend.device_count() >= 1


def test_asarray_copies_and_casts(case: Case) -> None:
    src = np.arange(6, dtype=np.float64).reshape(2, 3)
    out = case.backend.asarray(src, np.dtype(np.float32), case.index)
    case.check_home(out)
    assert out.dtype == np.float32 and out.shape == (2, 3)
    np.testing.assert_array_equal(case.host(out), src)
    src[0, 0] = 99  # a copy, never an alias
    assert case.host(out)[0, 0] == 0
    again = case.backend.asarray(out, np.dtype(np.int32), case.index)
    case.check_home(again)
    assert again.dtype == np.int32


def test_empty_and_full(case: Case) -> None:
    f32 = np.dtype(np.float32)
    empty = case.backend.empty((3, 2), f32, case.index)
    case.check_home(empty)
    assert empty.shape == (3, 2) and empty.dtype == f32
    full = case.backend.full((3, 2), 1.5, f32, case.index)
    case.check_home(full)
    np.testing.assert_array_equal(case.host(full), np.full((3, 2), 1.5, np.float32))
    rows = case.backend.full((3, 2), np.array([1.0, 2.0]), np.dtype(np.int32), case.index)
    case.check_home(rows)
    np.testing.assert_array_equal(case.host(rows), [[1, 2]] * 3)
    assert rows.dtype == np.int32


def test_to_numpy_is_a_copy(case: Case) -> None:
    arr = case.backend.asarray(np.arange(3), np.dtype(np.int32), case.index)
    host = case.host(arr)
    host[0] = 42
    assert case.host(arr)[0] == 0


@pytest.mark.parametrize("op", ["assign", "add", "sub"])
def test_apply(case: Case, op: str) -> None:
    dst = case.backend.asarray(np.array([1.0, 2.0, 3.0]), np.dtype(np.float32), case.index)
    src = case.backend.asarray(np.array([0.5, 0.5, 4.0]), np.dtype(np.float32), case.index)
    out = case.backend.apply(op, dst, src, case.index)
    expected = {"assign": [0.5, 0.5, 4.0], "add": [1.5, 2.5, 7.0], "sub": [0.5, 1.5, -1.0]}[op]
    case.check_home(out)
    np.testing.assert_array_equal(case.host(out), np.array(expected, np.float32))
    if case.backend.inplace:
        assert out is dst


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "min", "max"])
def test_scatter_repeated_indices_accumulate_like_ufunc_at(case: Case, op: str) -> None:
    start = np.array([[1.0, -2.0], [4.0, 8.0], [3.0, 0.5], [-1.0, 2.0]], np.float32)
    indices = np.array([0, 2, 0, 3, 0, 2], np.int64)
    updates = np.array([[2.0, 0.5], [4.0, 2.0], [0.5, 4.0], [-2.0, 8.0], [2.0, 2.0], [0.25, 1.0]], np.float32)
    expected = start.copy()
    REFERENCE[op].at(expected, indices, updates)
    dst = case.backend.asarray(start, start.dtype, case.index)
    upd = case.backend.asarray(updates, updates.dtype, case.index)
    out = case.backend.scatter(op, dst, indices, upd, case.index)
    case.check_home(out)
    np.testing.assert_allclose(case.host(out), expected, rtol=1e-6)
    assert out.dtype == np.float32
    if case.backend.inplace:
        assert out is dst


def test_scatter_update_distinct_indices(case: Case) -> None:
    dst = case.backend.asarray(np.zeros((4, 2)), np.dtype(np.float32), case.index)
    upd = case.backend.asarray(np.array([[1.0, 2.0], [3.0, 4.0]]), np.dtype(np.float32), case.index)
    out = case.backend.scatter("update", dst, np.array([3, 1]), upd, case.index)
    case.check_home(out)
    np.testing.assert_array_equal(case.host(out), [[0, 0], [3, 4], [0, 0], [1, 2]])


def test_scatter_integer_division_truncates_like_ufunc_at(case: Case) -> None:
    start = np.array([9, 7, -7, 5], np.int32)
    indices = np.array([0, 0, 2, 3])
    updates = np.array([2, 2, 2, 5], np.int32)
    expected = start.copy()
    np.true_divide.at(expected, indices, updates)  # numpy casts back unsafely: truncation
    dst = case.backend.asarray(start, start.dtype, case.index)
    out = case.backend.scatter("div", dst, indices, case.backend.asarray(updates, updates.dtype, case.index), case.index)
    np.testing.assert_array_equal(case.host(out), expected)
    assert out.dtype == np.int32


@settings(max_examples=25, deadline=None)
@given(
    op=st.sampled_from(sorted(REFERENCE)),
    rows=st.integers(1, 6),
    data=st.data(),
)
def test_scatter_matches_ufunc_at_property(op: str, rows: int, data: st.DataObject) -> None:
    # numpy only: JAX would compile a kernel per drawn shape (the fixed-shape test covers it)
    backend = backends.get("numpy", "cpu")
    indices = data.draw(hnp.arrays(np.int64, st.integers(0, 12), elements=st.integers(0, rows - 1)))
    start = data.draw(hnp.arrays(np.float64, (rows, 2), elements=st.sampled_from([0.5, 1.0, 2.0, -4.0])))
    updates = data.draw(
        hnp.arrays(np.float64, (indices.size, 2), elements=st.sampled_from([0.5, 1.0, 2.0, -2.0]))
    )
    expected = start.copy()
    REFERENCE[op].at(expected, indices, updates)
    out = backend.scatter(op, start.copy(), indices, updates, 0)
    np.testing.assert_array_equal(out, expected)


def test_random_kinds(case: Case) -> None:
    f32 = np.dtype(np.float32)
    shape = (200, 100)
    uniform = case.host(case.backend.random("uniform", shape, f32, 7, case.index, (-2.0, 3.0)))
    assert uniform.dtype == np.float32 and uniform.shape == shape
    assert uniform.min() >= -2.0 and uniform.max() < 3.0
    assert abs(uniform.mean() - 0.5) < 0.05
    normal = case.host(case.backend.random("normal", shape, f32, 7, case.index, (1.0, 2.0)))
    assert abs(normal.mean() - 1.0) < 0.05 and abs(normal.std() - 2.0) < 0.05
    trunc = case.backend.random("truncated_normal", shape, f32, 7, case.index, (1.0, 2.0))
    case.check_home(trunc)
    host = case.host(trunc)
    assert host.min() >= 1.0 - 4.0 and host.max() <= 1.0 + 4.0
    # a standard normal cut at +-2 has stddev 0.8796
    assert abs(host.std() - 2.0 * 0.8796) < 0.05
    with pytest.raises(ValueError, match="unknown random kind 'poisson'"):
        case.backend.random("poisson", shape, f32, 7, case.index, (0.0, 1.0))


def test_random_is_reproducible_by_seed(case: Case) -> None:
    f32 = np.dtype(np.float32)
    a = case.host(case.backend.random("normal", (50,), f32, 123, case.index, (0.0, 1.0)))
    b = case.host(case.backend.random("normal", (50,), f32, 123, case.index, (0.0, 1.0)))
    c = case.host(case.backend.random("normal", (50,), f32, 124, case.index, (0.0, 1.0)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    big_seed = case.host(case.backend.random("uniform", (5,), f32, 2**62 + 11, case.index, (0.0, 1.0)))
    assert big_seed.shape == (5,)


@pytest.mark.parametrize("dtype", ["float16", "float64", "bfloat16"])
def test_random_narrow_and_wide_floats(case: Case, dtype: str) -> None:
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    try:
        case.backend.check_dtype(dt)
    except TypeError as exc:
        assert case.library == "jax" and "jax_enable_x64" in str(exc)
        pytest.skip(str(exc))
    out = case.backend.random("truncated_normal", (64,), dt, 3, case.index, (0.0, 1.0))
    case.check_home(out)
    assert out.dtype == dt
    assert np.all(np.abs(case.host(out).astype(np.float32)) <= 2.0)


def test_check_dtype(case: Case) -> None:
    case.backend.check_dtype(np.dtype(np.float32))
    case.backend.check_dtype(np.dtype(np.int8))
    with pytest.raises(TypeError, match="object"):
        case.backend.check_dtype(np.dtype(object))


@needs_jax
def test_jax_check_dtype_names_x64() -> None:
    import jax

    if jax.config.jax_enable_x64:
        pytest.skip("jax_enable_x64 is on")
    with pytest.raises(TypeError, match=r"JAX would store float64 as float32 because jax_enable_x64 is off.*dtype=float32"):
        backends.get("jax", "cpu").check_dtype(np.dtype(np.float64))


def test_device_of_and_synchronize(case: Case) -> None:
    arr = case.backend.asarray(np.ones(2), np.dtype(np.float32), case.index)
    expected = None if case.library == "numpy" else case.index
    assert case.backend.device_of(arr) == expected
    case.backend.synchronize(case.index)


def test_from_dlpack_round_trip(case: Case) -> None:
    src = np.arange(4, dtype=np.float32)
    out = case.backend.from_dlpack(src, case.index)
    case.check_home(out)
    np.testing.assert_array_equal(case.host(out), src)
    back = np.from_dlpack(case.backend.asarray(src, src.dtype, case.index))
    np.testing.assert_array_equal(back, src)


@needs_jax
def test_jax_results_stay_committed_on_their_device() -> None:
    # An array made under jax.default_device is *uncommitted* and follows committed
    # operands to their device; storage must never move like that.
    import jax

    backend = backends.get("jax", "cpu")
    cpu = jax.devices("cpu")
    for make in (
        lambda: backend.empty((2,), np.dtype(np.float32), 2),
        lambda: backend.full((2,), 1.0, np.dtype(np.float32), 2),
        lambda: backend.random("normal", (2,), np.dtype(np.float32), 1, 2, (0.0, 1.0)),
    ):
        arr = make()
        assert arr.committed and jax_device_of(arr) == cpu[2]
        mixed = arr + jax.device_put(np.ones(2, np.float32), cpu[2])
        assert jax_device_of(mixed) == cpu[2]


# --- helpers --------------------------------------------------------------------------------


@given(hnp.arrays(np.int64, st.integers(0, 40), elements=st.integers(0, 6)))
def test_unique_rounds_property(indices: np.ndarray[Any, Any]) -> None:
    rounds = unique_rounds(indices)
    positions = np.concatenate(rounds) if rounds else np.zeros(0, np.int64)
    # every position exactly once
    assert sorted(positions.tolist()) == list(range(indices.size))
    # no index twice in a round
    for r in rounds:
        assert r.size and len(set(indices[r].tolist())) == r.size
    # as many rounds as the most repeated index, and repeats in their original order
    counts = np.bincount(indices) if indices.size else np.zeros(0, np.int64)
    assert len(rounds) == (int(counts.max()) if indices.size else 0)
    round_of = {int(p): k for k, r in enumerate(rounds) for p in r}
    for value in set(indices.tolist()):
        where = np.nonzero(indices == value)[0]
        assert [round_of[int(p)] for p in where] == list(range(where.size))
    # round-by-round non-accumulating updates equal an accumulating ufunc.at
    factors = np.arange(1, indices.size + 1, dtype=np.float64)
    expected = np.ones(7)
    np.multiply.at(expected, indices, factors)
    got = np.ones(7)
    for r in rounds:
        got[indices[r]] *= factors[r]
    np.testing.assert_array_equal(got, expected)


def test_truncated_redraws_outliers() -> None:
    rng = np.random.default_rng(0)
    out = truncated(lambda k: rng.standard_normal(k) * 3.0, 10_000, -2.0, 2.0, np)
    assert out.shape == (10_000,) and out.min() >= -2.0 and out.max() <= 2.0


def test_draw_dtype() -> None:
    assert draw_dtype(np.dtype(np.float64)) == np.float64
    assert draw_dtype(np.dtype(np.float16)) == np.float32
    assert BF16 is not None and draw_dtype(BF16) == np.float32
