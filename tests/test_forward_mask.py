"""Forward masks (SGTM's retain mode): items of a label see chosen units of an activation target as 0 in training.

Exactness against an independent computation (a hand-built mask multiplied in a plain hook, the route in the
delta form), every other item bit for bit unmasked, masked in any grad mode (reentrant checkpointing), unmasked
in validation, coverage, telemetry, eager one-line errors, the config a resume compares, and DDP (2 processes).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    DDP,
    SEQ,
    VOCAB,
    MixinTokenModel,
    RoutedDataModule,
    SaveRankState,
    TokenModel,
    rank_states,
    token_columns,
    token_data,
    trainer_kwargs,
)
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_gradroute import (
    ForwardMask,
    GradientRouter,
    GradientRoutingCallback,
    ParameterTarget,
    Route,
    Target,
)

LABELS = ["retain", "forget", "other"]
#: (B=4, T=5) per-token labels with every label present.
TOKEN_LABELS = torch.tensor([[0, 1, 2, 0, 1], [1, 1, 0, 0, 2], [2, 0, 0, 1, 0], [0, 0, 0, 0, 0]])


def three_label_router(site: str = "output") -> GradientRouter:
    """Forget routed on 0:4 / 4:8; retain does not see 8:, other does not see units 0 and 15."""
    module = "encoder" if site == "output" else "head"
    return GradientRouter(
        {"enc": Target(module, site=site)},  # type: ignore[arg-type]
        [Route("forget", "enc", {"0:4": 0.0, "4:8": -0.75})],
        labels=LABELS,
        masks=[ForwardMask("retain", "enc", "8:"), ForwardMask("other", "enc", [0, 15])],
    )


def hand_tables(labels: Tensor) -> tuple[Tensor, Tensor]:
    """The route weights and the forward mask of :func:`three_label_router`, per item, written out by hand."""
    weights, mask = torch.ones(3, 16), torch.ones(3, 16)
    weights[1, 0:4], weights[1, 4:8] = 0.0, -0.75  # forget's route
    mask[0, 8:] = 0.0  # retain does not see 8:
    mask[2, [0, 15]] = 0.0  # other does not see 0 and 15
    return weights[labels], mask[labels]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("site", ["output", "input"])
@pytest.mark.parametrize("per", ["token", "example"])
def test_masked_forward_and_gradients_equal_a_hand_masked_computation(dtype: torch.dtype, site: str, per: str) -> None:
    torch.manual_seed(0)
    model = TokenModel().to(dtype)
    hand, plain = copy.deepcopy(model), copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (4, SEQ))
    labels = TOKEN_LABELS if per == "token" else TOKEN_LABELS[:, 0]
    weights, mask = hand_tables(labels)
    if per == "example":  # the (B,) labels broadcast over the sequence of the (B, T, 16) activation
        weights, mask = weights.unsqueeze(1), mask.unsqueeze(1)
    weights, mask = weights.to(dtype), mask.to(dtype)

    def by_hand(x: Tensor) -> Tensor:
        y = x * mask
        return y.detach() + weights * (y - y.detach())

    if site == "output":
        hand.encoder.register_forward_hook(lambda m, a, out: by_hand(out))
    else:
        hand.head.register_forward_pre_hook(lambda m, a: (by_hand(a[0]),))
    router = three_label_router(site)
    seen: dict[str, Tensor] = {}
    with router.attached(model):
        if site == "output":
            model.encoder.register_forward_hook(lambda m, a, out: seen.update(value=out))
        else:
            model.head.register_forward_pre_hook(lambda m, a: seen.update(value=a[0]))
        with router.route(labels):
            logits = model(ids)
            grads = torch.autograd.grad(logits.float().square().sum(), list(model.parameters()))
    expected = hand(ids)
    expected_grads = torch.autograd.grad(expected.float().square().sum(), list(hand.parameters()))
    assert torch.equal(logits, expected)
    for name, grad, want in zip(dict(model.named_parameters()), grads, expected_grads):
        assert torch.equal(grad, want), name
    # The masked units are exactly 0 for their labels; everything the masks do not name is bit for bit unmasked.
    hidden = mask.expand(4, SEQ, 16) == 0
    assert not seen["value"][hidden].any() and hidden.any()
    unmasked = plain(ids)
    kept = (mask == 1).all(-1).expand(4, SEQ)  # items of labels without a mask (forget)
    assert kept.any() and torch.equal(logits[kept], unmasked[kept]) and not torch.equal(logits, unmasked)
    assert torch.equal(model(ids), unmasked)  # outside route(): unmasked


class Checkpointed(TokenModel):
    """``encoder`` and ``act`` under reentrant activation checkpointing: a no-grad first pass, then a
    recomputation with grad in backward."""

    def forward(self, ids: Tensor) -> Tensor:
        block = lambda h: self.act(self.encoder(h))  # noqa: E731
        return self.head(torch.utils.checkpoint.checkpoint(block, self.embed(ids), use_reentrant=True))


def test_masks_apply_in_any_grad_mode_so_reentrant_checkpointing_gets_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = TokenModel()
    checkpointed = Checkpointed()
    checkpointed.load_state_dict(model.state_dict())
    ids = torch.randint(0, VOCAB, (4, SEQ))
    results = []
    for net in (model, checkpointed):
        router = three_label_router()
        with router.attached(net), router.route(TOKEN_LABELS):
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # checkpoint: no input requires grad (none should)
                no_grad = net(ids)
            logits = net(ids)
            logits.square().sum().backward()  # reentrant checkpointing refuses autograd.grad
        grads = [p.grad for p in net.parameters()]
        assert torch.equal(no_grad, logits)
        results.append((logits, grads))
    assert torch.equal(results[0][0], results[1][0])
    for grad, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(grad, want, rtol=0, atol=0)


def test_a_mask_only_router_needs_no_route_and_expanded_units_come_from_the_expansion() -> None:
    torch.manual_seed(0)
    model = TokenModel()
    router = GradientRouter({"enc": Target("encoder")}, [], masks=[ForwardMask("retain", "enc", "expanded")])
    groups = {("encoder", "output"): {"original": list(range(12)), "expanded": list(range(12, 16))}}
    seen: dict[str, Tensor] = {}
    labels = TOKEN_LABELS.clamp(max=1)
    with router.attached(model, groups):
        model.encoder.register_forward_hook(lambda m, a, out: seen.update(value=out))
        with router.route(labels):
            model(torch.randint(0, VOCAB, (4, SEQ))).sum().backward()
        assert "forward masks (zeroed units) {'retain': 'expanded'}" in router.describe()
    retain = labels == 0
    assert not seen["value"][retain][:, 12:].any() and seen["value"][retain][:, :12].abs().sum() > 0
    assert seen["value"][~retain][:, 12:].abs().sum() > 0
    assert router.coverage_checked


class WithSpare(TokenModel):
    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(16, 16)


def test_a_masked_site_the_step_never_calls_fails_after_the_first_batch() -> None:
    router = GradientRouter(
        {"enc": Target("encoder"), "spare": Target("spare")},
        [Route("forget", "enc", 0.0)],
        masks=[ForwardMask("retain", "spare", "8:")],
    )
    model = WithSpare()
    with router.attached(model), pytest.raises(
        ValueError, match=r"routed nothing at: target 'spare' \(module 'spare', output\) was never called while "
                          r"routing .*, so its forward masks masked nothing$"):  # fmt: skip
        with router.route(TOKEN_LABELS.clamp(max=1)):
            model(torch.randint(0, VOCAB, (4, SEQ))).sum().backward()


class Structured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.inner(x), x


def _mask(units: Any, label: str = "retain", target: str = "enc") -> list[ForwardMask]:
    return [ForwardMask(label, target, units)]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ForwardMask("retain", "enc", "all"), r"ForwardMask 'retain' -> 'enc': units 'all' would zero the "
                                                      "whole value"),
        (lambda: ForwardMask("retain", "enc", "8-"), r"ForwardMask 'retain' -> 'enc': units '8-' are not"),
        (lambda: GradientRouter({"enc": Target("encoder")}, [], masks=_mask("8:", label="keep")),
         r"^ForwardMask 'keep' -> 'enc': unknown label; labels are \['retain', 'forget'\]$"),
        (lambda: GradientRouter({"enc": Target("encoder")}, [], masks=_mask("8:", target="mlp")),
         r"^ForwardMask 'retain' -> 'mlp': unknown target; targets are \['enc'\]$"),
        (lambda: GradientRouter({"enc": ParameterTarget("encoder.weight")}, [], masks=_mask("8:")),
         r"^ForwardMask 'retain' -> 'enc': target 'enc' is a ParameterTarget, which has no forward value"),
        (lambda: GradientRouter({"enc": Target("encoder")}, [], masks=_mask("8:") + _mask("0")),
         r"^masks\[0\] and masks\[1\] both mask label 'retain' at target 'enc'; merge their units"),
        (lambda: GradientRouter({"enc": Target("encoder")}, [], masks=[Route("retain", "enc")]),  # type: ignore
         r"^GradientRouter: masks must be ForwardMask objects, got Route$"),
        (lambda: GradientRouter({"enc": Target("encoder"), "u": Target("head")}, [], masks=_mask("8:")),
         r"target 'u' has no route, so it routes nothing; add a Route \(or a ForwardMask\)"),
    ],
)
def test_mask_configurations_fail_in_the_constructor(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("target", "units", "message"),
    [
        (Target("encoder"), "0:16", r"^ForwardMask 'retain' -> 'enc': units '0:16' are every one of the 16 features "
                                    r"at target 'enc' \(module 'encoder', output\), so its whole value would be zero"),
        (Target("encoder", units="0:8"), "8:", r"^ForwardMask 'retain' -> 'enc': units '8:' do not intersect the "
                                               "target's units '0:8' at target 'enc'.*; it masks nothing$"),
        (Target("encoder"), "20:", r"slice '20:' is out of range for 16 features"),
        (Target("encoder"), "expanded", r"units 'expanded' need an expansion of this module"),
    ],
)
def test_mask_units_fail_at_attach(target: Target, units: Any, message: str) -> None:
    router = GradientRouter({"enc": target}, [], masks=_mask(units))
    with pytest.raises(ValueError, match=message):
        router.attach(TokenModel())


def test_soft_labels_structured_values_and_misshaped_labels_fail_at_the_first_batch() -> None:
    router = GradientRouter({"enc": Target("encoder")}, [], masks=_mask("8:"))
    model = TokenModel()
    with router.attached(model):
        with pytest.raises(ValueError, match=r"^GradientRouter: forward masks \(ForwardMask 'retain' -> 'enc'...\) "
                                             "need integer labels, got torch.float32: a soft label would scale"):
            router.set_labels(torch.full((4, SEQ), 0.5))
        with pytest.raises(ValueError, match=r"labels of shape \(4, 4\) do not match the activation of shape "
                                             r"\(4, 5, 16\)"), torch.no_grad(), router.route(torch.zeros(4, 4).long()):
            model(torch.randint(0, VOCAB, (4, SEQ)))
    structured = nn.Sequential(Structured())
    router = GradientRouter({"enc": Target("0")}, [], masks=_mask("2:"))
    with router.attached(structured), pytest.raises(ValueError, match=r"output is a tuple of 2; set output_index"):
        with router.route(torch.zeros(3).long()):
            structured(torch.randn(3, 4))
    with pytest.raises(ValueError, match="a forward_mask needs integer labels"):
        from lightning_gradroute.grad import route_gradient_by_label

        route_gradient_by_label(torch.randn(2, 3), torch.zeros(2), torch.ones(2, 3), forward_mask=torch.ones(2, 3))


class Probe(Callback):
    """Records the encoder's (hooked, so possibly masked) output with the labels of its batch, per stage."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Tensor, Tensor]] = []
        self.labels: Tensor | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # after the router's hooks
        def record(module: nn.Module, args: Any, out: Tensor) -> None:
            stage = "train" if trainer.training else "val"
            self.seen.append((stage, out.detach().clone(), self.labels))  # type: ignore[arg-type]

        pl_module.encoder.register_forward_hook(record)  # type: ignore[union-attr]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.labels = batch["route_labels"]

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, i: int, d: int = 0) -> None:
        self.labels = batch["route_labels"]


def callback_with_masks(units: str = "8:", **kwargs: Any) -> GradientRoutingCallback:
    return GradientRoutingCallback(
        targets={"enc": Target("encoder")},
        routes=[Route("forget", "enc", {"0:8": 0.0})],
        masks=[ForwardMask("retain", "enc", units)],
        **kwargs,
    )


def test_the_callback_masks_training_steps_only_logs_no_gradient_into_masked_units_and_lists_masks(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    probe = Probe()
    routing = callback_with_masks(log_grad_norms=True)
    data = RoutedDataModule(token_data(8, TOKEN_LABELS.clamp(max=1).repeat(2, 1)), batch_size=4)
    trainer = pl.Trainer(
        callbacks=[routing, probe], **trainer_kwargs(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=1)
    )
    trainer.fit(MixinTokenModel(), data)
    stages = [stage for stage, _, _ in probe.seen]
    assert stages.count("train") == 2 and stages.count("val") >= 1
    for stage, out, labels in probe.seen:
        retain = labels == 0
        assert retain.any()
        if stage == "train":
            assert not out[retain][:, 8:].any() and out[retain][:, :8].abs().sum() > 0
        else:  # validation sees every unit
            assert out[retain][:, 8:].abs().sum() > 0
        assert out[~retain][:, 8:].abs().sum() > 0
    logged = trainer.callback_metrics
    assert logged["gradroute/grad_norm/enc/retain/8:"] == 0 < logged["gradroute/grad_norm/enc/retain/all"]
    assert logged["gradroute/grad_norm/enc/forget/8:"] > 0 == logged["gradroute/grad_norm/enc/forget/0:8"]
    assert routing.router.coverage_checked
    assert routing.router.config()["masks"] == [{"label": "retain", "target": "enc", "units": "8:"}]


def test_a_resume_with_other_masks_names_them_and_configs_without_masks_still_match() -> None:
    state = callback_with_masks().state_dict()
    with pytest.raises(ValueError, match=r"another routing config: masks\[0\]\.units: '8:' -> '4:'; resume with"):
        callback_with_masks(units="4:").load_state_dict(state)
    unmasked = GradientRoutingCallback({"enc": Target("encoder")}, [Route("forget", "enc", {"0:8": 0.0})])
    with pytest.raises(ValueError, match=r"masks: \[\{'label': 'retain', 'target': 'enc', 'units': '8:'\}\] -> "
                                         "absent"):
        unmasked.load_state_dict(state)
    assert "masks" not in unmasked.router.config()  # so checkpoints from before masks existed still resume
    callback_with_masks().load_state_dict(state)


def grads_after_fit(directory: Path, processes: int) -> tuple[list[dict[str, Any]], MixinTokenModel, Mapping]:
    torch.manual_seed(0)
    model = MixinTokenModel(normalization="global")
    distributed = DDP if processes == 2 else {}
    trainer = pl.Trainer(
        callbacks=[callback_with_masks(log_grad_norms=True), SaveRankState(directory)],
        **trainer_kwargs(directory, **distributed),
    )
    trainer.fit(model, RoutedDataModule(token_columns(), batch_size=4 // processes, shard_global_batches=True))
    return (rank_states(directory) if processes == 2 else []), model, trainer.callback_metrics


@pytest.mark.timeout(120)
def test_masks_under_ddp_spawn_keep_ranks_identical_and_equal_one_process_on_the_global_batch(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir(), (tmp_path / "2").mkdir()
    _, single, single_logged = grads_after_fit(tmp_path / "1", 1)
    ranks, _, ddp_logged = grads_after_fit(tmp_path / "2", 2)
    assert ranks[0]["label_totals"][1] > 0 == ranks[1]["label_totals"][1]  # the ranks' labels differ
    for name, param in single.named_parameters():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), f"{name} differs across ranks"
        torch.testing.assert_close(ranks[0]["params"][name], param.detach(), rtol=1e-5, atol=1e-6)
    assert ddp_logged["gradroute/grad_norm/enc/retain/8:"] == 0 < ddp_logged["gradroute/grad_norm/enc/retain/all"]
    torch.testing.assert_close(ddp_logged["train/loss_retain"], single_logged["train/loss_retain"], rtol=1e-5, atol=0)
