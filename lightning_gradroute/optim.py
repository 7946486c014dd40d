"""Optimizers whose state stays clean where parameter routing blocked learning.

A plain AdamW moves a parameter slice that got an exactly zero gradient: its moments decay, its step count (and
so its bias correction) advances, weight decay shrinks it. So when forget data may only change some units of a
layer, the others still drift on every forget-only step (the leak SGTM's shared output projections have). The
optimizers here read, for every parameter a :class:`~lightning_gradroute.GradientRouter` routes, which units some
item of the step (all micro-batches, all ranks) was allowed to change, and touch nothing else:

* a blocked unit gets no moment update, no step-count advance and no weight decay: its value and its optimizer
  state are bit-identical before and after the step;
* an allowed unit is updated by the usual formula with its own step count;
* parameters no router routes are updated exactly as ``torch.optim.AdamW`` / ``SGD`` (``foreach=False``) do.

"Allowed" comes from the routes, not from the gradient's value: unit ``u`` of a parameter is allowed in a step
when some item whose label gives ``u`` a nonzero weight reached it (for embedding rows: read it). Under DDP the
flags are OR-reduced over ranks in ``step`` (one small all-reduce).

``RoutedAdamW(split_moments=True)`` keeps moments per label instead: each label's share of the gradient
updates that label's moments (and step counts) where the label was allowed, and the update is the sum of the
labels' Adam updates. Backward then computes one weight gradient per label; build the optimizer after the
router is attached (in Lightning, ``configure_optimizers`` runs after the callback's ``setup``).

Example (Lightning)::

    def configure_optimizers(self):
        return RoutedAdamW(self.parameters(), lr=5e-4, weight_decay=0.1)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from lightning_gradroute._compat import local_slice
from lightning_gradroute.param_routing import RoutedParameter, routed_parameter

__all__ = ["RoutedAdamW", "RoutedSGD"]

def _step_records(optimizer: Optimizer, label_grads: bool) -> dict[int, tuple[RoutedParameter, Tensor, Tensor | None]]:
    """For each routed parameter of ``optimizer``: its routing, the units allowed this step (OR over ranks) and,
    with ``label_grads``, each label's gradient (averaged over ranks like DDP's gradients)."""
    records = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            route = routed_parameter(param)
            if route is None:
                continue
            if label_grads and not route.keep_label_grads:
                route.keep_label_grads = True
                raise ValueError(
                    f"{route.where}: build RoutedAdamW(split_moments=True) after attaching the router, so that "
                    "backward keeps each label's gradient"
                )
            allowed, per_label = route.pop_step()
            units = param.shape[route.dim]
            shape = (route.num_labels, units) if label_grads else (units,)
            if allowed is None:  # no backward reached it this step: nothing was allowed
                allowed = torch.zeros(shape, dtype=torch.bool, device=param.device)
            if label_grads and per_label is None:
                per_label = torch.zeros(route.num_labels, *param.shape, dtype=param.dtype, device=param.device)
            records.append((param, route, allowed, per_label))
    if records and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flags = torch.cat([a.flatten().to(torch.int32) for _, _, a, _ in records])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        sizes = [a.numel() for _, _, a, _ in records]
        allowed_all = [f.view_as(a).bool() for f, (_, _, a, _) in zip(flags.split(sizes), records)]
        records = [(p, r, a, g) for (p, r, _, g), a in zip(records, allowed_all)]
        for _, _, _, per_label in records:
            if per_label is not None:
                dist.all_reduce(per_label)
                per_label /= dist.get_world_size()
    return {id(p): (r, a, g) for p, r, a, g in records}


def _local(
    param: Tensor, record: tuple[RoutedParameter, Tensor, Tensor | None] | None
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """This rank's part of a parameter, of its gradient, of its allowed units and of its label gradients. Under
    FSDP2 a parameter is a ``DTensor``: the update runs on the local shard, so the allowed units (and the label
    gradients, which backward computes for the whole parameter) are cut to the shard's indices."""
    grad = param.grad
    allowed, label_grads = record[1:] if record is not None else (None, None)
    if not isinstance(param, DTensor):
        return param, grad, allowed, label_grads
    grad = grad.to_local() if isinstance(grad, DTensor) else grad
    for dim in range(param.dim()):
        span = local_slice(param, dim)
        if span is None:
            continue
        if label_grads is not None:
            label_grads = label_grads.narrow(dim + 1, span[0], span[1] - span[0])
        if allowed is not None and record is not None and dim == record[0].dim:
            allowed = allowed[..., span[0] : span[1]]
    return param.to_local(), grad, allowed, label_grads


def _along(route: RoutedParameter, values: Tensor, ndim: int) -> Tensor:
    """``values`` over the routed dim's units, shaped to broadcast against the parameter (``(..., units)``
    leading dims kept)."""
    lead = values.dim() - 1
    shape = [1] * ndim
    shape[route.dim] = values.shape[-1]
    return values.reshape(*values.shape[:lead], *shape)


class _RoutedOptimizer(Optimizer):
    """The step shared by the routed optimizers: run the closure, read the routing records, and update each
    parameter that has a gradient or a record, on this rank's part of it, with the subclass's ``_update_local``."""

    split_moments = False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        records = _step_records(self, self.split_moments)
        for group in self.param_groups:
            for param in group["params"]:
                record = records.get(id(param))
                if param.grad is None and record is None:
                    continue
                value, grad, allowed, label_grads = _local(param, record)
                route = record[0] if record is not None else None
                self._update_local(value, grad, self.state[param], group, route, allowed, label_grads)  # type: ignore[attr-defined]
        return loss


class RoutedAdamW(_RoutedOptimizer):
    """AdamW that leaves the units routing blocked untouched (see the module docstring).

    Args:
        params: parameters or parameter groups, as for ``torch.optim.AdamW``.
        lr, betas, eps, weight_decay: as for ``torch.optim.AdamW`` (decoupled weight decay).
        split_moments: keep Adam moments per label for routed parameters.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        split_moments: bool = False,
    ) -> None:
        if not 0.0 <= lr or not 0.0 <= eps or not 0.0 <= weight_decay:
            raise ValueError(f"RoutedAdamW: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"RoutedAdamW: betas must lie in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.split_moments = split_moments
        if split_moments:
            for group in self.param_groups:
                for param in group["params"]:
                    if (route := routed_parameter(param)) is not None:
                        route.keep_label_grads = True

    def _update_local(
        self, param: Tensor, grad: Tensor | None, state: dict[str, Any], group: dict[str, Any],
        route: RoutedParameter | None, allowed: Tensor | None, label_grads: Tensor | None,
    ) -> None:  # fmt: skip
        if route is None:
            self._plain(param, grad, state, group)  # type: ignore[arg-type]
        elif self.split_moments:
            self._split(param, state, group, route, allowed, label_grads)  # type: ignore[arg-type]
        else:
            self._masked(param, grad, state, group, route, allowed)  # type: ignore[arg-type]

    def _plain(self, param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """``torch.optim.AdamW``'s single-tensor update, op for op."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if not state:
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        param.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = state["step"].item()
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))

    def _adam_update(
        self, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, group: dict[str, Any]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """New moments and the Adam update (to subtract), out of place; ``step`` broadcasts (per unit)."""
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        new_avg = exp_avg.lerp(grad, 1 - beta1)
        new_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = (lr / (1 - beta1**step)).to(grad.dtype)  # float64 bias corrections, like torch's floats
        bias_correction2_sqrt = (1 - beta2**step).sqrt().to(grad.dtype)
        return new_avg, new_sq, step_size * new_avg / (new_sq.sqrt() / bias_correction2_sqrt).add_(eps)

    def _masked(
        self, param: Tensor, grad: Tensor | None, state: dict[str, Any], group: dict[str, Any], route: RoutedParameter,
        allowed: Tensor,
    ) -> None:  # fmt: skip
        """The AdamW update in place, with every per-unit factor 0 on the blocked units (their value and moments
        stay bit for bit). A blocked unit's gradient is 0 exactly (every item's weight there is 0), so it adds
        nothing to the moments; only their decay needs masking."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if not state:
            state.update(step=torch.zeros(allowed.shape[-1], dtype=torch.float64, device=param.device),
                         exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))  # fmt: skip
        state["step"] += allowed
        on = allowed.to(param.dtype)
        step = state["step"]
        # float64 bias corrections, like torch's Python floats; 1 where a unit never stepped (no 0 / 0)
        bias1 = torch.where(step > 0, 1 - beta1**step, 1.0)
        bias2_sqrt = torch.where(step > 0, (1 - beta2**step).sqrt(), 1.0).to(param.dtype)
        step_size = (lr / bias1 * allowed).to(param.dtype)
        exp_avg, exp_avg_sq, dims = state["exp_avg"], state["exp_avg_sq"], param.dim()
        if grad is None:
            grad = torch.zeros_like(param)
        param.mul_(_along(route, 1 - (lr * wd) * on, dims))
        exp_avg.lerp_(grad, _along(route, (1 - beta1) * on, dims))
        exp_avg_sq.mul_(_along(route, 1 - (1 - beta2) * on, dims)).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / _along(route, bias2_sqrt, dims)).add_(eps)
        param.addcmul_(exp_avg.div(denom), _along(route, step_size, dims), value=-1)

    def _split(
        self, param: Tensor, state: dict[str, Any], group: dict[str, Any], route: RoutedParameter, allowed: Tensor,
        label_grads: Tensor,
    ) -> None:  # fmt: skip
        labels, units = route.num_labels, allowed.shape[-1]
        if not state:
            moments = (labels, *param.shape)
            state.update(step=torch.zeros(labels, units, dtype=torch.float64, device=param.device),
                         exp_avg=param.new_zeros(moments), exp_avg_sq=param.new_zeros(moments))  # fmt: skip
        state["step"] += allowed
        total = torch.zeros_like(param)
        for label in range(labels):
            mask = _along(route, allowed[label], param.dim())
            exp_avg, exp_avg_sq = state["exp_avg"][label], state["exp_avg_sq"][label]
            step = _along(route, state["step"][label], param.dim())
            new_avg, new_sq, update = self._adam_update(label_grads[label], exp_avg, exp_avg_sq, step, group)
            total += torch.where(mask, update, 0.0)
            torch.where(mask, new_avg, exp_avg, out=exp_avg)
            torch.where(mask, new_sq, exp_avg_sq, out=exp_avg_sq)
        any_allowed = _along(route, allowed.any(0), param.dim())
        new_param = param.mul(1 - group["lr"] * group["weight_decay"]).sub_(total)
        torch.where(any_allowed, new_param, param, out=param)


class RoutedSGD(_RoutedOptimizer):
    """SGD (with momentum) that leaves the units routing blocked untouched (see the module docstring).

    Args:
        params: parameters or parameter groups.
        lr, momentum, dampening, weight_decay, nesterov: as for ``torch.optim.SGD``. A unit's momentum buffer
            starts at its first allowed step, as torch's starts at the first step.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"RoutedSGD: lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, "
                             f"{weight_decay}")  # fmt: skip
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("RoutedSGD: nesterov needs momentum > 0 and dampening 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults)

    def _update_local(
        self, param: Tensor, grad: Tensor | None, state: dict[str, Any], group: dict[str, Any],
        route: RoutedParameter | None, allowed: Tensor | None, label_grads: Tensor | None,
    ) -> None:  # fmt: skip
        """``torch.optim.SGD``'s single-tensor update, op for op, on the allowed units only."""
        lr, momentum, dampening, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
        grad = grad if grad is not None else torch.zeros_like(param)
        if wd != 0:
            grad = grad.add(param, alpha=wd)
        if momentum != 0:
            if route is None:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = grad.detach().clone()
                else:
                    buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            else:
                if not state:
                    started = torch.zeros(allowed.shape[-1], dtype=torch.bool, device=param.device)
                    state.update(momentum_buffer=torch.zeros_like(param), started=started)
                started = _along(route, state["started"], param.dim())
                old = state["momentum_buffer"]
                buf = torch.where(started, old.mul(momentum).add_(grad, alpha=1 - dampening), grad)
                torch.where(_along(route, allowed, param.dim()), buf, old, out=old)
                state["started"] |= allowed
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        if route is None:
            param.add_(grad, alpha=-lr)
        else:
            torch.where(_along(route, allowed, param.dim()), param.add(grad, alpha=-lr), param, out=param)
