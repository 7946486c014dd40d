"""The callback's own checks in a real Trainer: label names against the mixin, coverage after the first routed
batch (deferred past a skipped step), and per-label gradient telemetry through the logger (activation and
parameter targets)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import MixinTokenModel, RoutedDataModule, TinyClassifier, example_data, token_data, trainer_kwargs
from torch import Tensor, nn

from lightning_gradroute import GradientRoutingCallback, ParameterTarget, Route, Target

LABELS = [0, 1, 1, 0, 1, 0, 0, 1]


def fit(
    model: pl.LightningModule, routing: GradientRoutingCallback, tmp_path: Any, data: Any = None, **kw: Any
) -> pl.Trainer:
    trainer = pl.Trainer(callbacks=[routing], **trainer_kwargs(tmp_path, **kw))
    trainer.fit(model, RoutedDataModule(example_data(8, LABELS) if data is None else data, batch_size=4))
    return trainer


def test_labels_that_differ_from_the_mixins_routing_labels_fail_at_setup(tmp_path: Any) -> None:
    routing = GradientRoutingCallback(
        targets={"code": Target("encoder")}, routes=[Route("keep", "code", 0.0)], labels=["drop", "keep"]
    )
    data = RoutedDataModule(token_data(4, torch.zeros(4, 5, dtype=torch.long)), batch_size=2)
    with pytest.raises(ValueError, match=r"labels \['drop', 'keep'\] differ from MixinTokenModel.routing_labels "
                                         r"\['retain', 'forget'\]; the logged per-label losses would be mislabelled"):
        pl.Trainer(callbacks=[routing], **trainer_kwargs(tmp_path)).fit(MixinTokenModel(), data)


class WithSpare(TinyClassifier):
    """A classifier with a layer its step never calls (a common leftover)."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(16, 16)


def test_a_target_the_step_never_calls_fails_after_the_first_batch(tmp_path: Any) -> None:
    routing = GradientRoutingCallback(
        targets={"code": Target("encoder"), "spare": Target("spare")},
        routes=[Route("forget", "code", 0.0), Route("forget", "spare", 0.0)],
    )
    never_called = r"routed nothing at: target 'spare' \(module 'spare', output\) was never called"
    with pytest.raises(ValueError, match=never_called):
        fit(WithSpare(), routing, tmp_path, max_steps=2)
    assert not routing.router.is_attached  # on_exception removed the hooks

    unchecked = GradientRoutingCallback(
        targets={"code": Target("encoder"), "spare": Target("spare")},
        routes=[Route("forget", "code", 0.0), Route("forget", "spare", 0.0)],
        check_coverage=False,  # e.g. a sparse mixture of experts, whose experts are called data-dependently
    )
    assert fit(WithSpare(), unchecked, tmp_path, max_steps=2).global_step == 2


class SkipsFirstStep(TinyClassifier):
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor | None:
        return None if batch_idx == 0 else super().training_step(batch, batch_idx)


def test_coverage_is_judged_at_the_first_step_that_runs_backward(tmp_path: Any) -> None:
    routing = GradientRoutingCallback(targets={"code": Target("encoder")}, routes=[Route("forget", "code", 0.0)])
    fit(SkipsFirstStep(), routing, tmp_path, max_epochs=1)
    assert routing.router.coverage_checked and routing.steps_routed == 2


def test_grad_norms_are_logged_per_label_and_unit_group(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = TinyClassifier()
    seen: list[Tensor] = []

    def keep_gradient(module: nn.Module, args: Any, out: Tensor) -> None:
        out.register_hook(seen.append)  # runs before the router's hook: sees the gradient after routing

    model.encoder.register_forward_hook(keep_gradient, prepend=True)
    routing = GradientRoutingCallback(
        targets={"code": Target("encoder")},
        routes=[Route("forget", "code", {"0:8": 0.0, "8:12": -0.75})],
        log_grad_norms=True,
    )
    logged = fit(model, routing, tmp_path, max_steps=1).callback_metrics
    (grad,) = seen
    forget = torch.tensor(LABELS[:4]).bool()
    for label, rows in (("retain", ~forget), ("forget", forget)):
        for units, cols in (("all", slice(None)), ("0:8", slice(0, 8)), ("8:12", slice(8, 12))):
            expected = grad[rows][:, cols].norm()
            torch.testing.assert_close(logged[f"gradroute/grad_norm/code/{label}/{units}"], expected)
    assert logged["gradroute/grad_norm/code/forget/0:8"] == 0 < logged["gradroute/grad_norm/code/forget/8:12"]


def test_grad_norms_of_parameter_targets_are_logged_too(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = TinyClassifier()
    reference = copy.deepcopy(model)
    routing = GradientRoutingCallback(
        targets={"code": ParameterTarget("encoder.weight", dim=0)},
        routes=[Route("forget", "code", {"0:8": 0.0})],
        log_grad_norms=True,
    )
    data = example_data(8, LABELS)
    logged = fit(model, routing, tmp_path, data, max_steps=1).callback_metrics
    batch = next(iter(RoutedDataModule(data, batch_size=4).train_dataloader()))
    forget = batch["route_labels"].bool()
    for label, rows in (("retain", ~forget), ("forget", forget)):  # each label's items alone, before routing
        reference.zero_grad()
        (F.cross_entropy(reference(batch["x"][rows]), batch["y"][rows], reduction="sum") / len(forget)).backward()
        grad = reference.encoder.weight.grad.clone()
        if label == "forget":
            grad[:8] = 0  # the route: forget items may not change rows 0:8
        for units, cols in (("all", slice(None)), ("0:8", slice(0, 8))):
            expected = grad[cols].norm()
            torch.testing.assert_close(logged[f"gradroute/grad_norm/code/{label}/{units}"], expected)
    assert logged["gradroute/grad_norm/code/forget/0:8"] == 0 < logged["gradroute/grad_norm/code/retain/0:8"]
