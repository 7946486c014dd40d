"""Ablate MLP neurons of an existing model: zero every weight that computes them and every weight that reads them.

The paper's virology model routes its concept tokens to neurons 0–79 of the MLPs of blocks 0–7 and then removes
those neurons. Its reference evaluation (``projects/nanoGPT-factrep/coherence_ft_and_retrain_evals.py`` in
``kxcloud/gradient-routing``) got the removal wrong twice: it rebuilt the range with ``max(dims)`` as an
*exclusive* bound (neuron 79 stayed), and zeroed only column 0 of the input weight rows, so the neurons kept
computing and regrew. :func:`ablate_neurons` zeroes, for each selected neuron, its row in every layer that computes
it (weight and bias) and its column in every layer that reads it, so its activation is exactly 0 for every input
(``gelu(0) = silu(0) = 0``) and every gradient that could revive it is exactly 0 too: fine-tuning afterwards (AdamW
included) leaves the ablated weights at 0.

Units are written as in routes (:func:`~lightning_gradroute.targets.unit_indices`): ``"0:80"`` is neurons 0 to
79, **80 neurons**, the same slice a ``Route`` uses for them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_gradroute.targets import Target, Units, resolve_modules, unit_indices

__all__ = ["MLP_LAYERS", "ablate_neurons", "ablated_weight_norm"]

#: Per MLP architecture: the layers that compute the hidden neurons (rows) and those that read them (columns).
MLP_LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "gpt2_mlp": (("c_fc",), ("c_proj",)),
    "gpt_neo_mlp": (("c_fc",), ("c_proj",)),
    "llama_mlp": (("gate_proj", "up_proj"), ("down_proj",)),
    "qwen2_mlp": (("gate_proj", "up_proj"), ("down_proj",)),
}


def _neuron_slices(layer: nn.Module, computes: bool, neurons: list[int]) -> list[tuple[torch.Tensor, Any]]:
    """``(parameter, index)`` pairs holding the given neurons' weights in ``layer`` (``nn.Linear`` or HF Conv1D)."""
    weight = layer.weight
    conv1d = type(layer).__name__ == "Conv1D"  # HF GPT-2: weight (in, out)
    if not isinstance(layer, nn.Linear) and not conv1d:
        raise ValueError(f"ablate_neurons: {type(layer).__name__} is not an nn.Linear or HF Conv1D")
    if computes:
        slices: list[tuple[torch.Tensor, Any]] = [(weight, (slice(None), neurons) if conv1d else (neurons,))]
        if layer.bias is not None:
            slices.append((layer.bias, (neurons,)))
        return slices
    return [(weight, (neurons,) if conv1d else (slice(None), neurons))]


def _neuron_weights(
    model: nn.Module, modules: str, neurons: Units, preset: str
) -> tuple[list[tuple[torch.Tensor, Any]], int]:
    """The ``(parameter, index)`` pairs of every selected neuron's weights, and the number of neurons."""
    if preset not in MLP_LAYERS:
        raise ValueError(f"ablate_neurons: unknown preset {preset!r}; presets are {sorted(MLP_LAYERS)}")
    computing, reading = MLP_LAYERS[preset]
    slices, count = [], 0
    for name, module in resolve_modules(model, Target(modules), "ablate_neurons"):
        layers = {}
        for child in computing + reading:
            try:
                layers[child] = module.get_submodule(child)
            except AttributeError:
                raise ValueError(f"ablate_neurons: {name!r} has no {child!r}; is it a {preset} module?") from None
        size = layers[reading[0]].weight.shape[0 if type(layers[reading[0]]).__name__ == "Conv1D" else 1]
        where = f"ablate_neurons at {name!r} ({size} neurons)"
        indices = unit_indices(neurons, size, where=where)
        count += len(indices)
        for child, layer in layers.items():
            slices += _neuron_slices(layer, child in computing, indices)
    return slices, count


@torch.no_grad()
def ablate_neurons(model: nn.Module, modules: str, neurons: Units, preset: str) -> int:
    """Zero the ``neurons`` of every MLP that ``modules`` matches; return how many neurons were ablated in all.

    Example (the paper's virology ablation on an HF Qwen2 held as ``self.model``)::

        ablate_neurons(lm, "model.model.layers.[0-7].mlp", "0:80", preset="qwen2_mlp")   # neurons 0..79

    Args:
        model: the model, changed in place.
        modules: a glob (or ``re:`` regex) over ``model.named_modules()`` matching the MLP modules.
        neurons: the hidden units, as in a route: ``"0:80"``, ``[0, 5]``, ``"-16:"``...
        preset: the MLP architecture, a key of :data:`MLP_LAYERS`.

    Raises:
        ValueError: a pattern matching nothing, a module that is not such an MLP, units out of range.
    """
    slices, count = _neuron_weights(model, modules, neurons, preset)
    for parameter, index in slices:
        parameter[index] = 0
    return count


@torch.no_grad()
def ablated_weight_norm(model: nn.Module, modules: str, neurons: Units, preset: str) -> float:
    """The largest absolute value among the weights :func:`ablate_neurons` zeroes (0 while they stay ablated)."""
    slices, _ = _neuron_weights(model, modules, neurons, preset)
    return max(float(parameter[index].abs().max()) for parameter, index in slices)
