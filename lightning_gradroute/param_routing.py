"""Parameter-level routing: scale what each item contributes to a parameter's gradient, inside backward.

A :class:`~lightning_gradroute.targets.ParameterTarget` names parameters. While a router holds labels, a
``TorchFunctionMode`` (:class:`ParameterRoutingMode`) sees every differentiable use of a routed parameter and
runs it through an autograd function of its own:

* ``F.linear(x, W, b)`` (``nn.Linear``) and ``torch.addmm(b, x, W)`` (HF ``Conv1D``): the forward is the same
  call (bit-identical output); backward returns the input gradient unchanged and the weight gradient
  ``sum_i m_i * outer(grad_y_i, x_i)`` with each item's (example's or token's) weights ``m_i`` over the units of
  the routed dim: where the units fall into a few runs of equal weights (SGTM's shared and dedicated units), run
  by run, scaling the smaller operand slice before the same matmul; otherwise as one matmul on a masked
  operand. The bias gradient is ``sum_i m_i * grad_y_i``.
* ``F.embedding(ids, W)`` (``nn.Embedding``): ``grad_W[ids_i] += m_i * grad_y_i`` (features routed), or the
  weight of the row each item reads (vocabulary rows routed).

The weights are the same ``(labels, units)`` tables as activation routing (soft labels interpolate), built from
the routes. Because the weighting happens in each rank's own backward, it is exact before any all-reduce: under
DDP with different labels per rank, under gradient accumulation, in mixed batches. Any other differentiable use
of a routed parameter (``W.t()``, ``x @ W``, a layer norm) is an error naming the parameter and the op: it would
let every item's gradient through.

Activation checkpointing recomputes a forward inside backward, where the autograd engine runs without the
modes entered in forward. A forward pre-hook on each module holding a routed parameter re-enters the mode around
that module's recomputed call, so the replay runs the same routed functions and saves the same tensors. With
``use_reentrant=False`` (what HF ``gradient_checkpointing_enable`` and ``torch.utils.checkpoint`` recommend),
backward then differentiates the original forward's nodes, with the labels they were given. With
``use_reentrant=True`` the forward built no graph (it ran without grad) and backward differentiates the replay:
it routes with the labels the router holds at backward, so call backward while the labels of that forward are
held (inside :meth:`~lightning_gradroute.GradientRouter.route`; the callback does); without any, backward raises.

Backward also records, per parameter, which units some item was allowed to change since the last optimizer
step (read by :mod:`lightning_gradroute.optim`) and, for an optimizer that keeps moments per label, each
label's share of the gradient: as gradients of zero "sink" tensors (:class:`RoutedParameter`), not as Python
side effects, so that ``torch.compile`` traces the routed functions into one graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_gradroute import _compat
from lightning_gradroute.grad import label_mask, table_rows
from lightning_gradroute import labels as _labels
from lightning_gradroute.labels import label_counts, label_membership
from lightning_gradroute.architectures import find_parts
from lightning_gradroute.targets import (
    ParameterTarget,
    Route,
    RouteTable,
    raise_route_problems,
    Target,
    resolve_modules,
    resolve_parameters,
    route_table,
    telemetry_groups,
)

__all__ = ["ParameterRoutingMode", "RoutedParameter", "flat_labels", "resolve_routed_parameters", "routed_parameter"]

#: id(parameter) -> its RoutedParameter, for the routers attached now (a strong reference, dropped at detach: a
#: weak reference would stop ``torch.utils.swap_tensors``, which FSDP2 uses to move parameters).
_ROUTED: dict[int, RoutedParameter] = {}


def routed_parameter(param: Tensor) -> RoutedParameter | None:
    """How an attached router routes ``param`` (``None`` if none does)."""
    route = _ROUTED.get(id(param))
    return route if route is not None and route.param is param else None


class RoutedParameter:
    """One routed parameter: its ``(labels, units)`` weight table along ``dim`` and what backward recorded.

    Backward records through autograd, not by side effects (so that a compiled backward records too): each routed
    node takes the parameter's *sinks*, zero leaf tensors, as inputs and returns what it records as their
    gradients, which autograd sums into ``sink.grad`` over a step's backwards (accumulation included):

    * :attr:`allowed_sink` ``(labels, units)``: where a label present in the batch has a nonzero weight;
    * :attr:`label_grads_sink` ``(labels, *param.shape)``, while :attr:`keep_label_grads`: each label's share of
      the gradient (for an optimizer that keeps moments per label);
    * :attr:`grad_sq_sink` ``(labels, unit groups)``, while :attr:`telemetry`: each label's squared gradient norm
      per unit group (:attr:`grad_sq`).
    """

    def __init__(
        self, label_names: Sequence[str], target_name: str, target: ParameterTarget, name: str, param: nn.Parameter,
        dim: int, weights: Tensor, groups: tuple[list[str], Tensor] | None = None,
    ) -> None:  # fmt: skip
        self.num_labels = len(label_names)
        self.target_name = target_name
        self.target = target
        self.name = name
        self.param = param
        self.dim = dim
        self.table = weights.to(param.device)
        #: set by a routed forward (a constant store, which a compiled forward replays without a guard)
        self.used = False
        #: set once a step's record showed a gradient reached the parameter
        self.reached = False
        # The unit groups telemetry reports (:func:`~lightning_gradroute.targets.telemetry_groups`); default "all".
        names, matrix = groups if groups is not None else (["all"], torch.ones(weights.shape[1], 1))
        self.group_names, self._group_matrix = names, matrix.to(param.device)
        self.allowed_sink = _sink(self.num_labels, weights.shape[1], device=self.table.device)
        self.label_grads_sink: Tensor | None = None
        self.grad_sq_sink: Tensor | None = None
        self.runs = _column_runs(weights)


    @property
    def keep_label_grads(self) -> bool:
        """Whether backward records each label's gradient share (set by an optimizer that keeps moments per
        label)."""
        return self.label_grads_sink is not None

    @keep_label_grads.setter
    def keep_label_grads(self, keep: bool) -> None:
        if keep != self.keep_label_grads:
            shape = (self.num_labels, *self.param.shape)
            self.label_grads_sink = _sink(*shape, device=self.table.device) if keep else None

    @property
    def telemetry(self) -> bool:
        """Whether backward records :attr:`grad_sq` (set by a router with telemetry)."""
        return self.grad_sq_sink is not None

    @telemetry.setter
    def telemetry(self, on: bool) -> None:
        if on != self.telemetry:
            groups = self._group_matrix.shape[1]
            self.grad_sq_sink = _sink(self.num_labels, groups, device=self.table.device) if on else None

    @property
    def sinks(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self.allowed_sink, self.label_grads_sink, self.grad_sq_sink

    @property
    def grad_sq(self) -> Tensor | None:
        """``(labels, unit groups)`` squared gradient norms recorded since the last reset (``None``: none)."""
        return self.grad_sq_sink.grad if self.grad_sq_sink is not None else None

    @grad_sq.setter
    def grad_sq(self, value: None) -> None:
        if self.grad_sq_sink is not None:
            self.grad_sq_sink.grad = value

    @property
    def where(self) -> str:
        return f"parameter target {self.target_name!r} ({self.name!r}, dim {self.dim})"

    def register(self) -> None:
        if (other := routed_parameter(self.param)) is not None:
            raise ValueError(
                f"{self.where}: the parameter is already routed by {other.where} of another router or routing "
                "callback; route each parameter from one target: merge the two GradientRoutingCallbacks (or "
                "routers) into one"
            )
        _ROUTED[id(self.param)] = self

    def unregister(self) -> None:
        if routed_parameter(self.param) is self:
            del _ROUTED[id(self.param)]

    @property
    def owner_and_attribute(self) -> tuple[str, str]:
        """The name of the module holding the parameter, and the parameter's attribute name there."""
        owner, _, attribute = self.name.rpartition(".")
        return owner, attribute

    def run_scales(
        self, labels: Tensor, dtype: torch.dtype, select: bool = False
    ) -> list[tuple[int, int, Tensor | float]]:
        """Per run of units that share one column of the table: ``(start, stop, scale)``, the scale each item's
        gradient gets there: ``(items,)``, or the float 1.0 / 0.0 where every label's weight is that. With
        ``select``, a run whose weights are all 0 or 1 under integer labels gives instead the indices of the items
        whose weight is 1 (a long tensor): a gradient summed over those items only needs no scaling."""
        assert self.runs is not None
        scales: list[tuple[int, int, Tensor | float]] = []
        for start, stop, column, constant, binary in self.runs:
            if constant is not None:
                scales.append((start, stop, constant))
            elif labels.is_floating_point():
                low, high = column[0].to(dtype), column[1].to(dtype)
                scales.append((start, stop, low + labels.to(dtype) * (high - low)))
            elif select and binary:
                scales.append((start, stop, (column != 0).index_select(0, labels).nonzero().flatten()))
            else:
                scales.append((start, stop, column.to(dtype).index_select(0, labels)))
        return scales

    def item_weights(self, labels: Tensor, dtype: torch.dtype) -> Tensor:
        """``(items, units)``: the table row of each item's label (soft labels interpolate, in fp32 or wider)."""
        return label_mask(labels, table_rows(self.table, labels, dtype), 1, 2).to(dtype)

    def label_shares(self, labels: Tensor, dtype: torch.dtype) -> Tensor:
        """``(labels, items, units)``: each label's share of the item weights (membership times its row)."""
        membership = label_membership(labels, self.num_labels).to(dtype)  # (items, labels)
        return membership.t()[:, :, None] * self.table.to(dtype)[:, None, :]

    def allowed(self, labels: Tensor) -> Tensor:
        """``(labels, units)``: where a label present among ``labels`` has a nonzero weight (no pass over items)."""
        present = label_counts(labels, self.num_labels) > 0
        return (self.table != 0) & present[:, None]

    def grad_norms(self, label_grads: Tensor) -> Tensor:
        """``(labels, unit groups)``: each label's squared gradient norm per unit group (``label_grads``:
        ``(labels, *param.shape)``)."""
        square = label_grads.detach().float().square()
        per_unit = square.transpose(1, 1 + self.dim).reshape(self.num_labels, square.shape[1 + self.dim], -1).sum(2)
        return per_unit @ self._group_matrix.to(per_unit.device)

    def record(self, allowed: Tensor, label_grads: Tensor | None = None) -> None:
        """Add a record by hand, as a routed backward adds one: the allowed units (``(units,)`` for every label,
        or ``(labels, units)``) and each label's gradient share ``(labels, *param.shape)``."""
        allowed = allowed.to(self.allowed_sink.dtype).expand(self.allowed_sink.shape)
        _add_grad(self.allowed_sink, allowed)
        if label_grads is not None and self.label_grads_sink is not None:
            _add_grad(self.label_grads_sink, label_grads)

    def pop_step(self) -> tuple[Tensor | None, Tensor | None]:
        """The allowed units (``(units,)``, or ``(labels, units)`` with label gradients) and the label gradients
        recorded since the last call (for an optimizer step; ``None``: no backward reached the parameter); resets
        them."""
        recorded = self.allowed_sink.grad
        label_grads = self.label_grads_sink.grad if self.label_grads_sink is not None else None
        for sink in (self.allowed_sink, self.label_grads_sink):
            if sink is not None:
                sink.grad = None
        if recorded is None:
            return None, label_grads
        self.reached = True
        allowed = recorded > 0
        return (allowed if self.keep_label_grads else allowed.any(0)), label_grads

    def coverage_problem(self) -> str | None:
        if not self.used:
            return f"{self.where} was never used in a routed forward"
        if not self.reached and self.allowed_sink.grad is None:
            return f"{self.where} received no gradient in backward (its use does not reach the loss)"
        return None


def _sink(*shape: int, device: torch.device) -> Tensor:
    """A zero leaf that records through its gradient; stored as one broadcast zero, so it costs no memory of its
    own whatever its shape."""
    return torch.zeros((), device=device).expand(shape).requires_grad_()


#: At most this many runs of equal table columns take the per-run backward (see ``_by_runs``).
MAX_RUNS = 8


def _column_runs(weights: Tensor) -> list[tuple[int, int, Tensor, float | None, bool]] | None:
    """The table's columns as runs of equal ones, ``(start, stop, column, constant, binary)`` (``constant``: the
    weight every label has there, if one; ``binary``: every weight there is 0 or 1), or ``None`` beyond
    :data:`MAX_RUNS` runs."""
    columns = weights.detach().cpu()
    change = (columns[:, 1:] != columns[:, :-1]).any(0).nonzero().flatten().add(1).tolist()
    bounds = [0, *change, columns.shape[1]]
    if len(bounds) - 1 > MAX_RUNS:
        return None
    runs = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        column = columns[:, start]
        same = bool((column == column[0]).all()) and float(column[0]) in (0.0, 1.0)
        binary = bool(((column == 0) | (column == 1)).all())
        runs.append((start, stop, column.to(weights.device), float(column[0]) if same else None, binary))
    return runs


def _add_grad(sink: Tensor, value: Tensor) -> None:
    sink.grad = value.detach().clone() if sink.grad is None else sink.grad + value


def resolve_routed_parameters(
    model: nn.Module,
    target_name: str,
    target: ParameterTarget,
    routes: Sequence[Route],
    label_names: Sequence[str],
    expanded: Sequence[str] | None,
    allow_noop: bool,
) -> list[RoutedParameter]:
    """The :class:`RoutedParameter` s of one target, with their weight tables.

    ``expanded`` names the parameters an expansion added (``None`` without an expansion): by name, units
    ``"expanded"`` are all of those, ``"original"`` all of the others; by component, the expansion's units and the
    model's own. A route entry that selects nothing, is overridden or leaves every weight at 1 is an error only if
    it does so everywhere the target matched (a pattern may match original and new parameters alike).

    Raises:
        ValueError: see :func:`~lightning_gradroute.targets.resolve_parameters`, the route checks and, by
            component, :func:`~lightning_gradroute.architectures.find_parts`.
    """
    if target.component is not None:
        return _component_parameters(model, target_name, target, routes, label_names, expanded, allow_noop)
    found, tables = [], []
    for name, param, dim in resolve_parameters(model, target, target_name):
        size = param.shape[dim]
        groups = {}
        if expanded is not None:
            new = name in expanded
            groups = {"expanded": list(range(size)) if new else [], "original": [] if new else list(range(size))}
        where = f"parameter target {target_name!r} ({name!r}, dim {dim})"
        table = route_table(label_names, target.units, routes, size, groups, where)
        unit_groups = telemetry_groups(target.units, routes, size, groups, where)
        found.append(RoutedParameter(label_names, target_name, target, name, param, dim, table.weights, unit_groups))
        tables.append(table)
    _raise_everywhere(tables, routes, f"parameter target {target_name!r} (every matched parameter)", allow_noop,
                      target)  # fmt: skip
    return found


def _component_parameters(
    model: nn.Module, target_name: str, target: ParameterTarget, routes: Sequence[Route], label_names: Sequence[str],
    expanded: Sequence[str] | None, allow_noop: bool,
) -> list[RoutedParameter]:  # fmt: skip
    """Every weight and bias of the component's units in each part: one ``(labels, units)`` table per part, read
    out along each parameter's dim through the unit of each of its indices."""
    who = f"parameter target {target_name!r}"
    assert target.component is not None
    parts = find_parts(resolve_modules(model, Target(target.modules), target_name), target.component, who)
    found, tables = [], []
    for part in parts:
        params = part.param_units()
        count = part.unit_count
        groups = {}
        if expanded is not None:
            new = sorted({int(u) for p in params if ".new_units." in p.name for u in p.unit})
            groups = {"expanded": new, "original": sorted(set(range(count)) - set(new))}
        where = f"{who} ({part.where})"
        table = route_table(label_names, target.units, routes, count, groups, where)
        names, matrix = telemetry_groups(target.units, routes, count, groups, where)
        tables.append(table)
        for p in params:
            if not p.param.requires_grad:
                raise ValueError(f"{where}: {p.name!r} does not require grad; nothing to route")
            if p.group > 1:
                _check_whole_groups(table.weights, p.group, f"{where}: {p.name!r}")
            weights = table.weights[:, p.unit]
            found.append(RoutedParameter(label_names, target_name, target, p.name, p.param, p.dim, weights,
                                         (names, matrix[p.unit])))  # fmt: skip
    _raise_everywhere(tables, routes, f"{who} (every matched part)", allow_noop, target)
    return found


def _check_whole_groups(weights: Tensor, group: int, where: str) -> None:
    """A key/value head shared by ``group`` query heads can only be routed as they all are."""
    per_group = weights.reshape(weights.shape[0], -1, group)
    split = (per_group != per_group[..., :1]).any(2).any(0).nonzero().flatten().tolist()
    if split:
        j = split[0]
        raise ValueError(
            f"{where}: key/value head {j} serves query heads {j * group}-{(j + 1) * group - 1} (grouped KV), which "
            f"the routes weigh differently; route whole groups of {group} query heads"
        )


def _raise_everywhere(
    tables: Sequence[RouteTable], routes: Sequence[Route], where: str, allow_noop: bool, target: ParameterTarget
) -> None:
    """Raise for a route entry that routes nothing in every one of ``tables`` (reported as the last saw it)."""
    last = tables[-1]
    every = RouteTable(
        last.weights,
        list(routes),
        [[u for u in last.empty[k] if all(u in t.empty[k] for t in tables)] for k in range(len(routes))],
        [[u for u in last.shadowed[k] if all(u in t.shadowed[k] for t in tables)] for k in range(len(routes))],
        [all(t.identity[k] for t in tables) for k in range(len(routes))],
    )
    raise_route_problems(every, where, allow_noop, target.units)


def flat_labels(labels: Tensor, items: Sequence[int], where: str) -> Tensor:
    """The label of each of the ``prod(items)`` items an op sees, flattened.

    ``items`` are the op's item dims (all but the feature dim). The labels equal their leading dims (per-example
    labels then cover every token), or, for an op on a flattened ``(B * T, features)`` view, they fill its one
    item dim exactly (per token) or per example.
    """
    items = tuple(items)
    if items[: labels.dim()] == tuple(labels.shape):
        shape = (*labels.shape, *([1] * (len(items) - labels.dim())))
        return labels.reshape(shape).expand(items).reshape(-1)
    if len(items) == 1 and items[0] == labels.numel():
        return labels.reshape(-1)
    if len(items) == 1 and labels.dim() == 1 and labels.numel() and items[0] % labels.numel() == 0:
        return labels.repeat_interleave(items[0] // labels.numel())
    raise ValueError(
        f"{where}: labels of shape {tuple(labels.shape)} do not fit the {items} items it is used on (the batch, "
        "and the sequence for per-token labels, must lead)"
    )


# ------------------------------------------------------------------------------------------ backward math
#: What a routed node returns for one parameter's sinks (see :class:`RoutedParameter`).
Records = tuple[Tensor | None, Tensor | None, Tensor | None]
NO_RECORDS: Records = (None, None, None)


def _weighted(
    route: RoutedParameter, labels: Tensor, dtype: torch.dtype, combine: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Records]:
    """``combine(item_weights)`` (a gradient; ``combine`` may overwrite the weights it is given) and the records
    for the route's sinks."""
    allowed = route.allowed(labels)
    if not route.keep_label_grads and not route.telemetry:
        return combine(route.item_weights(labels, dtype)), (allowed, None, None)
    per_label = torch.stack([combine(share) for share in route.label_shares(labels, dtype)])
    return per_label.sum(0), _label_records(route, allowed, per_label)


def _fast(route: RoutedParameter) -> bool:
    """Whether the per-run backward applies: few runs of equal columns, no per-label records."""
    return route.runs is not None and not route.keep_label_grads and not route.telemetry


def _by_runs(route: RoutedParameter, labels: Tensor, units: Tensor, other: Tensor, units_first: bool) -> Tensor:
    """The weight gradient ``sum_i m_i * outer(units_i, other_i)`` (``units``: ``(items, units)``, the operand
    whose columns are the routed units) run by run: in a run every unit has the same item weight, so it scales
    whichever operand slice is smaller (or neither, or skips the matmul), not an ``(items, units)`` mask. Where a
    run's weights are 0 / 1 the matmul runs over the items of weight 1 only (fewer flops than unrouted training);
    where host syncs cost nothing (CPU, :func:`~lightning_gradroute.labels.syncs_are_costly`) and in eager mode
    only, since finding them (``nonzero``) synchronises a GPU with the host and gives a compiled graph a
    data-dependent shape. Each run's matmul writes into its slice of the gradient
    (``units_first``: the weight holds the units on dim 0), in the autocast dtype where autocast is on (an
    ``out=`` matmul is not autocast)."""
    device = units.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else units.dtype
    units, other = units.to(dtype), other.to(dtype)
    size = (units.shape[1], other.shape[1]) if units_first else (other.shape[1], units.shape[1])
    grad = units.new_empty(size)
    select = not _labels.syncs_are_costly(units) and not torch.compiler.is_compiling()
    for a, b, scale in route.run_scales(labels, dtype, select=select):
        out = grad[a:b] if units_first else grad[:, a:b]
        if isinstance(scale, float) and scale == 0.0 or isinstance(scale, Tensor) and scale.numel() == 0:
            out.zero_()
            continue
        block, right = units[:, a:b], other
        if isinstance(scale, Tensor) and scale.dtype == torch.long:  # the items of weight 1
            block, right = block.index_select(0, scale), other.index_select(0, scale)
        elif isinstance(scale, Tensor):
            if b - a <= other.shape[1]:
                block = block * scale[:, None]
            else:
                right = other * scale[:, None]
        if units_first:
            torch.mm(block.t(), right, out=out)
        else:
            torch.mm(right.t(), block, out=out)
    return grad


def _scaled_sum(block: Tensor, scale: Tensor | float) -> Tensor:
    """``sum_i scale_i * block_i``."""
    if isinstance(scale, float):
        return block.sum(0) if scale == 1.0 else block.new_zeros(block.shape[1])
    return scale @ block


def _label_records(route: RoutedParameter, allowed: Tensor, per_label: Tensor) -> Records:
    """The records of a gradient computed per label: its label gradients if kept, its norms with telemetry."""
    return (
        allowed,
        per_label if route.keep_label_grads else None,
        route.grad_norms(per_label) if route.telemetry else None,
    )


def _records_for(sinks: Sequence[Tensor | None], records: Records) -> Records:
    """``records`` as gradients of the sinks that exist (in their dtype)."""
    return tuple(  # type: ignore[return-value]
        None if sink is None or record is None else record.to(sink.dtype) for sink, record in zip(sinks, records)
    )


class _Autocast:
    """The autocast state of the forward, re-entered in backward (as ``torch.amp.custom_bwd`` does)."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type)

    def __call__(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


class _RoutedMatmul(torch.autograd.Function):
    """``F.linear(x, W, b)`` (``linear``: W ``(out, in)``) or ``torch.addmm(b, x, W)`` (W ``(in, out)``, x 2-D)
    with per-item weight and bias gradients and an untouched input gradient; the weight's and the bias's sinks
    (three each) follow, and receive their records as gradients."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor | None,
        routes: tuple[RoutedParameter | None, RoutedParameter | None], linear: bool, *sinks: Tensor | None,
    ) -> Tensor:  # fmt: skip
        ctx.save_for_backward(x, weight)
        # Labels ride on ctx, not among the saved tensors: a checkpointed replay saves only what the original
        # forward computed, and backward of the original node keeps the labels of its own forward.
        ctx.labels, ctx.routes, ctx.linear, ctx.autocast = labels, routes, linear, _Autocast(x.device.type)
        ctx.sinks = sinks
        if linear:
            return F.linear(x, weight, bias)
        return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        weight_route, bias_route = ctx.routes
        labels = _labels_of(ctx, weight_route or bias_route)
        grad_x = grad_w = grad_b = None
        weight_records = bias_records = NO_RECORDS
        with ctx.autocast():
            grad = grad_y.reshape(-1, grad_y.shape[-1])  # (items, out)
            inputs = x.reshape(-1, x.shape[-1])  # (items, in)
            if ctx.needs_input_grad[0]:
                grad_x = grad.mm(weight if ctx.linear else weight.t()).view(x.shape)
            if ctx.needs_input_grad[1]:
                # An (out, in) gradient; W is (out, in) in F.linear, (in, out) in addmm.
                if weight_route is not None and _fast(weight_route):
                    on_outputs = (weight_route.dim == 0) == ctx.linear  # the routed units are the outputs
                    units, other = (grad, inputs) if on_outputs else (inputs, grad)
                    grad_w = _by_runs(weight_route, labels, units, other, units_first=weight_route.dim == 0)
                    weight_records = (weight_route.allowed(labels), None, None)
                elif weight_route is None:
                    grad_w = grad.t().mm(inputs) if ctx.linear else inputs.t().mm(grad)
                elif (weight_route.dim == 0) == ctx.linear:  # the routed units are the outputs
                    grad_w, weight_records = _weighted(weight_route, labels, grad.dtype, lambda m: m.mul_(grad).t().mm(
                        inputs) if ctx.linear else inputs.t().mm(m.mul_(grad)))  # fmt: skip
                else:  # the routed units are the inputs
                    grad_w, weight_records = _weighted(weight_route, labels, grad.dtype, lambda m: grad.t().mm(
                        m.mul_(inputs)) if ctx.linear else m.mul_(inputs).t().mm(grad))  # fmt: skip
            if ctx.needs_input_grad[2]:
                if bias_route is None:
                    grad_b = grad.sum(0)
                elif _fast(bias_route):
                    runs = bias_route.run_scales(labels, grad.dtype)
                    parts = [_scaled_sum(grad[:, a:b], scale) for a, b, scale in runs]
                    grad_b, bias_records = torch.cat(parts), (bias_route.allowed(labels), None, None)
                else:
                    grad_b, bias_records = _weighted(bias_route, labels, grad.dtype, lambda m: m.mul_(grad).sum(0))
        records = _records_for(ctx.sinks[:3], weight_records) + _records_for(ctx.sinks[3:], bias_records)
        return grad_x, grad_w, grad_b, None, None, None, *records


class _RoutedEmbedding(torch.autograd.Function):
    """``F.embedding(ids, W, padding_idx)`` with per-item weight gradients; the weight's three sinks follow."""

    @staticmethod
    def forward(
        ctx: Any, ids: Tensor, weight: Tensor, labels: Tensor | None, route: RoutedParameter,
        padding_idx: int | None, *sinks: Tensor | None,
    ) -> Tensor:  # fmt: skip
        ctx.save_for_backward(ids)
        ctx.labels, ctx.route, ctx.padding_idx, ctx.rows = labels, route, padding_idx, weight.shape[0]
        ctx.autocast, ctx.sinks = _Autocast(weight.device.type), sinks
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        (ids,) = ctx.saved_tensors
        route: RoutedParameter = ctx.route
        labels = _labels_of(ctx, route)
        flat_ids = ids.reshape(-1)
        grad = grad_y.reshape(flat_ids.numel(), -1)  # (items, features)

        def scatter(contributions: Tensor) -> Tensor:
            out = grad.new_zeros(ctx.rows, grad.shape[1]).index_add_(0, flat_ids, contributions)
            if ctx.padding_idx is not None:
                out[ctx.padding_idx] = 0
            return out

        with ctx.autocast():
            if route.dim == 1:  # features: each item's weights over them
                grad_w, records = _weighted(route, labels, grad.dtype, lambda m: scatter(m.mul_(grad)))
            else:  # vocabulary rows: the weight of the row each item reads
                grad_w, records = _row_weighted(route, labels, flat_ids, grad, scatter)
        return None, grad_w, None, None, None, *_records_for(ctx.sinks, records)


def _labels_of(ctx: Any, route: RoutedParameter | None) -> Tensor:
    """The item labels of a routed node; a replay without labels is only ever differentiated by reentrant
    checkpointing."""
    if ctx.labels is None:
        where = route.where if route is not None else "a routed parameter"
        raise RuntimeError(
            f"{where}: recomputed in backward by reentrant activation checkpointing (use_reentrant=True) while no "
            "labels were held, so its gradient cannot be routed; call backward inside router.route(labels), or use "
            "use_reentrant=False (HF: gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
            "False}))"
        )
    return ctx.labels


def _row_weighted(
    route: RoutedParameter, labels: Tensor, ids: Tensor, grad: Tensor, scatter: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Records]:
    """Embedding rows routed: item ``i`` reads row ``ids_i``, so its weight is entry ``ids_i`` of its row."""
    membership = label_membership(labels, route.num_labels).to(grad.dtype)  # (items, labels)
    shares = membership * route.table.to(grad.dtype)[:, ids].t()  # (items, labels): label l's share per item
    reads = torch.zeros(route.num_labels, route.param.shape[0], dtype=grad.dtype, device=grad.device)
    touched = reads.index_add_(1, ids, (shares != 0).to(grad.dtype).t()) > 0  # rows read with a nonzero weight
    if not route.keep_label_grads and not route.telemetry:
        return scatter(grad * shares.sum(1, keepdim=True)), (touched, None, None)
    per_label = torch.stack([scatter(grad * shares[:, label, None]) for label in range(route.num_labels)])
    return per_label.sum(0), _label_records(route, touched, per_label)


# ------------------------------------------------------------------------------------------------- the mode
class ParameterRoutingMode(TorchFunctionMode):
    """Runs every differentiable use of a routed parameter through its routed autograd function (see the module
    docstring); any other differentiable use raises. Entered while a router holds labels.

    A parameter is recognised by identity. Sharding wrappers hand a module another tensor than the parameter
    during its forward (FSDP2 registers the unsharded parameter): :meth:`alias` maps that tensor to the route,
    from a forward pre-hook on the parameter's module (see ``GradientRouter.attach``).
    """

    def __init__(self, routes: Sequence[RoutedParameter], labels: Callable[[], Tensor | None]) -> None:
        super().__init__()
        self.routes: dict[int, tuple[Tensor, RoutedParameter]] = {id(r.param): (r.param, r) for r in routes}
        self.labels = labels
        #: the modules whose call, recomputed in backward, the mode was entered for (a plain attribute, not a
        #: property: dynamo traces the mode)
        self.replays: list[nn.Module] = []

    def replay_pre_hook(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook on a module holding a routed parameter: in a recomputation inside backward, enter the
        mode for the module's call (see the module docstring)."""
        if torch.compiler.is_compiling() or not torch.is_grad_enabled() or not _compat.in_backward():
            return
        if _compat.function_mode_active(self):
            return
        self.__enter__()
        self.replays.append(module)

    def replay_post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        """The forward hook (``always_call``) that leaves what :meth:`replay_pre_hook` entered."""
        if self.replays and self.replays[-1] is module:
            self.replays.pop()
            self.__exit__(None, None, None)

    def alias(self, tensor: Tensor, route: RoutedParameter) -> None:
        """Route ``tensor`` (what the module holds in place of the parameter right now) as ``route``."""
        self.routes[id(tensor)] = (tensor, route)

    def route_of(self, tensor: Any) -> RoutedParameter | None:
        # Only a Parameter can be routed (what a module holds, FSDP2's unsharded ones included); asking id() of any
        # other tensor would make dynamo guard on the identity of a batch and recompile at every step.
        entry = self.routes.get(id(tensor)) if isinstance(tensor, nn.Parameter) else None
        return entry[1] if entry is not None and entry[0] is tensor else None

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():  # optimizer steps, evaluation, backward formulas
            return func(*args, **kwargs)
        found = []  # plain loops: dynamo traces them (not a walrus inside a comprehension)
        for value in (*args, *kwargs.values()):
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                route = self.route_of(tensor)
                if route is not None:
                    found.append(route)
        if not found:
            return func(*args, **kwargs)
        labels = self.labels()
        handler = _HANDLERS.get(func)
        if handler is None or (labels is None and not self.replays):
            result = func(*args, **kwargs)
            outputs = result if isinstance(result, (list, tuple)) else (result,)
            if any(isinstance(t, Tensor) and t.requires_grad for t in outputs):
                raise ValueError(
                    f"{found[0].where}: used by {getattr(func, '__name__', func)}, which parameter routing cannot "
                    "route per item (it routes the weight and bias of F.linear, torch.addmm and F.embedding); use "
                    "activation routing there"
                )
            return result
        for route in found:
            route.used = True
        return handler(self, labels, found[0].where, *args, **kwargs)


def _items(mode: ParameterRoutingMode, labels: Tensor | None, items: Sequence[int], where: str) -> Tensor | None:
    """The flat labels of an op's items; in a replay, ``None`` where no labels fit it (the labels held at backward
    need not be this forward's: non-reentrant checkpointing discards the replay's nodes, and a reentrant backward
    then raises, see ``_labels_of``)."""
    if not mode.replays:
        return flat_labels(labels, items, where)
    try:
        return None if labels is None else flat_labels(labels, items, where)
    except ValueError:
        return None


def _sinks_of(routes: tuple[RoutedParameter | None, RoutedParameter | None]) -> list[Tensor | None]:
    return [sink for route in routes for sink in (route.sinks if route is not None else NO_RECORDS)]


def _linear(mode: ParameterRoutingMode, labels: Tensor | None, where: str, input: Tensor, weight: Tensor,
            bias: Tensor | None = None) -> Tensor:  # fmt: skip
    if mode.route_of(input) is not None:
        raise ValueError(f"{where}: used as the input of F.linear; only a weight or bias can be routed")
    items = _items(mode, labels, input.shape[:-1], where)
    routes = (mode.route_of(weight), mode.route_of(bias))
    return _RoutedMatmul.apply(input, weight, bias, items, routes, True, *_sinks_of(routes))


def _addmm(mode: ParameterRoutingMode, labels: Tensor | None, where: str, input: Tensor, mat1: Tensor, mat2: Tensor, *,
           beta: float = 1, alpha: float = 1) -> Tensor:  # fmt: skip
    if beta != 1 or alpha != 1 or mode.route_of(mat1) is not None or input.dim() != 1:
        raise ValueError(
            f"{where}: used by torch.addmm in a form parameter routing does not route (it routes addmm(bias, x, W) "
            "with a 1-d bias, beta = alpha = 1, as HF Conv1D calls it)"
        )
    items = _items(mode, labels, mat1.shape[:-1], where)
    routes = (mode.route_of(mat2), mode.route_of(input))
    return _RoutedMatmul.apply(mat1, mat2, input, items, routes, False, *_sinks_of(routes))


def _embedding(mode: ParameterRoutingMode, labels: Tensor | None, where: str, input: Tensor, weight: Tensor,
               padding_idx: int | None = None, max_norm: float | None = None, norm_type: float = 2.0,
               scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:  # fmt: skip
    route = mode.route_of(weight)
    if route is None or max_norm is not None or scale_grad_by_freq or sparse:
        raise ValueError(
            f"{where}: used by F.embedding in a form parameter routing does not route (the weight, without "
            "max_norm, scale_grad_by_freq or sparse)"
        )
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    items = _items(mode, labels, input.shape, where)
    return _RoutedEmbedding.apply(input, weight, items, route, padding_idx, *route.sinks)


_HANDLERS: dict[Any, Callable[..., Tensor]] = {F.linear: _linear, torch.addmm: _addmm, F.embedding: _embedding}
