"""The public API is what ``__all__`` says: the top level holds the library's own concepts, every module's
``__all__`` lists names that exist, and every public class or function a module defines is in it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import lightning_gradroute

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(lightning_gradroute.__path__, "lightning_gradroute.") if not m.ispkg
)


def test_the_top_level_is_the_librarys_own_concepts() -> None:
    assert set(lightning_gradroute.__all__) == {
        "BatchKey", "Expansion", "ExpansionRecord", "ForwardMask", "GradientRouter", "GradientRoutingCallback",
        "GradientRoutingMixin", "LabelSource", "ParameterTarget", "Phase", "Route", "RoutedAdamW", "RoutedSGD", "SaveFinalModel",
        "Target", "ablate_state_dict", "contract", "era_state", "expand", "expansion_record", "route_gradient",
        "route_gradient_by_label", "save_ablated", "zero_expanded",
    }  # fmt: skip
    assert all(hasattr(lightning_gradroute, name) for name in lightning_gradroute.__all__)


@pytest.mark.parametrize("name", MODULES)
def test_module_all_is_honest(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    defined = {
        n for n, obj in vars(module).items()
        if not n.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == name
    }
    unlisted = sorted(defined - set(exported))
    assert not missing and not unlisted, f"{name}: __all__ lists missing {missing}, omits {unlisted}"
