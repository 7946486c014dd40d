"""The paper's split autoencoder (Cloud et al. 2024, §4.1): a 32-d code whose halves learn different digits.

The model itself routes nothing. The routing is a :class:`~lightning_gradroute.GradientRoutingCallback` on the
code where it enters the decoder(s)::

    targets={"code": Target("decoders.*.0", site="input")}          # the 32-d code, as the decoders read it
    routes=[Route("digits_0_4", "code", {"0:16": 0.0}),             # digits 0-4 train the encoder via dims 16:32
            Route("digits_5_9", "code", {"16:32": 0.0})]            # digits 5-9 via dims 0:16

The L1 penalties, the correlation penalty and the certificates read the code *before* that point, so they are
not routed: exactly where the paper's ``split_encoding`` detach trick sits.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from gradroute_experiments.stages import StepByStage
from lightning_gradroute.mixin import GradientRoutingMixin

__all__ = ["MNISTSplitAutoencoder", "SplitOutputs", "correlation_penalty", "mlp"]

IMAGE_SIZE = 28 * 28


def mlp(sizes: Sequence[int], last_bias: bool = True) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        last = i == len(sizes) - 2
        layers.append(nn.Linear(fan_in, fan_out, bias=last_bias or not last))
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def correlation_penalty(code: Tensor) -> Tensor:
    """Mean absolute cross-correlation, over the batch, between the dims of the code's two halves.

    Each dim is standardised over the batch with the unbiased std (``Tensor.std``'s default, as the reference
    code's ``normalize``; a tiny floor keeps dead dims from dividing by zero, where the paper adds an epsilon
    of 0), then ``mean(|A^T B| / N)`` for halves ``A`` and ``B``.
    """
    standard = (code - code.mean(0)) / code.std(0, correction=1).clamp_min(1e-12)
    first, second = standard.chunk(2, dim=1)
    return (first.T @ second / code.shape[0]).abs().mean()


@dataclass
class SplitOutputs:
    """What one forward pass produces: the code, the main reconstruction and each certificate's."""

    code: Tensor
    reconstruction: Tensor
    certificates: list[Tensor]


class MNISTSplitAutoencoder(GradientRoutingMixin, StepByStage):
    """MLP autoencoder with a 32-d code, a main decoder and two certificate decoders (one per code half).

    Architecture (paper defaults): encoder 784 -> 2048 -> 512 -> 32 (ReLU between layers, no bias on the
    last); main decoder 32 -> 512 -> 2048 -> 784; certificate ``h`` reads the *detached* half ``h`` of the code
    (16 dims) through 16 -> 512 -> 2048 -> 784, so certificates learn to decode a half without shaping it.

    Objective per batch, with ``g`` the routing label (0: digits 0-4, 1: digits 5-9) and MAE per image::

        sum_g reconstruction_weights[g] * mean_{images of g} MAE(decoder)
        + certificate_weight * sum_h mean MAE(certificate h)
        + sum_h l1_weights[h] * sum_{dims of half h} mean_batch |code|
        + correlation_weight * correlation_penalty(code)

    How the paper's loss names map (README of ``recipes/mnist`` has the full table): "Good Decoder" and
    "Bad Decoder" are the reconstruction weights of the groups routed to half 0 and half 1; "Good Decoder
    (bad data)" with a shared decoder adds to the bad group's weight, and its routes then split that group's
    gradient between the halves in proportion (e.g. 0.5 / 0.5 for weights 1 and 1), which is exact.

    With ``separate_decoders`` each group has its own decoder (group ``g`` is reconstructed by decoder ``g``),
    as in the paper's "separate Decoders" settings; the routing target ``decoders.*.0`` covers both.

    Example::

        model = MNISTSplitAutoencoder(hidden_sizes=(2048, 512), l1_weights=(3e-3, 3e-3))
        out = model(batch["image"], batch["route_labels"])
        out.certificates[0]     # reconstruction from code dims 0:16 alone

    Args:
        hidden_sizes: encoder hidden widths; decoders use them reversed.
        code_size: width of the code (even; half ``h`` is ``h*code_size/2 : (h+1)*code_size/2``).
        separate_decoders: one decoder per routing group instead of a shared one.
        reconstruction_weights: weight of each group's mean reconstruction MAE, ``[digits 0-4, digits 5-9]``.
        certificate_weight: weight of each certificate's MAE (certificates never train the encoder).
        l1_weights: L1 penalty weight on each code half, ``[dims 0:16, dims 16:32]``.
        correlation_weight: weight of :func:`correlation_penalty`.
        lr: Adam learning rate.
        weight_decay: Adam's (coupled, L2) weight decay, as ``torch.optim.Adam`` applies it.
    """

    routing_labels = ("digits_0_4", "digits_5_9")

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (2048, 512),
        code_size: int = 32,
        separate_decoders: bool = False,
        reconstruction_weights: Sequence[float] = (1.0, 1.0),
        certificate_weight: float = 1.0,
        l1_weights: Sequence[float] = (3e-3, 3e-3),
        correlation_weight: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 5e-5,
    ) -> None:
        super().__init__()
        if not hidden_sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in hidden_sizes):
            raise ValueError(f"MNISTSplitAutoencoder: hidden_sizes must be positive ints, got {hidden_sizes!r}")
        if isinstance(code_size, bool) or not isinstance(code_size, int) or code_size < 2 or code_size % 2:
            raise ValueError(f"MNISTSplitAutoencoder: code_size must be an even int >= 2, got {code_size!r}")
        for name, pair in (("reconstruction_weights", reconstruction_weights), ("l1_weights", l1_weights)):
            if len(pair) != 2 or any(w < 0 for w in pair):
                raise ValueError(f"MNISTSplitAutoencoder: {name} must be two non-negative numbers, got {pair!r}")
        for name, value in (("certificate_weight", certificate_weight), ("correlation_weight", correlation_weight)):
            if value < 0:
                raise ValueError(f"MNISTSplitAutoencoder: {name} must be >= 0, got {value}")
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"MNISTSplitAutoencoder: need lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
        self.save_hyperparameters()
        hidden = list(hidden_sizes)
        self.encoder = mlp([IMAGE_SIZE, *hidden, code_size], last_bias=False)
        self.decoders = nn.ModuleList(
            mlp([code_size, *reversed(hidden), IMAGE_SIZE]) for _ in range(2 if separate_decoders else 1)
        )
        self.certificates = nn.ModuleList(mlp([code_size // 2, *reversed(hidden), IMAGE_SIZE]) for _ in range(2))
        self.register_buffer(
            "reconstruction_weights", torch.tensor(reconstruction_weights, dtype=torch.float32), persistent=False
        )

    @override
    def forward(self, images: Tensor, groups: Tensor | None = None) -> SplitOutputs:
        """Encode ``images`` ``(B, 784)``; ``groups`` (routing labels) pick the decoder when there are two."""
        code = self.encoder(images)
        decoded = [decoder(code) for decoder in self.decoders]
        reconstruction = decoded[0]
        if len(decoded) == 2:
            if groups is None:
                raise ValueError("MNISTSplitAutoencoder: with separate_decoders, forward needs the groups")
            reconstruction = torch.where(groups.unsqueeze(1).bool(), decoded[1], decoded[0])
        halves = code.detach().chunk(2, dim=1)  # certificates read the code but never train the encoder
        return SplitOutputs(code, reconstruction, [cert(half) for cert, half in zip(self.certificates, halves)])

    def compute_losses(self, images: Tensor, groups: Tensor) -> dict[str, Tensor]:
        """The objective (``"loss"``) and its terms for a batch; ``"item_mae"`` is each image's reconstruction MAE."""
        out = self(images, groups)
        item_mae = (out.reconstruction - images).abs().mean(1)
        # The paper averages each group's loss over that group's images, then weights the groups.
        counts = torch.bincount(groups, minlength=2).to(item_mae.dtype).clamp_min(1)
        group_sums = torch.zeros(2, dtype=item_mae.dtype, device=item_mae.device).index_add(0, groups, item_mae)
        certificate_maes = [(cert - images).abs().mean() for cert in out.certificates]
        code_l1 = [half.abs().mean(0).sum() for half in out.code.chunk(2, dim=1)]  # per half, before weighting
        correlation = correlation_penalty(out.code)
        loss = (
            (self.reconstruction_weights * group_sums / counts).sum()
            + self.hparams.certificate_weight * sum(certificate_maes)
            + sum(w * l1 for w, l1 in zip(self.hparams.l1_weights, code_l1))
            + self.hparams.correlation_weight * correlation
        )
        return {
            "loss": loss,
            "item_mae": item_mae,
            "certificate_0_mae": certificate_maes[0],
            "certificate_1_mae": certificate_maes[1],
            "code_l1_half_0": code_l1[0],
            "code_l1_half_1": code_l1[1],
            "correlation": correlation,
        }

    @override
    def step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        terms = self.compute_losses(batch["image"], batch["route_labels"])
        # Logs {stage}/loss_digits_0_4 and {stage}/loss_digits_5_9 (mean reconstruction MAE of each group).
        reconstruction = self.routed_loss(terms.pop("item_mae").detach(), batch["route_labels"], stage=stage)
        metrics = {f"{stage}/{name}": value for name, value in terms.items()}
        metrics[f"{stage}/reconstruction_mae"] = reconstruction
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=len(batch["image"]))
        return terms["loss"]

    @override
    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
