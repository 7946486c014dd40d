"""End-of-training test-set reports for the representation-splitting experiments (MNIST, CIFAR).

:class:`TestSetReport` is the shared Lightning glue: when training ends it takes the test batches (honouring
``Trainer(limit_test_batches=...)``), puts the model in eval mode (BatchNorm uses its running statistics, dropout
is off) and calls the subclass's :meth:`TestSetReport.evaluate` on rank 0; :func:`write_report` saves the
figures and ``results.json`` into the run's log dir and logs the numbers and figures to every logger.
:func:`own_vs_other` is the certificates' summary statistic.
"""

from __future__ import annotations

import abc
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import Tensor
from typing_extensions import override

from lightning_gradroute.callback import GradientRoutingCallback

__all__ = ["TestSetReport", "is_routed", "nan_mean", "own_vs_other", "write_report"]


def nan_mean(values: Iterable[float]) -> float:
    """The mean of the values that are not NaN; NaN if there are none."""
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def own_vs_other(per_class: Sequence[float], own: Sequence[int]) -> tuple[float, float]:
    """Mean of a per-class metric over the ``own`` classes and over all other classes (each class counts once).

    Classes with a NaN value (never seen in the evaluated batches) are left out of the means.
    """
    own_set = set(own)
    return (
        nan_mean(per_class[c] for c in own_set),
        nan_mean(v for c, v in enumerate(per_class) if c not in own_set),
    )


def is_routed(trainer: pl.Trainer) -> bool:
    """Whether the trainer routes gradients (has a :class:`~lightning_gradroute.GradientRoutingCallback`)."""
    return any(isinstance(cb, GradientRoutingCallback) for cb in trainer.callbacks)


def write_report(
    trainer: pl.Trainer,
    out_dir: Path,
    prefix: str,
    results: dict[str, Any],
    figures: Mapping[str, Figure],
    metrics: Mapping[str, float],
) -> dict[str, str]:
    """Save ``figures`` as ``<out_dir>/<prefix>_<name>.png``, ``results`` (plus their paths) as ``results.json``.

    Every logger gets ``metrics`` at the trainer's global step; TensorBoard loggers also get each figure under
    ``test/<name>``. Returns the figure paths by name.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: str(out_dir / f"{prefix}_{name}.png") for name in figures}
    for name, figure in figures.items():
        figure.savefig(files[name], dpi=120)
    results["figures"] = files
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True))
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)
        if isinstance(logger, TensorBoardLogger):
            for name, figure in figures.items():
                logger.experiment.add_figure(f"test/{name}", figure, trainer.global_step, close=False)
    return files


class TestSetReport(Callback, abc.ABC):
    """Base of the certificate reports: evaluate the trained model on the test set in eval mode, on rank 0.

    It runs in ``on_train_end``, while the model is still on its accelerator and the loggers are open, writes
    into ``trainer.log_dir`` (or ``default_root_dir`` without a logger) and keeps what :meth:`evaluate`
    returns in ``self.results``. Subclasses set ``model_type`` and implement :meth:`evaluate`.
    """

    model_type: ClassVar[type[pl.LightningModule]] = pl.LightningModule

    def __init__(self) -> None:
        self.results: dict[str, Any] | None = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        if not isinstance(pl_module, self.model_type):
            raise TypeError(f"{type(self).__name__} needs a {self.model_type.__name__}, got {type(pl_module).__name__}")
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError(f"{type(self).__name__} needs the trainer to be given a datamodule with a test_dataloader")
        loader = datamodule.test_dataloader()
        limit = trainer.limit_test_batches
        batches = limit if isinstance(limit, int) else max(1, math.ceil(limit * len(loader)))
        was_training = pl_module.training
        pl_module.eval()
        try:
            self.results = self.evaluate(trainer, pl_module, list(itertools.islice(loader, batches)), out_dir)
        finally:
            pl_module.train(was_training)

    @abc.abstractmethod
    def evaluate(
        self, trainer: pl.Trainer, model: pl.LightningModule, batches: list[dict[str, Tensor]], out_dir: Path
    ) -> dict[str, Any]:
        """Evaluate ``model`` (in eval mode) on ``batches``, write into ``out_dir``, return the results."""
