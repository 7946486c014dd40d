"""Per-digit reconstruction error of the main decoder and each certificate, the paper's figures, ``results.json``.

:class:`CertificateReport` runs all of it when training ends and writes into the run's log dir; the functions
below work on any :class:`~gradroute_experiments.mnist.MNISTSplitAutoencoder` and batch iterable.
The metric is the paper's: per-image MSE (pixels in [-1, 1]), averaged by digit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from matplotlib.figure import Figure
from torch import Tensor
from typing_extensions import override

from gradroute_experiments.mnist.model import MNISTSplitAutoencoder
from gradroute_experiments.report import TestSetReport, is_routed, own_vs_other, write_report

__all__ = [
    "OUTPUTS",
    "CertificateReport",
    "certificate_split",
    "code_magnitudes",
    "per_digit_errors",
    "plot_per_digit_errors",
    "plot_reconstructions",
]

#: The model's outputs, in the order of :class:`SplitOutputs`: main decoder, then certificate of half 0 and 1.
OUTPUTS = ("decoder", "certificate_0", "certificate_1")
DIGITS = range(10)


def _outputs(model: MNISTSplitAutoencoder, batch: dict[str, Tensor]) -> list[Tensor]:
    out = model(batch["image"], batch["route_labels"])
    return [out.reconstruction, *out.certificates]


@torch.no_grad()
def per_digit_errors(model: MNISTSplitAutoencoder, batches: Sequence[dict[str, Tensor]]) -> dict[str, list[float]]:
    """Mean per-image MSE of each output (:data:`OUTPUTS`) for each digit 0-9; NaN for a digit never seen.

    Also ``"mean_image"``: the error of always predicting the mean of the evaluated images, a reference for
    "reconstructs nothing of the image" (a certificate can be worse than it on digits its half does not hold:
    it then draws one of its own digits).
    """
    mean_image = sum(b["image"].double().sum(0) for b in batches) / sum(len(b["image"]) for b in batches)
    names = (*OUTPUTS, "mean_image")
    sums = torch.zeros(len(names), 10, dtype=torch.float64)
    counts = torch.zeros(10, dtype=torch.float64)
    for batch in batches:
        batch = {k: v.to(model.device) for k, v in batch.items()}
        digits = batch["digit"].cpu()
        predictions = [*_outputs(model, batch), mean_image.to(batch["image"]).expand_as(batch["image"])]
        for i, prediction in enumerate(predictions):
            mse = (prediction - batch["image"]).pow(2).mean(1)
            sums[i].index_add_(0, digits, mse.double().cpu())
        counts += torch.bincount(digits, minlength=10).double()
    means = sums / counts  # 0/0 -> NaN marks digits the batches did not contain
    return {name: means[i].tolist() for i, name in enumerate(names)}


@torch.no_grad()
def code_magnitudes(model: MNISTSplitAutoencoder, batches: Sequence[dict[str, Tensor]]) -> dict[str, list[float]]:
    """Mean ``|code|`` per dim of each code half, ``[first half, second half]``, for each routing group.

    Routing plus L1 shows here first: the half a group is routed away from goes to ~0 on that group's images.
    """
    sums = torch.zeros(2, 2, dtype=torch.float64)  # (group, half)
    counts = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        code = model.encoder(batch["image"].to(model.device)).abs().cpu()
        halves = torch.stack([half.mean(1) for half in code.chunk(2, dim=1)], dim=1).double()  # (B, 2)
        groups = batch["route_labels"].cpu()
        sums.index_add_(0, groups, halves)
        counts += torch.bincount(groups, minlength=2).double()
    means = sums / counts.unsqueeze(1)
    return {label: means[g].tolist() for g, label in enumerate(MNISTSplitAutoencoder.routing_labels)}


def certificate_split(errors: dict[str, list[float]], own_digits: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
    """For each certificate: mean per-digit MSE on the digits routed to its half ("own") and on the others.

    The means are over digits (each digit counts once), as the paper's appendix table aggregates label rows.
    ``other_to_own_ratio`` > 1 means the certificate decodes its own digits better than the others. With a
    ``"mean_image"`` entry, ``other_mean_image_mse`` is the no-information error on the other digits.
    """
    summary = []
    for half, own in enumerate(own_digits):
        own_mse, other_mse = own_vs_other(errors[f"certificate_{half}"], own)
        entry = {
            "certificate": half,
            "own_digits": list(own),
            "own_mse": own_mse,
            "other_mse": other_mse,
            "other_to_own_ratio": other_mse / own_mse if own_mse > 0 else math.nan,
        }
        if "mean_image" in errors:
            entry["other_mean_image_mse"] = own_vs_other(errors["mean_image"], own)[1]
        summary.append(entry)
    return summary


def plot_per_digit_errors(errors: dict[str, list[float]], half_dims: Sequence[str]) -> Figure:
    """The paper's bar chart: per-digit MSE of the decoder and of each certificate."""
    figure = Figure(figsize=(8, 3.5), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / len(OUTPUTS)
    labels = ["decoder", *(f"certificate, dims {dims}" for dims in half_dims)]
    for i, (name, label) in enumerate(zip(OUTPUTS, labels)):
        ax.bar(np.arange(10) + (i - 1) * width, errors[name], width, label=label)
    if "mean_image" in errors:
        ax.scatter(range(10), errors["mean_image"], marker="_", s=300, color="black", label="mean image")
    ax.set_xticks(range(10))
    ax.set_xlabel("digit")
    ax.set_ylabel("MSE per image (pixels in [-1, 1])")
    ax.set_title("Test reconstruction error by digit")
    ax.legend(fontsize="small")
    return figure


@torch.no_grad()
def plot_reconstructions(
    model: MNISTSplitAutoencoder, batch: dict[str, Tensor], examples_per_digit: int, half_dims: Sequence[str]
) -> Figure:
    """A grid: test images (top row) and the decoder's and each certificate's reconstructions below them."""
    picks = [i for d in DIGITS for i in (batch["digit"] == d).nonzero().flatten()[:examples_per_digit].tolist()]
    chosen = {k: v[picks].to(model.device) for k, v in batch.items()}
    rows = [chosen["image"], *_outputs(model, chosen)]
    tiles = torch.stack(rows).clamp(-1, 1).cpu().reshape(len(rows), len(picks), 28, 28)
    grid = tiles.permute(0, 2, 1, 3).reshape(len(rows) * 28, len(picks) * 28).numpy()
    figure = Figure(figsize=(max(4.0, len(picks) * 0.35 + 1.2), len(rows) * 0.35 + 0.4), layout="constrained")
    ax = figure.subplots()
    ax.imshow(grid, cmap="gray", vmin=-1, vmax=1)
    ax.set_yticks([28 * r + 14 for r in range(len(rows))])
    ax.set_yticklabels(["test image", "decoder", *(f"certificate {dims}" for dims in half_dims)], fontsize="small")
    ax.set_xticks([28 * (i + 0.5) for i in range(len(picks))])
    ax.set_xticklabels([str(d) for d in batch["digit"][picks].tolist()], fontsize="x-small")
    return figure


class CertificateReport(TestSetReport):
    """At the end of training: per-digit test error of the decoder and the certificates, figures, ``results.json``.

    Writes into ``trainer.log_dir`` (rank 0 only): ``results.json`` (per-digit MSE of every output and, per
    certificate, the error on its own digits vs the other digits), ``mnist_per_digit_error.png`` (the paper's
    bar chart) and ``mnist_reconstructions.png`` (test digits with each output's reconstruction). The figures
    also go to TensorBoard (``test/per_digit_error``, ``test/reconstructions``), the summary numbers to every
    logger. It runs in ``on_train_end`` with the model in eval mode (see
    :class:`~gradroute_experiments.report.TestSetReport`) and honours ``Trainer(limit_test_batches=...)``
    (so ``fast_dev_run`` evaluates one batch).

    Example (YAML, next to the routing callback)::

        trainer:
          callbacks:
            - class_path: gradroute_experiments.mnist.CertificateReport
              init_args: {own_digits: [[5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]}

    Args:
        own_digits: for certificate 0 (code dims 0:16) and certificate 1 (dims 16:32), the digits routed to
            that half. It only labels the summary; routing itself is the routing callback's.
        examples_per_digit: columns per digit in the reconstruction grid.
    """

    model_type = MNISTSplitAutoencoder

    def __init__(
        self, own_digits: Sequence[Sequence[int]] = ((5, 6, 7, 8, 9), (0, 1, 2, 3, 4)), examples_per_digit: int = 4
    ) -> None:
        groups = [list(g) for g in own_digits]
        flat = [d for g in groups for d in g]
        if len(groups) != 2 or not all(groups) or len(set(flat)) != len(flat) or not set(flat) <= set(DIGITS):
            raise ValueError(
                f"CertificateReport: own_digits must be two disjoint non-empty lists of digits, got {own_digits!r}"
            )
        if isinstance(examples_per_digit, bool) or not isinstance(examples_per_digit, int) or examples_per_digit < 1:
            raise ValueError(
                f"CertificateReport: examples_per_digit must be a positive int, got {examples_per_digit!r}"
            )
        super().__init__()
        self.own_digits = groups
        self.examples_per_digit = examples_per_digit

    @override
    def evaluate(
        self, trainer: pl.Trainer, model: MNISTSplitAutoencoder, batches: list[dict[str, Tensor]], out_dir: Path
    ) -> dict[str, Any]:
        """Evaluate ``model`` on ``batches``, write the figures and ``results.json`` into ``out_dir``, log them."""
        half = model.hparams.code_size // 2
        half_dims = [f"0:{half}", f"{half}:{2 * half}"]
        errors = per_digit_errors(model, batches)
        code_sizes = code_magnitudes(model, batches)
        summary = certificate_split(errors, self.own_digits)
        for entry, dims in zip(summary, half_dims):
            entry["code_dims"] = dims
        figures = {
            "per_digit_error": plot_per_digit_errors(errors, half_dims),
            "reconstructions": plot_reconstructions(model, batches[0], self.examples_per_digit, half_dims),
        }
        results = {
            "routed": is_routed(trainer),
            "scale": {
                "epochs": trainer.current_epoch,
                "steps": trainer.global_step,
                "batch_size": getattr(trainer.datamodule, "hparams", {}).get("batch_size"),
                "test_images": sum(len(b["digit"]) for b in batches),
                "hidden_sizes": list(model.hparams.hidden_sizes),
            },
            "metric": "per-image MSE, pixels in [-1, 1], mean by digit",
            "per_digit_mse": errors,
            "mean_abs_code": code_sizes,
            "certificates": summary,
        }
        metrics = {
            f"test/certificate_{entry['certificate']}_{key}": entry[key]
            for entry in summary
            for key in ("own_mse", "other_mse", "other_to_own_ratio")
        }
        files = write_report(trainer, out_dir, "mnist", results, figures, metrics)
        lines = [f"MNIST certificate report ({'routed' if results['routed'] else 'no routing'}):"]
        for entry in summary:
            lines.append(
                f"  certificate on dims {entry['code_dims']}: own digits {entry['own_digits']} MSE "
                f"{entry['own_mse']:.4f}, other digits {entry['other_mse']:.4f} (mean-image baseline "
                f"{entry['other_mean_image_mse']:.4f}), ratio other/own {entry['other_to_own_ratio']:.2f}"
            )
        magnitudes = ", ".join(f"{label} {[round(v, 4) for v in halves]}" for label, halves in code_sizes.items())
        lines.append(f"  mean |code| per dim of [{', '.join(half_dims)}]: {magnitudes}")
        lines.append(f"  results: {out_dir / 'results.json'}\n  figures: {', '.join(files.values())}")
        rank_zero_info("\n".join(lines))
        return results
