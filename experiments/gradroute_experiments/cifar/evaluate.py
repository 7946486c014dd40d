"""Per-class and per-group test accuracy of the main head and each certificate, the figure, ``results.json``.

:class:`CertificateAccuracyReport` runs all of it when training ends, with the model in eval mode (BatchNorm on
its running statistics; the reference code evaluated in train mode, which this does not copy), and writes into
the run's log dir. The metric is the paper's: top-1 accuracy of each class, averaged over the classes of a group.
"""

from __future__ import annotations

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

from gradroute_experiments.cifar.model import CIFARSplitResNet
from gradroute_experiments.report import TestSetReport, is_routed, nan_mean, own_vs_other, write_report

__all__ = [
    "CertificateAccuracyReport",
    "accuracy_by_group",
    "certificate_split",
    "encoding_magnitudes",
    "output_names",
    "per_class_accuracy",
    "plot_accuracy_by_group",
]


def output_names(model: CIFARSplitResNet) -> list[str]:
    """``["decoder", "certificate_0", ...]``: the main head, then the certificate of each group."""
    return ["decoder", *(f"certificate_{g}" for g in range(len(model.certificates)))]


@torch.no_grad()
def per_class_accuracy(model: CIFARSplitResNet, batches: Sequence[dict[str, Tensor]]) -> dict[str, list[float]]:
    """Top-1 accuracy of each output (:func:`output_names`) on each class; NaN for a class never seen."""
    num_classes = model.hparams.num_classes
    names = output_names(model)
    correct = torch.zeros(len(names), num_classes, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for batch in batches:
        labels = batch["label"].cpu()
        out = model(batch["image"].to(model.device))
        for i, logits in enumerate([out.logits, *out.certificates]):
            correct[i].index_add_(0, labels, (logits.argmax(1).cpu() == labels).double())
        counts += torch.bincount(labels, minlength=num_classes).double()
    accuracy = correct / counts  # 0/0 -> NaN marks classes the batches did not contain
    return {name: accuracy[i].tolist() for i, name in enumerate(names)}


def accuracy_by_group(
    accuracy: dict[str, list[float]], class_groups: Sequence[Sequence[int]]
) -> dict[str, list[float]]:
    """For each output, the mean accuracy over the classes of each group (each class counts once)."""
    return {
        name: [nan_mean(per_class[c] for c in classes) for classes in class_groups]
        for name, per_class in accuracy.items()
    }


def certificate_split(
    accuracy: dict[str, list[float]], class_groups: Sequence[Sequence[int]], group_names: Sequence[str]
) -> list[dict[str, Any]]:
    """For each certificate ``g``: mean accuracy on its own group's classes and on all other classes.

    ``own_minus_other`` > 0 means the certificate recognises its own group's classes better than the others.
    """
    summary = []
    for g, classes in enumerate(class_groups):
        own, other = own_vs_other(accuracy[f"certificate_{g}"], classes)
        summary.append(
            {
                "certificate": g,
                "own_group": group_names[g],
                "own_accuracy": own,
                "other_accuracy": other,
                "own_minus_other": own - other,
            }
        )
    return summary


@torch.no_grad()
def encoding_magnitudes(model: CIFARSplitResNet, batches: Sequence[dict[str, Tensor]]) -> dict[str, list[float]]:
    """Mean ``|encoding|`` per channel and position of each certificate's channel block, for each routing group.

    Routing plus L1 shows here: the block a group is routed away from goes towards 0 on that group's images.
    """
    blocks = model.certificate_indices()
    groups = len(model.routing_labels)
    sums = torch.zeros(groups, len(blocks), dtype=torch.float64)
    counts = torch.zeros(groups, dtype=torch.float64)
    for batch in batches:
        encoding = model.encoder(batch["image"].to(model.device)).abs()
        means = torch.stack([encoding.index_select(1, b).mean((1, 2, 3)) for b in blocks], dim=1).double().cpu()
        group = batch["route_labels"].cpu()
        sums.index_add_(0, group, means)
        counts += torch.bincount(group, minlength=groups).double()
    means = sums / counts.unsqueeze(1)
    return {name: means[g].tolist() for g, name in enumerate(model.routing_labels)}


def plot_accuracy_by_group(
    by_group: dict[str, list[float]], group_labels: Sequence[str], channels: Sequence[str]
) -> Figure:
    """The paper's bar chart, labelled correctly: per class group, the accuracy of the main head and each
    certificate."""
    figure = Figure(figsize=(max(6.0, 2.5 * len(group_labels)), 3.8), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / len(by_group)
    labels = ["main head", *(f"certificate, channels {c}" for c in channels)]
    for i, (values, label) in enumerate(zip(by_group.values(), labels)):
        bars = ax.bar(np.arange(len(group_labels)) + (i - (len(by_group) - 1) / 2) * width, values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize="x-small")
    ax.set_xticks(range(len(group_labels)))
    ax.set_xticklabels(group_labels, fontsize="small")
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy (mean over classes)")
    ax.set_title("Accuracy by class group")
    ax.legend(fontsize="small")
    return figure


def _describe(classes: Sequence[int]) -> str:
    """``"classes 0-49"`` for a contiguous range, ``"class 3"`` for one, else ``"classes 1,9"``."""
    if len(classes) == 1:
        return f"class {classes[0]}"
    if list(classes) == list(range(classes[0], classes[-1] + 1)):
        return f"classes {classes[0]}-{classes[-1]}"
    return "classes " + ",".join(map(str, classes))


class CertificateAccuracyReport(TestSetReport):
    """At the end of training: per-class-group test accuracy of the main head and each certificate.

    Writes into ``trainer.log_dir`` (rank 0 only): ``results.json`` (per-class accuracy of every output, its
    mean per class group, and per certificate the accuracy on its own group vs the others, plus the mean
    ``|encoding|`` of each channel block on each group's images) and ``cifar_accuracy_by_group.png``. The figure
    also goes to TensorBoard (``test/accuracy_by_group``), the numbers to every logger
    (``test/decoder_accuracy_<group>``, ``test/certificate_<g>_own_accuracy``, ...). The class groups come from
    the datamodule (``class_groups``), the channel blocks from the model; certificate ``g``'s own group is
    group ``g``. It honours ``Trainer(limit_test_batches=...)`` (so ``fast_dev_run`` evaluates one batch).

    Example (YAML, next to the routing callback)::

        trainer:
          callbacks:
            - class_path: gradroute_experiments.cifar.CertificateAccuracyReport
    """

    model_type = CIFARSplitResNet

    @override
    def evaluate(
        self, trainer: pl.Trainer, model: CIFARSplitResNet, batches: list[dict[str, Tensor]], out_dir: Path
    ) -> dict[str, Any]:
        """Evaluate ``model`` on ``batches``, write the figure and ``results.json`` into ``out_dir``, log them."""
        class_groups = trainer.datamodule.class_groups
        names = list(model.routing_labels)
        channels = [str(c) for c in model.hparams.certificate_channels]
        accuracy = per_class_accuracy(model, batches)
        by_group = accuracy_by_group(accuracy, class_groups)
        summary = certificate_split(accuracy, class_groups, names)
        for entry in summary:
            entry["channels"] = channels[entry["certificate"]]
        magnitudes = encoding_magnitudes(model, batches)
        group_labels = [f"{name}\n({_describe(classes)})" for name, classes in zip(names, class_groups)]
        figures = {"accuracy_by_group": plot_accuracy_by_group(by_group, group_labels, channels)}
        hp = model.hparams
        results = {
            "routed": is_routed(trainer),
            "scale": {
                "epochs": trainer.current_epoch,
                "steps": trainer.global_step,
                "dataset": trainer.datamodule.hparams.get("dataset"),
                "batch_size": trainer.datamodule.hparams.get("batch_size"),
                "test_images": sum(len(b["label"]) for b in batches),
                "widths": list(hp.widths),
                "blocks": list(hp.blocks),
                "split_at": hp.split_at,
            },
            "l1_weight": hp.l1_weight,
            "metric": "top-1 test accuracy (model in eval mode), mean over the classes of a group",
            "groups": [{"name": n, "classes": list(c)} for n, c in zip(names, class_groups)],
            "per_class_accuracy": accuracy,
            "accuracy_by_group": by_group,
            "certificates": summary,
            "mean_abs_encoding": {"channels": channels, **magnitudes},
        }
        metrics = {f"test/decoder_accuracy_{n}": v for n, v in zip(names, by_group["decoder"])}
        metrics["test/decoder_accuracy"] = nan_mean(accuracy["decoder"])
        for entry in summary:
            for key in ("own_accuracy", "other_accuracy"):
                metrics[f"test/certificate_{entry['certificate']}_{key}"] = entry[key]
        files = write_report(trainer, out_dir, "cifar", results, figures, metrics)
        lines = [f"CIFAR certificate report ({'routed' if results['routed'] else 'no routing'}):"]
        lines.append("  main head accuracy: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(names, by_group["decoder"])))
        for entry in summary:
            lines.append(
                f"  certificate on channels {entry['channels']}: own group {entry['own_group']} accuracy "
                f"{entry['own_accuracy']:.3f}, other classes {entry['other_accuracy']:.3f}"
            )
        lines.append(f"  results: {out_dir / 'results.json'}\n  figure: {files['accuracy_by_group']}")
        rank_zero_info("\n".join(lines))
        return results
