"""Routed optimizers: blocked units keep value and state bit for bit, allowed units follow AdamW / SGD with their
own step counts, unrouted parameters step exactly like torch's optimizers.

A tiny linear model routes its weight's output units 0:2 away from forget items; batches are mixed,
forget-only or retain-only, so those units are blocked exactly on the forget-only steps. The reference for an
allowed unit is torch's own optimizer run on that unit alone, fed the same gradients on the steps it was allowed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from lightning_gradroute import GradientRouter, ParameterTarget, Route, RoutedAdamW, RoutedSGD

FORGET_BLOCKED = slice(0, 2)
SCHEDULE = ([0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1])  # mixed, forget, retain, ...


def model_and_router() -> tuple[nn.Module, GradientRouter]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    router = GradientRouter({"w": ParameterTarget("0.weight", dim=0)}, [Route("forget", "w", {"0:2": 0.0})])
    return model, router


def run(model: nn.Module, router: GradientRouter | None, optimizer: torch.optim.Optimizer,
        steps: int = len(SCHEDULE)) -> list[dict[str, Tensor]]:  # fmt: skip
    """Train on the schedule; return each step's gradients (taken before the optimizer step)."""
    gen = torch.Generator().manual_seed(1)
    grads = []
    for labels in SCHEDULE[:steps]:
        x, y = torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen)
        optimizer.zero_grad()

        def loss() -> Tensor:
            return (model(x) - y).pow(2).sum()

        if router is None:
            loss().backward()
        else:
            with router.route(torch.tensor(labels)):
                loss().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
    return grads


@pytest.mark.parametrize(
    ("ours", "torchs"),
    [
        (lambda p: RoutedAdamW(p, lr=0.05, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1,
                                                                                          foreach=False)),
        (lambda p: RoutedSGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
         lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01, foreach=False)),
        (lambda p: RoutedSGD(p, lr=0.1, momentum=0.9, nesterov=True),
         lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, foreach=False)),
    ],
    ids=["adamw", "sgd_momentum", "sgd_nesterov"],
)
def test_unrouted_parameters_step_exactly_like_torch(ours: Callable, torchs: Callable) -> None:
    model, _ = model_and_router()
    twin = copy.deepcopy(model)
    run(model, None, ours(model.parameters()))
    run(twin, None, torchs(twin.parameters()))
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name  # the same ops in the same order: equal on any machine


@pytest.mark.parametrize("make", [lambda p: RoutedAdamW(p, lr=0.05, weight_decay=0.1),
                                  lambda p: RoutedSGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)],
                         ids=["adamw", "sgd_momentum"])  # fmt: skip
def test_a_blocked_step_leaves_blocked_units_and_their_state_bit_identical(make: Callable) -> None:
    model, router = model_and_router()
    optimizer = make(model.parameters())
    weight = model[0].weight
    with router.attached(model):
        run(model, router, optimizer, steps=1)  # mixed: everything allowed
        before = weight.detach().clone()
        state = {k: v.clone() for k, v in optimizer.state[weight].items()}
        grad = run_from(model, router, optimizer, 1)  # the forget-only step
    assert torch.count_nonzero(grad[FORGET_BLOCKED]) == 0
    assert torch.equal(weight[FORGET_BLOCKED], before[FORGET_BLOCKED])
    assert not torch.equal(weight[2:], before[2:])  # the other units did learn
    assert set(optimizer.state[weight]) == set(state) and len(state) >= 2  # moments (and step counts / starts)
    for key, value in optimizer.state[weight].items():  # per-unit step counts, moments, momentum buffers
        assert torch.equal(value[FORGET_BLOCKED], state[key][FORGET_BLOCKED]), key
        assert not torch.equal(value[2:], state[key][2:]) or value.dtype == torch.bool, key


def run_from(model: nn.Module, router: GradientRouter, optimizer: torch.optim.Optimizer, index: int) -> Tensor:
    """Run step ``index`` of the schedule (with the schedule's random draws) and return the weight gradient."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(index):
        torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen)
    x, y = torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen)
    optimizer.zero_grad()
    with router.route(torch.tensor(SCHEDULE[index])):
        (model(x) - y).pow(2).sum().backward()
    grad = model[0].weight.grad.clone()
    optimizer.step()
    return grad


@pytest.mark.parametrize(
    ("ours", "torchs"),
    [
        (lambda p: RoutedAdamW(p, lr=0.05, betas=(0.8, 0.9), weight_decay=0.1),
         lambda p: torch.optim.AdamW(p, lr=0.05, betas=(0.8, 0.9), weight_decay=0.1, foreach=False)),
        (lambda p: RoutedSGD(p, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
         lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, foreach=False)),
    ],
    ids=["adamw", "sgd_momentum"],
)
def test_each_unit_follows_torchs_optimizer_over_the_steps_it_was_allowed(ours: Callable, torchs: Callable) -> None:
    model, router = model_and_router()
    initial = model[0].weight.detach().clone()
    with router.attached(model):
        grads = run(model, router, ours(model.parameters()))
    for rows, allowed_steps in ((FORGET_BLOCKED, [0, 2, 4]), (slice(2, 5), range(len(SCHEDULE)))):
        unit = initial[rows].clone().requires_grad_(True)
        reference = torchs([unit])
        for step in allowed_steps:
            unit.grad = grads[step]["0.weight"][rows].clone()
            reference.step()
        torch.testing.assert_close(model[0].weight[rows], unit.detach(), rtol=1e-6, atol=1e-7)


def test_split_moments_keep_one_adamw_per_label() -> None:
    """With one label per step, each step is that label's own AdamW step (its moments, its step count)."""
    model, router = model_and_router()
    schedule = ([0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0])
    with router.attached(model):
        optimizer = RoutedAdamW(model.parameters(), lr=0.05, weight_decay=0.0, split_moments=True)
        grads = []
        gen = torch.Generator().manual_seed(2)
        for labels in schedule:
            x, y = torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen)
            optimizer.zero_grad()
            with router.route(torch.tensor(labels)):
                (model(x) - y).pow(2).sum().backward()
            grads.append(model[0].weight.grad.clone())
            optimizer.step()
    reference = model_and_router()[0][0].weight.detach().clone().requires_grad_(True)
    per_label = [torch.optim.AdamW([reference], lr=0.05, weight_decay=0.0, foreach=False) for _ in range(2)]
    for labels, grad in zip(schedule, grads):
        reference.grad = grad.clone()
        if labels[0] == 1:  # forget: units 0:2 blocked, so the reference must leave them alone
            kept = reference.detach()[FORGET_BLOCKED].clone()
            per_label[1].step()
            with torch.no_grad():
                reference[FORGET_BLOCKED] = kept
        else:
            per_label[0].step()
    torch.testing.assert_close(model[0].weight, reference.detach(), rtol=1e-6, atol=1e-7)


def test_split_moments_need_the_router_first() -> None:
    model, router = model_and_router()
    optimizer = RoutedAdamW(model.parameters(), split_moments=True)  # built before attach: backward keeps nothing
    with router.attached(model):
        with router.route(torch.tensor([0, 1, 1, 0])):
            model(torch.randn(4, 3)).sum().backward()
        with pytest.raises(ValueError, match=r"build RoutedAdamW\(split_moments=True\) after attaching the router"):
            optimizer.step()
