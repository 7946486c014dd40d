"""The RMU baseline (Li et al. 2024, "Representation Misdirection for Unlearning"), applied post hoc.

As in the paper's TinyStories baseline (``projects/tinystories/rmu.py``): on a trained model, only the MLP
output weights of layers ``0..layer`` train; the residual stream after block ``layer`` is pushed towards a random
control vector of norm ``steering_coef`` on forget stories (re-drawn every step) and held to a frozen copy of
the model on retain stories (weight ``alpha``). The paper's 8-layer, d_model-512 model used ``layer=4``,
``steering_coef=100``, ``alpha=200``, AdamW ``lr=5e-4``, 500 steps of 80 + 80 stories. Here ``layer`` defaults to
the same relative depth and ``steering_coef`` to the same per-coordinate size (``100 * sqrt(d_model / 512)``).

One deliberate difference: the squared errors are averaged over real tokens only (the paper's code averages
over padded positions too, so its effective coefficients depend on padding).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["RMU"]


class RMU:
    """Post-hoc RMU on a Hugging Face causal LM whose blocks are ``<base>.h.<i>`` with an ``mlp.<out>`` layer.

    Example::

        rmu = RMU(steps=100)
        log = rmu(hf_model, forget_batches, retain_batches)   # dict batches with input_ids, attention_mask

    Args:
        layer: the block whose output residual stream is steered; None means ``round(5 / 8 * num_layers) - 1``
            (block 4 of 8, the paper's).
        steps: optimiser steps, each on one forget and one retain batch (the iterables are cycled).
        steering_coef: norm of the random control vector; None means ``100 * sqrt(d_model / 512)``.
        alpha: weight of the retain (stay close to the frozen model) term.
        lr: AdamW learning rate (default betas and weight decay, as the paper).
        mlp_out: name of the MLP output layer inside each block's ``mlp`` (``c_proj`` for GPT-2 / GPT-Neo).
        seed: draws the control vectors.
    """

    def __init__(
        self,
        layer: int | None = None,
        steps: int = 500,
        steering_coef: float | None = None,
        alpha: float = 200.0,
        lr: float = 5e-4,
        mlp_out: str = "c_proj",
        seed: int = 0,
    ) -> None:
        if steps < 1 or alpha < 0 or lr <= 0 or (steering_coef is not None and steering_coef <= 0):
            raise ValueError(
                "RMU: need steps >= 1, alpha >= 0, lr > 0, steering_coef > 0; "
                f"got {steps}, {alpha}, {lr}, {steering_coef}"
            )
        if layer is not None and layer < 0:
            raise ValueError(f"RMU: layer must be >= 0, got {layer}")
        self.layer, self.steps, self.steering_coef = layer, steps, steering_coef
        self.alpha, self.lr, self.mlp_out, self.seed = alpha, lr, mlp_out, seed

    def _blocks(self, model: nn.Module) -> nn.ModuleList:
        blocks = getattr(model.base_model, "h", None)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"RMU: {type(model).__name__}.base_model has no block list `h` (GPT-2 / GPT-Neo layout)")
        return blocks

    def resolved(self, model: nn.Module) -> dict[str, Any]:
        """The layer and steering coefficient used on ``model`` (after defaults are scaled to it)."""
        num_layers = len(self._blocks(model))
        layer = self.layer if self.layer is not None else max(0, round(5 * num_layers / 8) - 1)
        if layer >= num_layers - 1:
            raise ValueError(f"RMU: layer {layer} must be below the last block ({num_layers - 1})")
        d_model = model.config.hidden_size
        coef = self.steering_coef if self.steering_coef is not None else 100 * math.sqrt(d_model / 512)
        return {"layer": layer, "steering_coef": coef, "alpha": self.alpha, "lr": self.lr, "steps": self.steps}

    @staticmethod
    def _residual(model: nn.Module, batch: dict[str, Tensor], layer: int) -> Tensor:
        # hidden_states[i] is the input of block i, so the output of block `layer` is hidden_states[layer + 1].
        return model.base_model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[layer + 1]

    @staticmethod
    def _masked_mse(x: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        per_token = (x - target).pow(2).mean(-1)
        weight = mask.to(per_token.dtype)
        return (per_token * weight).sum() / weight.sum().clamp_min(1)

    def __call__(
        self, model: nn.Module, forget_batches: Iterable[dict[str, Tensor]], retain_batches: Iterable[dict[str, Tensor]]
    ) -> dict[str, Any]:
        """Unlearn in place; returns the settings used and the last step's two losses."""
        settings = self.resolved(model)
        layer, coef = settings["layer"], settings["steering_coef"]
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        trainable = [
            p for block in self._blocks(model)[: layer + 1] for p in getattr(block.mlp, self.mlp_out).parameters()
        ]
        was_training = model.training
        requires = {p: p.requires_grad for p in model.parameters()}
        model.train().requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(trainable, lr=self.lr)
        generator = torch.Generator().manual_seed(self.seed)
        forget_losses, retain_losses = [], []
        try:
            for forget, retain in itertools.islice(
                zip(itertools.cycle(forget_batches), itertools.cycle(retain_batches)), self.steps
            ):
                control = torch.rand(model.config.hidden_size, generator=generator)
                control = (control / control.norm() * coef).to(next(model.parameters()).device)
                forget_loss = self._masked_mse(self._residual(model, forget, layer), control, forget["attention_mask"])
                with torch.no_grad():
                    reference = self._residual(frozen, retain, layer)
                retain_loss = self._masked_mse(
                    self._residual(model, retain, layer), reference, retain["attention_mask"]
                )
                optimizer.zero_grad(set_to_none=True)
                (forget_loss + self.alpha * retain_loss).backward()
                optimizer.step()
                forget_losses.append(forget_loss.item())
                retain_losses.append(retain_loss.item())
        finally:
            for p, flag in requires.items():
                p.requires_grad_(flag)
            model.train(was_training)
        return {**settings, "final_forget_mse": forget_losses[-1], "final_retain_mse": retain_losses[-1]}
