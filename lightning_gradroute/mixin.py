"""A LightningModule mixin: split per-item losses by routing label, log them, normalise them DDP-correctly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from lightning_gradroute.era import restore_checkpoint, write_checkpoint
from lightning_gradroute.expansion import Expansion, expand
from lightning_gradroute.labels import check_labels, label_membership

__all__ = ["GradientRoutingMixin"]

_STAGES = ("train", "val", "test")


class GradientRoutingMixin:
    r"""Mix into a ``LightningModule`` to get per-label losses (``train/loss_retain``, ``train/loss_forget``...).

    Put it *before* ``LightningModule`` in the bases and call ``super().__init__()``. In a step, compute
    unreduced per-example or per-token losses and hand them to :meth:`routed_loss` with the routing labels;
    it returns the scalar to optimise and logs the mean loss of each label, weighted by how many items carry
    it (soft labels count fractionally). A batch, or a whole rank, with no item of a label adds nothing to
    that label's mean (no NaN); the epoch value is synchronised over ranks by torchmetrics.

    Example::

        class LM(GradientRoutingMixin, pl.LightningModule):
            routing_labels = ("retain", "forget")
            loss_normalization = "global"          # DDP equals one process on the global batch

            def training_step(self, batch, batch_idx):
                logits = self.model(batch["input_ids"][:, :-1])
                losses = F.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
                return self.routed_loss(losses, batch["route_labels"], valid=batch["attention_mask"][:, 1:])

    Expanded checkpoints: :meth:`on_load_checkpoint` brings the module to the shapes recorded in the checkpoint's
    ERA state (:func:`~lightning_gradroute.era.read_checkpoint`) before the weights load: Lightning calls it
    between ``configure_model`` and ``load_state_dict``, in ``Trainer.fit(ckpt_path=...)`` and in
    ``MyModule.load_from_checkpoint(path)``. So a checkpoint taken mid-ERA loads into new units, and one taken
    after contraction into the original architecture. A module may also set ``self.expansions`` (e.g. from an
    ``__init__`` argument kept in ``hparams``): :meth:`configure_model` then expands it (a module that overrides
    ``configure_model`` calls ``super().configure_model()`` after building its layers).

    Class attributes:
        expansions: :class:`~lightning_gradroute.Expansion` s applied in :meth:`configure_model`.
        routing_labels: label names; integer labels index them, float labels interpolate the first two.
        loss_normalization: ``"local"`` divides by this rank's item count (DDP then averages per-rank means,
            which differs from the global mean when counts differ); ``"global"`` divides by the all-reduced
            count / world size, so the DDP gradient equals one process's on the union batch.
    """

    routing_labels: ClassVar[Sequence[str]] = ("retain", "forget")
    expansions: Sequence[Expansion] = ()
    loss_normalization: Literal["local", "global"] = "local"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.routing_metrics = nn.ModuleDict(
            {f"{stage}_{label}": MeanMetric() for stage in _STAGES for label in self.routing_labels}
        )

    def configure_model(self) -> None:
        super().configure_model()  # type: ignore[misc]
        if self.expansions:
            expand(self, self.expansions)  # type: ignore[arg-type]  # idempotent

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        write_checkpoint(checkpoint, self)  # type: ignore[arg-type]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        restore_checkpoint(checkpoint, self, type(self).__name__)  # type: ignore[arg-type]

    def routed_loss(
        self, item_losses: Tensor, labels: Tensor, valid: Tensor | None = None, stage: str | None = None
    ) -> Tensor:
        """Return the mean loss over valid items and log each label's mean loss for ``stage``.

        Args:
            item_losses: unreduced losses, ``(B,)`` or ``(B, T)``.
            labels: routing labels, the same shape as ``item_losses`` or ``(B,)`` for per-token losses.
            valid: optional mask of items that count (e.g. non-padding tokens), the shape of ``item_losses``.
            stage: ``"train"``, ``"val"`` or ``"test"``; default from the trainer's state.
        """
        if self.loss_normalization not in ("local", "global"):
            raise ValueError(f"loss_normalization must be 'local' or 'global', got {self.loss_normalization!r}")
        labels = check_labels(labels, self.routing_labels)
        if labels.shape != item_losses.shape:
            if labels.dim() == 1 and item_losses.dim() == 2 and labels.shape[0] == item_losses.shape[0]:
                labels = labels[:, None].expand_as(item_losses)
            else:
                raise ValueError(
                    f"routed_loss: labels of shape {tuple(labels.shape)} do not fit losses of shape "
                    f"{tuple(item_losses.shape)}"
                )
        weight = torch.ones_like(item_losses) if valid is None else valid.to(item_losses.dtype)
        if weight.shape != item_losses.shape:
            raise ValueError(
                f"routed_loss: valid of shape {tuple(weight.shape)} does not fit {tuple(item_losses.shape)}"
            )
        stage = stage or self._routing_stage()
        self._log_label_losses(item_losses.detach(), labels, weight, stage)
        count = weight.sum()
        if self.loss_normalization == "global" and stage == "train":
            strategy = self.trainer.strategy  # type: ignore[attr-defined]
            count = strategy.reduce(count.detach(), reduce_op="sum") / strategy.world_size
        return (item_losses * weight).sum() / count.clamp_min(1e-12)

    def _log_label_losses(self, losses: Tensor, labels: Tensor, weight: Tensor, stage: str) -> None:
        membership = label_membership(labels, len(self.routing_labels)).to(losses.dtype) * weight.unsqueeze(-1)
        for i, label in enumerate(self.routing_labels):
            metric = self.routing_metrics[f"{stage}_{label}"]
            metric.update(losses.flatten(), membership[..., i].flatten())
            self.log(f"{stage}/loss_{label}", metric, on_step=False, on_epoch=True)  # type: ignore[attr-defined]

    def _routing_stage(self) -> str:
        trainer = self.trainer  # type: ignore[attr-defined]
        if trainer.training:
            return "train"
        return "test" if trainer.testing else "val"
