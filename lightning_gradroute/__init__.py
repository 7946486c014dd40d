"""lightning-gradroute: gradient routing as a drop-in for PyTorch Lightning.

Gradient routing (Cloud et al. 2024, arXiv 2410.04332) leaves the forward pass untouched and multiplies the
gradient flowing back through chosen activations by a data-dependent weight, so that chosen data only trains
chosen parts of the network.
"""

from lightning_gradroute.callback import GradientRoutingCallback
from lightning_gradroute.expansion import (
    Expansion,
    ExpansionRecord,
    contract,
    expand,
    expansion_record,
    save_ablated,
    zero_expanded,
)
from lightning_gradroute.grad import route_gradient, route_gradient_by_label
from lightning_gradroute.labels import (
    BatchKey,
    FrequencyWeightedLabels,
    LabelSource,
    TokenSetLabels,
    keyword_documents,
    partial_oversight,
    token_frequency_weights,
)
from lightning_gradroute.mixin import GradientRoutingMixin
from lightning_gradroute.router import GradientRouter
from lightning_gradroute.targets import Route, Target

__all__ = [
    "BatchKey",
    "Expansion",
    "ExpansionRecord",
    "FrequencyWeightedLabels",
    "GradientRouter",
    "GradientRoutingCallback",
    "GradientRoutingMixin",
    "LabelSource",
    "Route",
    "Target",
    "TokenSetLabels",
    "contract",
    "expand",
    "expansion_record",
    "keyword_documents",
    "partial_oversight",
    "route_gradient",
    "route_gradient_by_label",
    "save_ablated",
    "token_frequency_weights",
    "zero_expanded",
]
__version__ = "0.1.0"
