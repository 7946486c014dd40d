"""GradientRoutingCallback and GradientRoutingMixin under a real Trainer: exact gradients, runtime features.

Every routed gradient is compared with :func:`helpers.hand_masked_grads`: the same loss on a copy of the
model taken before ``fit``, with the routed activation replaced by ``a.detach() + m * (a - a.detach())`` and a
mask ``m`` built by hand from the labels, differentiated with ``torch.autograd.grad``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    HIDDEN,
    SEQ,
    GradCapture,
    MixinTokenModel,
    RoutedDataModule,
    TinyClassifier,
    TokenModel,
    example_data,
    fresh_copy,
    hand_masked_grads,
    soft_or_hard_mask,
    token_data,
    trainer_kwargs,
)
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_gradroute import GradientRoutingCallback, Route, Target

# Forget: units 0:8 blocked, 8:12 reversed (the paper's -0.75); retain: units 8:16 damped to 0.5.
ROUTES = [
    Route(label="forget", target="code", weights={"0:8": 0.0, "8:12": -0.75}),
    Route(label="retain", target="code", weights={"8:16": 0.5}),
]


def weight_table() -> Tensor:
    """ROUTES written out by hand: row 0 retain, row 1 forget."""
    table = torch.ones(2, HIDDEN)
    table[0, 8:16] = 0.5
    table[1, 0:8] = 0.0
    table[1, 8:12] = -0.75
    return table


def routing() -> GradientRoutingCallback:
    return GradientRoutingCallback(targets={"code": Target("encoder")}, routes=ROUTES)


def fit_and_capture(model: pl.LightningModule, data: RoutedDataModule, tmp_path: Any, **trainer: Any) -> GradCapture:
    capture = GradCapture()
    trainer = pl.Trainer(callbacks=[routing(), capture], **trainer_kwargs(tmp_path, **{"max_steps": 1, **trainer}))
    trainer.fit(model, data)
    return capture


def expected_grads(reference: nn.Module, batch: dict[str, Tensor], table: Tensor | None = None) -> dict[str, Tensor]:
    # (B, HIDDEN) per example or (B, T, HIDDEN) per token
    mask = soft_or_hard_mask(batch["route_labels"], weight_table() if table is None else table)
    return hand_masked_grads(reference, "encoder", mask, lambda: reference.compute_loss(batch))


def assert_grads_close(actual: dict[str, Tensor], expected: dict[str, Tensor], **tol: float) -> None:
    assert actual.keys() == expected.keys()
    for name in actual:
        torch.testing.assert_close(actual[name], expected[name], msg=lambda m: f"{name}: {m}", **tol)


def assert_routing_mattered(actual: dict[str, Tensor], reference: nn.Module, batch: dict[str, Tensor]) -> None:
    """The routed encoder gradient differs from the unrouted one (so the exactness check has teeth)."""
    unrouted = expected_grads(reference, batch, torch.ones(2, HIDDEN))
    assert (actual["encoder.weight"] - unrouted["encoder.weight"]).abs().max() > 1e-3


def token_batch(labels: Tensor) -> dict[str, Tensor]:
    return token_data(len(labels), labels, seed=1)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


CASES = {
    "per_example": lambda: (TinyClassifier(), example_data(6, [0, 1, 1, 0, 1, 0])),
    "per_token": lambda: (TokenModel(), token_batch(torch.randint(0, 2, (4, SEQ), generator=seeded(2)))),
    "per_token_soft": lambda: (TokenModel(), token_batch(torch.rand(4, SEQ, generator=seeded(3)))),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(CASES))
def test_routed_training_step_gradient_is_exact(case: str, tmp_path: Any) -> None:
    torch.manual_seed(0)
    model, batch = CASES[case]()
    reference = fresh_copy(model)
    capture = fit_and_capture(model, RoutedDataModule(batch, batch_size=len(batch["x"])), tmp_path)
    (actual,) = capture.grads
    assert_grads_close(actual, expected_grads(reference, batch))
    assert_routing_mattered(actual, reference, batch)


@pytest.mark.timeout(60)
def test_gradient_accumulation_sums_routed_micro_batches(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = TinyClassifier()
    reference = fresh_copy(model)
    data = example_data(8, [0, 1, 1, 1, 0, 0, 0, 1])
    capture = fit_and_capture(model, RoutedDataModule(data, batch_size=4), tmp_path, accumulate_grad_batches=2)
    (actual,) = capture.grads  # one optimizer step after two micro-batches
    micro = [expected_grads(reference, {k: v[i : i + 4] for k, v in data.items()}) for i in (0, 4)]
    # Lightning divides each micro-batch loss by accumulate_grad_batches.
    assert_grads_close(actual, {n: (micro[0][n] + micro[1][n]) / 2 for n in actual})


class InputDtypes(Callback):
    """Records, per forward call during training, the dtype of the input of ``module`` (a pre-hook)."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.dtypes: list[torch.dtype] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = pl_module.get_submodule(self.module)
        self.handle = module.register_forward_pre_hook(lambda m, args: self.dtypes.append(args[0].dtype))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.handle.remove()


class OutputRecordingTokenModel(TokenModel):
    """Keeps the logits of every training step."""

    def __init__(self) -> None:
        super().__init__()
        self.logits: list[Tensor] = []

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self(batch["x"])
        self.logits.append(logits.detach())
        return F.cross_entropy(logits.transpose(1, 2), batch["y"])


@pytest.mark.timeout(60)
def test_bf16_mixed_forward_bit_identical_activations_stay_bf16_gradient_exact(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = OutputRecordingTokenModel()
    reference = fresh_copy(model)
    batch = token_batch(torch.rand(4, SEQ, generator=seeded(4)))
    dtypes = InputDtypes("act")  # act consumes the routed activation
    capture = GradCapture()
    pl.Trainer(
        callbacks=[routing(), capture, dtypes], **trainer_kwargs(tmp_path, max_steps=1, precision="bf16-mixed")
    ).fit(model, RoutedDataModule(batch, batch_size=4))

    assert dtypes.dtypes == [torch.bfloat16]  # the mask did not promote the routed activation to fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unrouted_logits = reference(batch["x"])
        expected = expected_grads(reference, batch)
    (routed_logits,) = model.logits
    assert routed_logits.dtype == torch.bfloat16
    assert torch.equal(routed_logits, unrouted_logits)
    assert_grads_close(capture.grads[0], expected)


@pytest.mark.timeout(90)
def test_compiled_module_with_hooks_registered_in_setup_routes_exactly(tmp_path: Any) -> None:
    # backend="aot_eager": AOTAutograd traces the hooks and the routing autograd.Function exactly as inductor
    # would see them; inductor's cold C++ codegen took over a minute on a 2-core CPU machine, too slow for CI.
    torch.manual_seed(0)
    model = TinyClassifier()
    reference = fresh_copy(model)
    data = example_data(8, [0, 1, 1, 0, 1, 0, 0, 1])
    capture = fit_and_capture(
        torch.compile(model, backend="aot_eager"), RoutedDataModule(data, batch_size=4), tmp_path, max_steps=2
    )
    first, second = ({k: v[i : i + 4] for k, v in data.items()} for i in (0, 4))
    assert_grads_close(capture.grads[0], expected_grads(reference, first))
    assert_routing_mattered(capture.grads[0], reference, first)
    # The second step (new labels, SGD-updated weights) is routed exactly too: no stale graph or labels.
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p -= reference.lr * capture.grads[0][name]
    assert_grads_close(capture.grads[1], expected_grads(reference, second))


@pytest.mark.timeout(60)
def test_activation_checkpointing_gradient_equals_non_checkpointed(tmp_path: Any) -> None:
    data = example_data(6, [0, 1, 1, 0, 1, 0])
    grads, calls = [], []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        act_inputs, capture = InputDtypes("act"), GradCapture()
        pl.Trainer(callbacks=[routing(), capture, act_inputs], **trainer_kwargs(tmp_path, max_steps=1)).fit(
            TinyClassifier(checkpoint_encoder=checkpointed), RoutedDataModule(data, batch_size=6)
        )
        grads.append(capture.grads[0])
        calls.append(len(act_inputs.dtypes))
    assert calls == [1, 2]  # the checkpointed run recomputed the routed module (and its hook) in backward
    assert_grads_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.timeout(60)
def test_in_place_activation_after_routed_module(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = TinyClassifier(inplace_act=True)
    reference = fresh_copy(model)
    batch = example_data(6, [0, 1, 1, 0, 1, 0])
    capture = fit_and_capture(model, RoutedDataModule(batch, batch_size=6), tmp_path)
    assert_grads_close(capture.grads[0], expected_grads(reference, batch))


# ------------------------------------------------------------------------------------------------ mixin
def logged_mean(record: list[tuple[str, Tensor, Tensor, Tensor | None]], stage: str, label: int) -> float:
    """Hand-computed mean loss of ``label`` over a stage's recorded steps, items weighted by membership."""
    total = weight = 0.0
    for step_stage, losses, labels, valid in record:
        if step_stage != stage:
            continue
        membership = labels.double() if label == 1 else 1 - labels.double()
        if valid is not None:
            membership = membership * valid
        total += float((losses.double() * membership).sum())
        weight += float(membership.sum())
    return total / weight


@pytest.mark.timeout(60)
def test_mixin_logs_count_weighted_label_means_without_nan(tmp_path: Any) -> None:
    # Three batches of 2 sequences with uneven forget counts, the second batch with no forget token at all,
    # and padding (valid=0) that must not count.
    labels = torch.zeros(6, SEQ, dtype=torch.long)
    labels[0, :4] = 1
    labels[1, 2] = 1
    labels[5, :] = 1
    valid = torch.ones(6, SEQ)
    valid[0, 3:] = 0
    valid[4, 1:] = 0
    torch.manual_seed(0)
    model = MixinTokenModel()
    trainer = pl.Trainer(
        callbacks=[routing()], **trainer_kwargs(tmp_path, limit_val_batches=3, max_epochs=1)
    )
    trainer.fit(model, RoutedDataModule(token_data(6, labels, valid), batch_size=2))
    logged = trainer.callback_metrics
    for stage in ("train", "val"):
        for i, name in enumerate(("retain", "forget")):
            value = logged[f"{stage}/loss_{name}"]
            assert torch.isfinite(value)
            assert value.item() == pytest.approx(logged_mean(model.record, stage, i), rel=1e-6)


@pytest.mark.timeout(60)
def test_mixin_soft_labels_split_fractionally(tmp_path: Any) -> None:
    soft = torch.rand(4, SEQ, generator=seeded(5))
    torch.manual_seed(0)
    model = MixinTokenModel()
    trainer = pl.Trainer(callbacks=[routing()], **trainer_kwargs(tmp_path))
    trainer.fit(model, RoutedDataModule(token_data(4, soft), batch_size=2))
    for i, name in enumerate(("retain", "forget")):
        expected = logged_mean(model.record, "train", i)
        assert trainer.callback_metrics[f"train/loss_{name}"].item() == pytest.approx(expected, rel=1e-6)
    # The fractional split differs from rounding the soft labels to hard ones.
    rounded = [(s, losses, labels.round(), valid) for s, losses, labels, valid in model.record]
    assert abs(logged_mean(rounded, "train", 1) - logged_mean(model.record, "train", 1)) > 1e-4
