"""The public surface as users meet it: ``gv.__all__`` is the documented list (README.md,
between the ``api:start`` / ``api:end`` markers), public classes and functions report
``__module__ == "gpuvars"``, arguments are keyword-only where TF/Keras make them so,
and the error classes form one hierarchy over the fitting builtins."""

from __future__ import annotations

import inspect
import pathlib
import re
import types

import pytest

import gpuvars as gv
import gpuvars.errors

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _documented() -> set[str]:
    text = README.read_text()
    section = text.split("<!-- api:start -->", 1)[1].split("<!-- api:end -->", 1)[0]
    names: set[str] = set()
    for row in section.splitlines()[2:]:  # skip the table's header and rule
        cells = row.split("|")
        if len(cells) > 2:
            names.update(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cells[2]))
    return names


def test_all_is_sorted_and_unique() -> None:
    assert gv.__all__ == sorted(gv.__all__, key=str)
    assert len(gv.__all__) == len(set(gv.__all__))


def test_all_is_exactly_the_documented_list() -> None:
    documented = _documented()
    assert len(documented) > 50
    assert set(gv.__all__) == documented, (
        f"exported, not documented: {sorted(set(gv.__all__) - documented)}; "
        f"documented, not exported: {sorted(documented - set(gv.__all__))}"
    )


def test_every_public_attribute_is_exported() -> None:
    # submodules reached as attributes (gv.variable, gv.placement, ...) are not API
    public = {
        name
        for name in dir(gv)
        if not name.startswith("_") and not (isinstance(getattr(gv, name), types.ModuleType) and name not in gv.__all__)
    }
    assert public == set(gv.__all__)


def test_public_classes_and_functions_report_module_gpuvars() -> None:
    wrong = {
        name: obj.__module__
        for name in gv.__all__
        if isinstance(obj := getattr(gv, name), (type, types.FunctionType)) and obj.__module__ != "gpuvars"
    }
    assert not wrong
    assert repr(gv.Variable) == "<class 'gpuvars.Variable'>"


def test_the_result_types_users_receive_are_exported(tmp_path: pathlib.Path) -> None:
    v = gv.Variable([1.0], name="v")
    saver = gv.Saver([v])
    prefix = saver.save(str(tmp_path / "m"))
    assert isinstance(saver.restore(prefix), gv.RestoreResult)
    assert isinstance(gv.get_checkpoint_state(str(tmp_path)), gv.CheckpointState)
    with gv.Registry():
        assert isinstance(gv.load_checkpoint(prefix), gv.LoadedCheckpoint)
    assert isinstance(gv.global_variables()[0], gv.RegistryMember)


@pytest.mark.parametrize(
    "fn, positional",
    [
        (gv.Variable.__init__, ["self", "initial_value"]),
        (gv.ShardedVariable.__init__, ["self", "initial_value", "partitioner"]),
        (gv.load_checkpoint, ["prefix"]),
        (gv.Saver.__init__, ["self", "var_list"]),
        (gv.Saver.restore, ["self", "save_path"]),
        (gv.Variable.assign, ["self", "value"]),
        (gv.Variable.assign_add, ["self", "delta"]),
    ],
)
def test_arguments_after_the_first_are_keyword_only(fn: object, positional: list[str]) -> None:
    params = inspect.signature(fn).parameters.values()  # type: ignore[arg-type]
    assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == positional


def test_errors_module_all_matches_its_classes() -> None:
    classes = {
        name
        for name, obj in vars(gpuvars.errors).items()
        if isinstance(obj, type) and issubclass(obj, (gv.GpuvarsError, Warning)) and not name.startswith("_")
    }
    assert set(gpuvars.errors.__all__) == classes
    assert classes <= set(gv.__all__)


def test_error_hierarchy_subclasses_the_fitting_builtins() -> None:
    assert issubclass(gv.InvalidArgumentError, ValueError)
    assert issubclass(gv.UninitializedVariableError, RuntimeError)
    assert issubclass(gv.DevicePlacementError, ValueError)
    assert issubclass(gv.TransferGuardError, RuntimeError)
    assert issubclass(gv.ResourceExhaustedError, MemoryError)
    assert issubclass(gv.SerializationError, TypeError)
    assert issubclass(gv.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(gv.CheckpointWriteError, OSError)
    assert issubclass(gv.CheckpointCommitError, gv.CheckpointError)
    assert issubclass(gv.CheckpointCommitError, gv.DistributedError)  # .processes names who is at fault
    assert gv.CheckpointCommitError("x", (1,)).processes == (1,)
    assert issubclass(gv.PlacementWarning, UserWarning)
    for name in gpuvars.errors.__all__:
        cls = getattr(gv, name)
        assert issubclass(cls, gv.GpuvarsError) or cls is gv.PlacementWarning


def test_initializers_namespace_has_the_keras_classes() -> None:
    for name in ("GlorotUniform", "GlorotNormal", "HeNormal", "HeUniform", "LecunNormal", "VarianceScaling",
                 "RandomNormal", "RandomUniform", "TruncatedNormal", "Zeros", "Ones", "Constant", "get"):
        assert hasattr(gv.initializers, name)
