"""The paper's split ResNet (Cloud et al. 2024, §4.1 CIFAR-100): an encoding whose channel blocks learn class groups.

The model itself routes nothing. The routing is a :class:`~lightning_gradroute.GradientRoutingCallback` on the
encoding where it enters the main head (channels are dim 1 of a conv activation)::

    targets={"encoding": Target("decoder.resize", site="input", feature_dim=1)}
    routes=[Route("classes_0_49", "encoding", {"256:512": 0.0}),    # classes 0-49 train channels 0:256 only
            Route("classes_50_99", "encoding", {"0:256": 0.0})]     # classes 50-99 train channels 256:512 only

The L1 penalty and the certificates read the encoding *before* that point, so they are not routed: exactly where
the paper's detach trick sits. The certificates read their channels detached, so they never shape the encoder.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric
from typing_extensions import override

from gradroute_experiments.cifar.resnet import classifier, residual_blocks, stem
from gradroute_experiments.stages import StepByStage
from lightning_gradroute.mixin import GradientRoutingMixin
from lightning_gradroute.targets import unit_indices

__all__ = ["CIFARSplitResNet", "SplitLogits"]


@dataclass
class SplitLogits:
    """What one forward pass produces: the encoding, the main head's logits and each certificate's logits."""

    encoding: Tensor
    logits: Tensor
    certificates: list[Tensor]


def _head(in_channels: int, width: int, tail: nn.Module) -> nn.Sequential:
    """A 1x1 "resize" conv (``in_channels`` -> ``width``, no bias) followed by a copy of ``tail``."""
    return nn.Sequential(OrderedDict(resize=nn.Conv2d(in_channels, width, 1, bias=False), tail=copy.deepcopy(tail)))


class CIFARSplitResNet(GradientRoutingMixin, StepByStage):
    """ResNet cut after block ``split_at`` into an encoder and heads; certificates read channel blocks of the cut.

    Architecture (the reference code's ``RoutedResNet``): the encoder is the stem, the first ``split_at`` residual
    blocks and an extra 1x1 conv (``width`` -> ``width``, no bias) whose output is *the encoding*. The main head
    (``decoder``) and each certificate are a 1x1 "resize" conv to ``width`` channels followed by a copy of the
    same tail (the remaining blocks, pooling, linear), so all heads start with identical tail weights.
    Certificate ``g`` reads ``certificate_channels[g]`` of the encoding, detached.

    Objective per batch, with ``g`` the routing group of each image (``batch["route_labels"]``) and CE the
    cross-entropy of the class (the reference code's ``get_losses``)::

        loss_scale * ( sum_g group_weights[g] * mean_{images of g} CE(decoder)
                       + certificate_weight * sum_c mean CE(certificate c)
                       + l1_weight * mean_{batch, H, W} sum_channels |encoding| )

    The paper (ResNet-34, ``split_at=15``, two groups of 50 classes): ``group_weights=(1, 1)``,
    ``certificate_weight=1``, ``l1_weight=3e-2``, ``loss_scale=0.25`` ("four output modules"), SGD lr 0.1,
    momentum 0.9, weight decay 5e-4 on all parameters, cosine annealing over the epochs stepped once per epoch.

    Example::

        model = CIFARSplitResNet(num_classes=10, widths=(16, 32, 64, 128), blocks=(1, 1, 1, 2), split_at=4,
                                 group_names=("classes_0_4", "classes_5_9"), certificate_channels=("0:64", "64:128"))
        out = model(images)          # images (B, 3, 32, 32)
        out.certificates[1]          # logits from encoding channels 64:128 alone

    Args:
        num_classes: classes of the main head and of every certificate.
        widths: channels of each ResNet stage (ResNet-34: ``(64, 128, 256, 512)``).
        blocks: residual blocks per stage (ResNet-34: ``(3, 4, 6, 3)``).
        split_at: how many residual blocks the encoder holds; the rest form the heads' tail (at least one).
        group_names: the routing groups, in the order of their labels; also this module's ``routing_labels``
            (so a routing callback's ``labels`` must name them in the same order).
        group_weights: weight of each group's mean main-head CE.
        certificate_channels: for each group, the encoding channels its certificate reads (``"0:256"``, a list
            of ints, ...); the blocks must be disjoint. Which group's data trains which channels is the routing
            callback's business; the evaluation calls group ``g`` certificate ``g``'s own group.
        certificate_weight: weight of each certificate's CE (certificates never train the encoder).
        l1_weight: weight of the L1 penalty on the encoding (all channels).
        loss_scale: factor on the whole objective.
        lr: SGD learning rate (peak of the cosine schedule).
        momentum: SGD momentum.
        weight_decay: SGD weight decay (on every parameter, as the paper).
        lr_interval: step the cosine schedule once per ``"epoch"`` (the paper; ``T_max`` = max_epochs) or per
            ``"step"`` (``T_max`` = total optimizer steps; smoother for runs of few epochs).
    """

    def __init__(
        self,
        num_classes: int = 100,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (3, 4, 6, 3),
        split_at: int = 15,
        group_names: Sequence[str] = ("classes_0_49", "classes_50_99"),
        group_weights: Sequence[float] = (1.0, 1.0),
        certificate_channels: Sequence[str | Sequence[int]] = ("0:256", "256:512"),
        certificate_weight: float = 1.0,
        l1_weight: float = 3e-2,
        loss_scale: float = 0.25,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_interval: Literal["epoch", "step"] = "epoch",
    ) -> None:
        self.routing_labels = tuple(group_names)  # read by GradientRoutingMixin.__init__
        super().__init__()
        layers = residual_blocks(widths, blocks)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"CIFARSplitResNet: num_classes must be an int >= 2, got {num_classes!r}")
        if isinstance(split_at, bool) or not isinstance(split_at, int) or not 1 <= split_at < len(layers):
            raise ValueError(
                f"CIFARSplitResNet: split_at must be an int in [1, {len(layers) - 1}] for {len(layers)} residual "
                f"blocks (the tail needs at least one), got {split_at!r}"
            )
        groups = len(self.routing_labels)
        if groups < 2 or len(set(self.routing_labels)) != groups:
            raise ValueError(f"CIFARSplitResNet: group_names must be >= 2 distinct names, got {list(group_names)}")
        for name, values in (("group_weights", group_weights), ("certificate_channels", certificate_channels)):
            if len(values) != groups:
                raise ValueError(
                    f"CIFARSplitResNet: {name} needs one entry per group {list(group_names)}, got {values!r}"
                )
        if any(w < 0 for w in group_weights):
            raise ValueError(f"CIFARSplitResNet: group_weights must be >= 0, got {list(group_weights)}")
        for name, value in (("certificate_weight", certificate_weight), ("l1_weight", l1_weight)):
            if value < 0:
                raise ValueError(f"CIFARSplitResNet: {name} must be >= 0, got {value}")
        if loss_scale <= 0 or lr <= 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                "CIFARSplitResNet: need loss_scale > 0, lr > 0, momentum >= 0, weight_decay >= 0, got "
                f"{loss_scale}, {lr}, {momentum}, {weight_decay}"
            )
        if lr_interval not in ("epoch", "step"):
            raise ValueError(f"CIFARSplitResNet: lr_interval must be 'epoch' or 'step', got {lr_interval!r}")
        width = layers[split_at].conv1.in_channels
        channels = [
            unit_indices(units, width, where="CIFARSplitResNet certificate_channels") for units in certificate_channels
        ]
        flat = [c for block in channels for c in block]
        if len(set(flat)) != len(flat):
            raise ValueError(f"CIFARSplitResNet: certificate_channels {list(certificate_channels)} overlap")
        self.save_hyperparameters()
        self.encoder = nn.Sequential(
            OrderedDict(
                stem=stem(widths[0]),
                blocks=nn.Sequential(*layers[:split_at]),
                code=nn.Conv2d(width, width, 1, bias=False),
            )
        )
        tail = nn.Sequential(
            OrderedDict(blocks=nn.Sequential(*layers[split_at:]), classifier=classifier(widths[-1], num_classes))
        )
        self.decoder = _head(width, width, tail)
        self.certificates = nn.ModuleList(_head(len(block), width, tail) for block in channels)
        for g, block in enumerate(channels):
            self.register_buffer(f"channels_{g}", torch.tensor(block), persistent=False)
        self.register_buffer("group_weights", torch.tensor(group_weights, dtype=torch.float32), persistent=False)
        # Validation / test accuracy of every output on each group's images, "<stage>_<output>_<group>".
        self.group_accuracy = nn.ModuleDict(
            {
                f"{stage}_{output}_{g}": MeanMetric()
                for stage in ("val", "test")
                for output in ("decoder", *(f"certificate_{c}" for c in range(groups)))
                for g in range(groups)
            }
        )

    @override
    def setup(self, stage: str) -> None:
        """Check the datamodule's classes and class groups against this model, before any step."""
        datamodule = self.trainer.datamodule
        num_classes = getattr(datamodule, "num_classes", None)
        if num_classes is not None and num_classes != self.hparams.num_classes:
            raise ValueError(
                f"CIFARSplitResNet: num_classes={self.hparams.num_classes} but the datamodule has {num_classes} classes"
            )
        class_groups = getattr(datamodule, "class_groups", None)
        if class_groups is not None and len(class_groups) != len(self.routing_labels):
            raise ValueError(
                f"CIFARSplitResNet: group_names {list(self.routing_labels)} name {len(self.routing_labels)} groups but "
                f"the datamodule's class_groups has {len(class_groups)}"
            )

    def certificate_indices(self) -> list[Tensor]:
        """The encoding channels each certificate reads."""
        return [getattr(self, f"channels_{g}") for g in range(len(self.certificates))]

    @override
    def forward(self, images: Tensor) -> SplitLogits:
        """Classify ``images`` ``(B, 3, 32, 32)`` with the main head and every certificate."""
        encoding = self.encoder(images)
        detached = encoding.detach()  # certificates read the encoding but never train the encoder
        certificates = [
            head(detached.index_select(1, block)) for head, block in zip(self.certificates, self.certificate_indices())
        ]
        return SplitLogits(encoding, self.decoder(encoding), certificates)

    def compute_losses(self, out: SplitLogits, classes: Tensor, groups: Tensor) -> dict[str, Tensor]:
        """The objective (``"loss"``) and its terms; ``"item_ce"`` is each image's main-head cross-entropy."""
        item_ce = F.cross_entropy(out.logits, classes, reduction="none")
        # The paper averages each group's loss over that group's images, then weights the groups.
        num_groups = len(self.routing_labels)
        counts = torch.bincount(groups, minlength=num_groups).to(item_ce.dtype).clamp_min(1)
        group_sums = torch.zeros(num_groups, dtype=item_ce.dtype, device=item_ce.device).index_add(0, groups, item_ce)
        certificate_ce = [F.cross_entropy(logits, classes) for logits in out.certificates]
        l1 = out.encoding.abs().sum(1).mean()
        terms = {f"certificate_{g}_ce": ce for g, ce in enumerate(certificate_ce)}
        loss = (
            (self.group_weights * group_sums / counts).sum()
            + self.hparams.certificate_weight * sum(certificate_ce)
            + self.hparams.l1_weight * l1
        )
        return {"loss": self.hparams.loss_scale * loss, "item_ce": item_ce, "encoding_l1": l1, **terms}

    @override
    def step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        out = self(batch["image"])
        terms = self.compute_losses(out, batch["label"], batch["route_labels"])
        # Logs {stage}/loss_<group name>: the mean main-head CE of each group.
        main_ce = self.routed_loss(terms.pop("item_ce").detach(), batch["route_labels"], stage=stage)
        metrics = {f"{stage}/{name}": value for name, value in terms.items()}
        metrics[f"{stage}/main_ce"] = main_ce
        if stage != "train":
            outputs = {"decoder": out.logits, **{f"certificate_{c}": x for c, x in enumerate(out.certificates)}}
            for name, logits in outputs.items():
                correct = (logits.argmax(1) == batch["label"]).float()
                for g, group in enumerate(self.routing_labels):
                    rows = batch["route_labels"] == g
                    accuracy = self.group_accuracy[f"{stage}_{name}_{g}"]
                    accuracy.update(correct[rows])  # a group absent from the batch adds nothing
                    self.log(f"{stage}/{name}_accuracy_{group}", accuracy, on_step=False, on_epoch=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=len(batch["image"]))
        return terms["loss"]

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if hp.lr_interval == "epoch":
            if not self.trainer.max_epochs or self.trainer.max_epochs < 1:
                raise ValueError(
                    "CIFARSplitResNet: lr_interval='epoch' needs Trainer(max_epochs=...) for the cosine T_max"
                )
            total = self.trainer.max_epochs
        else:
            total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": hp.lr_interval}}
