"""Lifecycle of GradientRoutingCallback inside a real Trainer: when hooks exist, when labels are set, state.

The expected hook order is the reference table (DESIGN.md "Lifecycle in Lightning"): hooks registered in
``setup`` after the module's ``configure_model``, labels set in ``on_train_batch_start`` and held through
backward and the optimizer step, cleared in ``on_train_batch_end``, hooks removed in ``teardown``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    FEATURES,
    HIDDEN,
    RoutedDataModule,
    TinyClassifier,
    example_data,
    hook_count,
    trainer_kwargs,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from lightning_gradroute import GradientRoutingCallback, Route, Target

LABELS = [0, 1, 0, 1, 1, 0, 0, 0]  # two batches of 4


def routing(weight: float = 0.0) -> GradientRoutingCallback:
    return GradientRoutingCallback(
        targets={"code": Target("encoder")},
        routes=[Route(label="forget", target="code", weights={"0:8": weight})],
    )


def routing_state(trainer: pl.Trainer) -> GradientRoutingCallback:
    return next(c for c in trainer.callbacks if isinstance(c, GradientRoutingCallback))


class LazyRecordingClassifier(TinyClassifier):
    """Builds its encoder in ``configure_model`` (idempotently) and records, at each hook, how many forward
    hooks the model carries and whether routing labels are set."""

    def __init__(self) -> None:
        super().__init__()
        del self.encoder
        self.encoder: nn.Module | None = None
        self.events: list[tuple[str, int, bool]] = []

    def note(self, event: str) -> None:
        labels_set = routing_state(self.trainer).router.current_labels is not None
        self.events.append((event, hook_count(self), labels_set))

    def configure_model(self) -> None:
        self.note("configure_model")
        if self.encoder is None:
            self.encoder = nn.Linear(FEATURES, HIDDEN)

    def setup(self, stage: str) -> None:
        self.note(f"module.setup:{TrainerFn(stage).value}")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.note("training_step")
        return super().training_step(batch, batch_idx)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.note("on_before_backward")

    def on_after_backward(self) -> None:
        self.note("on_after_backward")

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.note("on_before_optimizer_step")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.note("validation_step")
        return super().validation_step(batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.note("test_step")
        return super().test_step(batch, batch_idx)


class Recorder(Callback):
    """Placed after the routing callback, so it sees the state the routing callback's hook left."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.note(f"callback.setup:{TrainerFn(stage).value}")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        pl_module.note("on_train_batch_start")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        pl_module.note("on_train_batch_end")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.note("on_fit_end")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.note(f"teardown:{TrainerFn(stage).value}")


@pytest.mark.timeout(60)
def test_hook_order_labels_only_in_training_and_no_leak_into_validate_test(tmp_path: Any) -> None:
    model = LazyRecordingClassifier()
    data = RoutedDataModule(example_data(8, LABELS), batch_size=4)
    trainer = pl.Trainer(
        callbacks=[routing(), Recorder()],
        **trainer_kwargs(tmp_path, limit_val_batches=1, limit_test_batches=1, num_sanity_val_steps=1),
    )
    trainer.fit(model, data)

    H = 1  # one routed site: the encoder built in configure_model
    step = [
        ("on_train_batch_start", H, True),
        ("training_step", H, True),
        ("on_before_backward", H, True),
        ("on_after_backward", H, True),
        ("on_before_optimizer_step", H, True),
        ("on_train_batch_end", H, False),
    ]
    assert model.events == [
        ("configure_model", 0, False),  # called by the callback's setup, before the patterns are resolved
        ("callback.setup:fit", H, False),
        ("module.setup:fit", H, False),
        ("configure_model", H, False),  # Lightning's own (idempotent) call
        ("validation_step", H, False),  # sanity check: unrouted
        *step,
        *step,
        ("validation_step", H, False),  # validation inside fit: unrouted
        ("on_fit_end", H, False),
        ("teardown:fit", 0, False),
    ]

    model.events.clear()
    trainer.validate(model, data, verbose=False)
    trainer.test(model, data, verbose=False)
    assert [e for e in model.events if e[0] in ("validation_step", "test_step")] == [
        ("validation_step", 0, False),
        ("test_step", 0, False),
    ]
    assert hook_count(model) == 0


@pytest.mark.timeout(60)
def test_failed_fit_removes_hooks_and_callback_can_fit_again(tmp_path: Any) -> None:
    model = TinyClassifier()
    callback = routing()
    bad = RoutedDataModule(example_data(8, [0, 1, 0, 1, 5, 0, 0, 0]), batch_size=4)  # label 5 in batch 2
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"routing labels \[5\] are unknown"):
        trainer.fit(model, bad)
    assert hook_count(model) == 0
    assert callback.router.current_labels is None

    good = RoutedDataModule(example_data(8, LABELS), batch_size=4)
    pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path)).fit(model, good)
    assert callback.steps_routed == 1 + 2  # one batch before the failure, then two
    assert hook_count(model) == 0


@pytest.mark.timeout(60)
def test_state_round_trips_through_checkpoint_resume_and_changed_config_raises(tmp_path: Any) -> None:
    data = RoutedDataModule(example_data(8, LABELS), batch_size=4)
    ckpt_kwargs = trainer_kwargs(tmp_path, enable_checkpointing=True)
    first = routing()
    pl.Trainer(
        callbacks=[first, ModelCheckpoint(dirpath=tmp_path, filename="epoch1")], **ckpt_kwargs
    ).fit(TinyClassifier(), data)
    ckpt_path = tmp_path / "epoch1.ckpt"
    saved = torch.load(ckpt_path, weights_only=False)["callbacks"][first.state_key]
    assert (saved["config"], saved["steps_routed"], saved["label_totals"]) == (first.router.config(), 2, [5.0, 3.0])

    resumed = routing()
    pl.Trainer(callbacks=[resumed], **trainer_kwargs(tmp_path, max_epochs=2)).fit(
        TinyClassifier(), data, ckpt_path=ckpt_path
    )
    assert resumed.steps_routed == 4
    assert resumed.label_totals == [10.0, 6.0]

    changed = routing(weight=0.5)
    changed_fields = r"trained with another routing config: routes\[0\]\.weights\.0:8: 0\.0 -> 0\.5; resume with"
    with pytest.raises(ValueError, match=changed_fields):
        pl.Trainer(callbacks=[changed], **trainer_kwargs(tmp_path, max_epochs=2)).fit(
            TinyClassifier(), data, ckpt_path=ckpt_path
        )
