"""The DEMix baseline: one MLP expert per label in every layer, a hard expert choice per story.

Every matched MLP becomes a :class:`DEMixMLP` holding a retain expert and a forget expert of the same
architecture (independently initialised). During training each story goes through the forget expert when it
carries a forget label and through the retain expert otherwise (unlabelled forget stories too); attention and
embeddings are shared. "Ablate" keeps the retain expert of every layer (:func:`keep_retain_experts`), which
gives back the plain architecture.

    add_demix_experts(lm, "model.transformer.h.*.mlp", init_std=0.02)
    with demix_experts(lm, batch["route_labels"] == 1):
        logits = lm(batch["input_ids"])
    keep_retain_experts(lm)
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lightning_gradroute.targets import Target, resolve_modules

__all__ = ["DEMixMLP", "add_demix_experts", "demix_experts", "keep_retain_experts"]


class DEMixMLP(nn.Module):
    """Two experts with the same interface; :attr:`use_forget` ``(B,)`` picks one per sequence.

    Both experts run on every batch and :func:`torch.where` selects per sequence, so the autograd graph is the
    same on every rank and step (DDP with ``find_unused_parameters=False`` keeps working). With no choice set,
    the retain expert alone runs.
    """

    def __init__(self, retain: nn.Module, forget: nn.Module) -> None:
        super().__init__()
        self.retain = retain
        self.forget = forget
        self.use_forget: Tensor | None = None

    def forward(self, hidden: Tensor) -> Tensor:
        kept = self.retain(hidden)
        if self.use_forget is None:
            return kept
        choice = self.use_forget.to(hidden.device).view(-1, *([1] * (hidden.dim() - 1)))
        return torch.where(choice, self.forget(hidden), kept)


def _reinitialise(module: nn.Module, init_std: float) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=init_std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def add_demix_experts(model: nn.Module, modules: str, init_std: float) -> list[str]:
    """Replace every module matching ``modules`` (glob or ``re:``) with a :class:`DEMixMLP`.

    The retain expert is the existing module; the forget expert is a copy re-initialised with
    ``N(0, init_std)`` weights and zero biases. Returns the replaced module names.
    """
    if not init_std > 0:
        raise ValueError(f"add_demix_experts: init_std must be positive, got {init_std}")
    names = []
    for name, module in resolve_modules(model, Target(modules), "demix"):
        if isinstance(module, DEMixMLP):
            raise ValueError(f"add_demix_experts: {name!r} already holds DEMix experts")
        forget = copy.deepcopy(module)
        _reinitialise(forget, init_std)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, DEMixMLP(module, forget))
        names.append(name)
    return names


def _demix_modules(model: nn.Module) -> list[tuple[str, DEMixMLP]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DEMixMLP)]


@contextlib.contextmanager
def demix_experts(model: nn.Module, use_forget: Tensor) -> Iterator[None]:
    """Inside the block, sequences with ``use_forget`` ``(B,)`` True go through the forget experts."""
    if use_forget.dim() != 1:
        raise ValueError(
            f"demix_experts: expert choice must be one flag per sequence (B,), got {tuple(use_forget.shape)}"
        )
    mixes = _demix_modules(model)
    for _, mix in mixes:
        mix.use_forget = use_forget.bool()
    try:
        yield
    finally:
        for _, mix in mixes:
            mix.use_forget = None


def keep_retain_experts(model: nn.Module) -> int:
    """Ablate: replace every :class:`DEMixMLP` by its retain expert. Returns how many were replaced."""
    mixes = _demix_modules(model)
    for name, mix in mixes:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, mix.retain)
    return len(mixes)
