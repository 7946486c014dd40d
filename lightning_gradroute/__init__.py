"""lightning-gradroute: gradient routing as a drop-in for PyTorch Lightning.

Gradient routing (Cloud et al. 2024, arXiv 2410.04332) leaves the forward pass untouched and multiplies the
gradient flowing back through chosen activations by a data-dependent weight, so that chosen data only trains
chosen parts of the network.

The top level holds the library's own concepts: where and what to route (:class:`Target` for activations,
:class:`ParameterTarget` for parameters, :class:`Route`), forward masks (:class:`ForwardMask`, SGTM's retain
mode), the Lightning callback and mixin, the framework-free router and primitive, the optimizers that keep routed
parameters' state clean, label sources, the Expand-Route-Ablate lifecycle and :class:`SaveFinalModel`, which keeps
a fit's final model. Text label builders are in :mod:`lightning_gradroute.text_labels`, evaluation in
:mod:`lightning_gradroute.evaluation`, the steering hook that reads a routed dimension back (any model) in
:mod:`lightning_gradroute.steering`, the paper's experiments in :mod:`gradroute_experiments`.
"""

from lightning_gradroute.callback import GradientRoutingCallback
from lightning_gradroute.era import (
    ExpansionRecord,
    Phase,
    ablate_state_dict,
    contract,
    era_state,
    expansion_record,
    save_ablated,
    zero_expanded,
)
from lightning_gradroute.expansion import Expansion, expand
from lightning_gradroute.export import SaveFinalModel
from lightning_gradroute.grad import route_gradient, route_gradient_by_label
from lightning_gradroute.labels import BatchKey, LabelSource
from lightning_gradroute.mixin import GradientRoutingMixin
from lightning_gradroute.optim import RoutedAdamW, RoutedSGD
from lightning_gradroute.router import GradientRouter
from lightning_gradroute.targets import ForwardMask, ParameterTarget, Route, Target

__all__ = [
    "BatchKey",
    "Expansion",
    "ExpansionRecord",
    "ForwardMask",
    "GradientRouter",
    "GradientRoutingCallback",
    "GradientRoutingMixin",
    "LabelSource",
    "ParameterTarget",
    "Phase",
    "Route",
    "RoutedAdamW",
    "RoutedSGD",
    "SaveFinalModel",
    "Target",
    "ablate_state_dict",
    "contract",
    "era_state",
    "expand",
    "expansion_record",
    "route_gradient",
    "route_gradient_by_label",
    "save_ablated",
    "zero_expanded",
]
__version__ = "0.2.0"
