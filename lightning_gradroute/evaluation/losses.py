"""Held-out losses of a model on retain and forget data, model-agnostic.

Everything takes ``loss_fn(model, batch) -> scalar tensor`` (the batch's mean loss), so the same code serves a
raw ``nn.Module`` (``lambda m, b: F.cross_entropy(m(b["x"]), b["y"])``), an HF model
(``lambda m, b: m(**b).loss``) or a LightningModule (``lambda m, b: m.compute_loss(b)``). Batches are any
iterable of whatever ``loss_fn`` accepts (a ``DataLoader``, a list of dicts or tensors); they are moved to the
model's device first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

__all__ = [
    "LossFn",
    "evaluation_mode",
    "mean_loss",
    "model_device",
    "next_token_loss",
    "next_token_losses",
    "retain_forget_loss",
]

#: ``loss_fn(model, batch) -> scalar tensor``: the mean loss of one batch.
LossFn = Callable[[nn.Module, Any], Tensor]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless model)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` and ``torch.no_grad()`` inside the block; the previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def mean_loss(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn) -> float:
    """The mean over ``batches`` of each batch's mean loss, in eval mode without gradients.

    This is the paper's metric (TinyStories ``eval_model``): the mean of per-batch token-averaged losses, not a
    global token average.

    Raises:
        ValueError: ``batches`` is empty, or a loss is not a finite scalar.
    """
    device = model_device(model)
    total, count = 0.0, 0
    with evaluation_mode(model):
        for batch in batches:
            loss = loss_fn(model, move_data_to_device(batch, device))
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"mean_loss: loss_fn must return a scalar tensor, got {loss!r}")
            value = float(loss)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"mean_loss: batch {count} has a non-finite loss {value}")
            total, count = total + value, count + 1
    if not count:
        raise ValueError("mean_loss: no batches to evaluate")
    return total / count


def retain_forget_loss(
    model: nn.Module, loss_fn: LossFn, retain: Iterable[Any], forget: Iterable[Any]
) -> dict[str, float]:
    """``{"retain": mean_loss(retain), "forget": mean_loss(forget)}`` on held-out data.

    Example::

        losses = retain_forget_loss(model, lambda m, b: m(**b).loss, retain_loader, forget_loader)
    """
    return {"retain": mean_loss(model, retain, loss_fn), "forget": mean_loss(model, forget, loss_fn)}


def next_token_losses(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per-token cross-entropy of a causal LM on ``batch``: ``(losses, valid)``, both ``(B, T - 1)``.

    Feeds ``input_ids[:, :-1]`` as ``model(input_ids=...)`` (an HF model's output ``.logits``, or a tensor of
    logits) and scores ``input_ids[:, 1:]``; a position is valid where both tokens are real
    (``batch["attention_mask"]``, all tokens when the batch has none).
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(f"next_token_losses: the batch must be a mapping with 'input_ids', got {type(batch).__name__}")
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    output = model(input_ids=ids[:, :-1])
    logits = output if isinstance(output, Tensor) else output.logits
    losses = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none").view_as(ids[:, 1:])
    return losses, (mask[:, :-1] * mask[:, 1:]).bool()


def next_token_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The mean next-token cross-entropy of a causal LM over the real tokens of ``batch``
    (:func:`next_token_losses`): the default ``loss_fn`` of
    :class:`~lightning_gradroute.evaluation.UnlearningEvaluation`.

    Example (a LightningModule holding its HF model as ``self.model``)::

        loss_fn = lambda module, batch: next_token_loss(module.model, batch)
    """
    losses, valid = next_token_losses(model, batch)
    return (losses * valid).sum() / valid.sum().clamp_min(1)
