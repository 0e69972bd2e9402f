"""The public surface: ``gv.__all__`` is sorted, complete, and holds the documented names.

The foundation modules (errors, devices, placement, config, initializers, registry,
variable) own the names listed here; other layers (checkpoint, distribute, ...) check
their own. Adding an export is a deliberate change to this list.
"""

from __future__ import annotations

import types

import gpuvars as gv
import gpuvars.errors

FOUNDATION_MODULES = {
    "gpuvars.config",
    "gpuvars.devices",
    "gpuvars.errors",
    "gpuvars.initializers",
    "gpuvars.placement",
    "gpuvars.registry",
    "gpuvars.variable",
}

#: the names the foundation exports at the top level (DESIGN "Public API" and "Errors")
FOUNDATION_EXPORTS = {
    "BackendError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "DevicePlacementError",
    "DeviceSpec",
    "GpuvarsError",
    "InvalidArgumentError",
    "Op",
    "PlacementWarning",
    "Registry",
    "ResourceExhaustedError",
    "TransferGuardError",
    "UninitializedVariableError",
    "Variable",
    "VariableAggregation",
    "VariableSynchronization",
    "config",
    "constant",
    "copy_to",
    "device",
    "global_variables",
    "global_variables_initializer",
    "initializers",
    "is_variable_initialized",
    "list_devices",
    "ones",
    "random_normal",
    "random_uniform",
    "replica_device_setter",
    "report_uninitialized_variables",
    "set_random_seed",
    "trainable_variables",
    "truncated_normal",
    "variables_initializer",
    "zeros",
}


def _home(obj: object) -> str | None:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    return getattr(obj, "__module__", None)


def test_all_is_sorted_and_unique() -> None:
    assert gv.__all__ == sorted(gv.__all__)
    assert len(gv.__all__) == len(set(gv.__all__))


def test_every_exported_name_exists() -> None:
    missing = [name for name in gv.__all__ if not hasattr(gv, name)]
    assert not missing


def test_every_public_attribute_is_exported() -> None:
    # submodules reached as attributes (gv.variable, gv.placement, ...) are not API
    public = {
        name
        for name in dir(gv)
        if not name.startswith("_") and not (isinstance(getattr(gv, name), types.ModuleType) and name not in gv.__all__)
    }
    assert public == set(gv.__all__)


def test_foundation_exports_exactly_the_documented_names() -> None:
    from_foundation = {name for name in gv.__all__ if _home(getattr(gv, name)) in FOUNDATION_MODULES}
    assert from_foundation == FOUNDATION_EXPORTS


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
    assert issubclass(gv.PlacementWarning, UserWarning)
    for name in gpuvars.errors.__all__:
        cls = getattr(gv, name)
        assert issubclass(cls, gv.GpuvarsError) or cls is gv.PlacementWarning


def test_submodule_all_lists_exist() -> None:
    for module_name in sorted(FOUNDATION_MODULES):
        module = __import__(module_name, fromlist=["__all__"])
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, f"{module_name}.__all__ names missing attributes: {missing}"
        assert module.__all__ == sorted(module.__all__), f"{module_name}.__all__ is not sorted"


def test_initializers_namespace_has_the_keras_classes() -> None:
    for name in ("GlorotUniform", "GlorotNormal", "HeNormal", "HeUniform", "LecunNormal", "VarianceScaling",
                 "RandomNormal", "RandomUniform", "TruncatedNormal", "Zeros", "Ones", "Constant", "get"):
        assert hasattr(gv.initializers, name)
