"""A LightningModule base for experiments whose training, validation and test steps are one computation."""

from __future__ import annotations

import abc
from typing import Any

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

__all__ = ["StepByStage"]


class StepByStage(pl.LightningModule, abc.ABC):
    """``training_step``, ``validation_step`` and ``test_step`` all call :meth:`step` with the stage's name.

    Subclasses implement ``step(batch, stage)`` (``stage`` is ``"train"``, ``"val"`` or ``"test"``) and return
    the loss; what a stage logs differently is decided there.
    """

    @abc.abstractmethod
    def step(self, batch: Any, stage: str) -> Tensor:
        """The loss of ``batch`` at ``stage``; log what the stage needs."""

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.step(batch, "train")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.step(batch, "test")
