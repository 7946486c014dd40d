"""The routing primitive: identity in the forward pass, a data-dependent weight on the gradient.

Two entry points share one idea:

* :func:`route_gradient` takes any weight that broadcasts against ``x``.
* :func:`route_gradient_by_label` takes per-example / per-token labels and a small ``(labels, features)``
  weight table. It saves only the labels and the table and rebuilds the mask in backward, so memory does not
  grow with ``batch x seq x features``. This is what the router uses. With a ``forward_mask`` table it also
  multiplies the forward value by ``forward_mask[labels]`` (the router's forward masks, SGTM's retain mode).

Both return ``x.detach()`` re-attached to the graph through the routing function: the same storage (no copy,
bit-identical values for any weight and dtype), but not an autograd view, so an in-place op on the result (a
``ReLU(inplace=True)`` after the routed module) is allowed where it would be on ``x``. The weight is applied
as a tensor multiplication in backward, never as control flow, so a zero weight keeps every parameter in the
autograd graph (DDP with ``find_unused_parameters=False`` or ``static_graph`` keeps working).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BackwardObserver",
    "label_mask",
    "mask_forward",
    "route_gradient",
    "route_gradient_by_label",
    "table_rows",
]


class _RouteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        return x.detach()  # shares x's storage; a view_as view would forbid in-place ops downstream

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad * weight.to(grad.dtype), None


def route_gradient(x: Tensor, weight: Tensor | float) -> Tensor:
    """Return ``x`` unchanged; in backward, multiply its incoming gradient by ``weight``.

    Args:
        x: the activation to route.
        weight: a tensor broadcastable against ``x`` (or a float). Cast to ``x.dtype``. Any real value:
            1 lets learning through, 0 stops it, a fraction damps it, a negative value reverses it.

    Example::

        >>> x = torch.ones(2, 3, requires_grad=True)
        >>> y = route_gradient(x, torch.tensor([[1.0], [0.0]]))
        >>> y.sum().backward()
        >>> x.grad
        tensor([[1., 1., 1.],
                [0., 0., 0.]])
    """
    weight = torch.as_tensor(weight, device=x.device).to(x.dtype)
    try:
        torch.broadcast_shapes(weight.shape, x.shape)
    except RuntimeError:
        raise ValueError(
            f"route_gradient: weight of shape {tuple(weight.shape)} does not broadcast to x of shape {tuple(x.shape)}"
        ) from None
    if len(torch.broadcast_shapes(weight.shape, x.shape)) != x.dim():
        raise ValueError(f"route_gradient: weight of shape {tuple(weight.shape)} has more dims than x {tuple(x.shape)}")
    return _RouteGradient.apply(x, weight)


def label_mask(labels: Tensor, table: Tensor, feature_dim: int, ndim: int) -> Tensor:
    """Build the gradient mask for ``labels`` from a ``(num_labels, features)`` weight table.

    Integer labels select rows of ``table``. Float labels ``s`` in [0, 1] interpolate between row 0 and row 1:
    ``(1 - s) * table[0] + s * table[1]`` (the paper's soft masks). The result has the label dims first, the
    feature dim at ``feature_dim`` and size-1 dims elsewhere, so it broadcasts against an activation of ``ndim``
    dims without being expanded to its full size.
    """
    if labels.is_floating_point():
        soft = labels.unsqueeze(-1).to(table.dtype)
        mask = table[0] + soft * (table[1] - table[0])
    else:
        mask = table.index_select(0, labels.reshape(-1))  # ~3x faster than table[labels] on CPU
    k = labels.dim()
    trailing = ndim - feature_dim - 1
    return mask.reshape(*labels.shape, *([1] * (feature_dim - k)), table.shape[1], *([1] * trailing))


def table_rows(table: Tensor, labels: Tensor, dtype: torch.dtype) -> Tensor:
    """The weight table in the precision to build a mask of ``dtype`` from: hard labels gather rows, which
    commutes with the cast, so the small table is cast first; soft labels interpolate in fp32 (the table's) or
    wider (float64 gradients), and the result is cast once."""
    if labels.is_floating_point():
        return table.to(torch.promote_types(table.dtype, dtype))
    return table.to(dtype)


def mask_forward(x: Tensor, labels: Tensor, mask: Tensor, feature_dim: int) -> Tensor:
    """``x * mask[labels]`` along ``feature_dim``: the forward value of a forward mask (integer labels; ``mask``
    is a ``(num_labels, features)`` table of 0 and 1, so every kept value is ``x`` bit for bit)."""
    return x * label_mask(labels, mask.to(x.dtype), feature_dim % x.dim(), x.dim())


#: Called in backward with the routed gradient and the labels (coverage counters, gradient telemetry).
BackwardObserver = Callable[[Tensor, Tensor], None]


class _RouteGradientByLabel(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        labels: Tensor,
        table: Tensor,
        feature_dim: int,
        on_backward: BackwardObserver | None,
        forward_mask: Tensor | None,
    ) -> Tensor:
        ctx.save_for_backward(labels, table if forward_mask is None else table * forward_mask)
        ctx.feature_dim = feature_dim
        ctx.on_backward = on_backward
        if forward_mask is not None:
            return mask_forward(x, labels, forward_mask, feature_dim)
        return x.detach()  # shares x's storage; a view_as view would forbid in-place ops downstream

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        labels, table = ctx.saved_tensors
        mask = label_mask(labels, table_rows(table, labels, grad.dtype), ctx.feature_dim, grad.dim()).to(grad.dtype)
        # The mask is a fresh tensor: where it already has the gradient's shape (per-token labels), multiply into
        # it rather than allocating a third activation-sized buffer.
        routed = mask.mul_(grad) if mask.shape == grad.shape else grad * mask
        if ctx.on_backward is not None:
            ctx.on_backward(routed, labels)
        return routed, None, None, None, None, None


def route_gradient_by_label(
    x: Tensor,
    labels: Tensor,
    table: Tensor,
    feature_dim: int = -1,
    on_backward: BackwardObserver | None = None,
    forward_mask: Tensor | None = None,
) -> Tensor:
    """Return ``x`` unchanged; in backward, multiply its gradient by ``table[labels]`` along ``feature_dim``.

    Args:
        x: activation of shape ``(*labels.shape, ..., features, ...)``: the label dims lead.
        labels: integer label indices (rows of ``table``) or float soft labels in [0, 1] (interpolating
            between rows 0 and 1), of shape ``(B,)`` per example or ``(B, T)`` per token.
        table: ``(num_labels, features)`` gradient weights.
        feature_dim: the dim of ``x`` that indexes features.
        on_backward: called in backward as ``on_backward(routed_grad, labels)`` (the router counts with it that
            every site received a gradient, and measures per-label gradient norms when asked). It must not modify
            ``routed_grad``.
        forward_mask: a ``(num_labels, features)`` table of 0 and 1 (integer labels only): the forward returns
            ``x * forward_mask[labels]`` (:func:`mask_forward`) instead of ``x``, and backward multiplies by its
            derivative too, ``table * forward_mask``.

    Only ``labels`` and ``table`` are saved for backward; the full mask exists only transiently there.
    """
    feature_dim = feature_dim % x.dim()
    if tuple(x.shape[: labels.dim()]) != tuple(labels.shape) or feature_dim < labels.dim():
        raise ValueError(
            f"route_gradient_by_label: labels of shape {tuple(labels.shape)} must match the leading dims of x "
            f"{tuple(x.shape)} and precede its feature dim {feature_dim}"
        )
    if table.dim() != 2 or table.shape[1] != x.shape[feature_dim]:
        raise ValueError(
            f"route_gradient_by_label: table of shape {tuple(table.shape)} does not fit {x.shape[feature_dim]} "
            f"features at dim {feature_dim} of x {tuple(x.shape)}"
        )
    if forward_mask is not None and (labels.is_floating_point() or forward_mask.shape != table.shape):
        raise ValueError(
            f"route_gradient_by_label: a forward_mask needs integer labels (got {labels.dtype}) and the table's "
            f"shape {tuple(table.shape)} (got {tuple(forward_mask.shape)})"
        )
    return _RouteGradientByLabel.apply(x, labels, table, feature_dim, on_backward, forward_mask)
