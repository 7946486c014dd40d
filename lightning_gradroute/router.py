"""Installs routing hooks on a model, holds the current batch's labels and builds per-site weight tables.

:class:`GradientRouter` is the framework-free core: the Lightning callback drives it, and a plain PyTorch
loop can use it directly::

    router = GradientRouter(
        targets={"half": Target("encoder.out")},
        routes=[Route(label="forget", target="half", weights={"0:16": 0.0})],
    )
    with router.attached(model):
        for x, labels in loader:
            with router.route(labels):
                loss = model(x).pow(2).mean()
                loss.backward()
            opt.step(); opt.zero_grad()

Labels are kept fixed from ``route()``'s entry to its exit, so backward-time recomputation (activation
checkpointing re-runs forward hooks) sees the same labels as the forward pass. Masks never live in module
buffers (DDP would broadcast rank 0's), and routing is a tensor multiplication, never a branch on mask values.

:class:`~lightning_gradroute.ForwardMask` s (SGTM's retain mode) ride the same hooks: while labels are held, a
site with masks returns ``x * mask[labels]`` (0 on the masked units for the masked labels, 1 elsewhere), and its
backward multiplies by the same mask times the route weights.

A configuration either routes exactly what it says or raises: routes that cannot route anything fail in the
constructor or at :meth:`~GradientRouter.attach`, and after the first routed batch
:meth:`~GradientRouter.check_coverage` proves that every hooked site was called, routed and reached by a
gradient in backward (Python counters bumped by the hooks and the routing function; no device sync).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_gradroute.architectures import find_parts, is_conv1d, parameter_problem, site_problem, weight_dim
from lightning_gradroute.era import ExpansionRecord
from lightning_gradroute.grad import mask_forward, route_gradient_by_label
from lightning_gradroute.labels import check_labels, label_membership
from lightning_gradroute.param_routing import ParameterRoutingMode, RoutedParameter, resolve_routed_parameters
from lightning_gradroute.targets import (
    LATER_FIELDS,
    SYMBOLIC_UNITS,
    ForwardMask,
    ParameterTarget,
    Route,
    Target,
    UnitGroups,
    feature_size_hint,
    pick_value,
    raise_route_problems,
    resolve_modules,
    route_table,
    telemetry_groups,
    unit_indices,
    units_label,
)

__all__ = ["GradientRouter", "RoutedSite"]


class RoutedSite:
    """One hooked tensor: a (module, site) pair of a target, with its per-label weight and mask tables and
    counters.

    Counters (while labels are set): ``calls`` forwards that reached the hook (and so were masked, with masks),
    ``routed`` values that required grad and were routed, ``backward`` gradients that flowed back through the
    routing function.
    """

    def __init__(
        self,
        router: GradientRouter,
        target_name: str,
        target: Target,
        module_name: str,
        routes: Sequence[Route],
        unit_groups: Mapping[str, Sequence[int]] | None,
        masks: Sequence[ForwardMask] = (),
        unit_width: int = 1,
    ) -> None:
        self.router = router
        self.target_name = target_name
        self.target = target
        self.module_name = module_name
        self.routes = list(routes)
        self.masks = list(masks)
        #: features per unit (a head's ``head_dim``): tables are built over units, then widened to features
        self.unit_width = unit_width
        self.unit_groups = _units_of_features(dict(unit_groups or {}), unit_width, self.where)
        self.calls = self.routed = self.backward = 0
        self.grad_sq: Tensor | None = None  # (labels, unit groups) squared gradient norms, with telemetry on
        # Per (kind, size, device): the route weights, the forward mask, the telemetry group membership.
        self._cache: dict[tuple[str, int, torch.device], Tensor] = {}

    @property
    def where(self) -> str:
        return f"target {self.target_name!r} (module {self.module_name!r}, {self.target.site})"

    @property
    def known_size(self) -> int | None:
        """The feature size when it is known before any forward: from an expansion's groups or the module type."""
        if self.unit_groups:
            return sum(len(v) for v in self.unit_groups.values()) * self.unit_width
        return None

    # ------------------------------------------------------------------------------------------- tables
    def build_table(self, size: int) -> Tensor:
        """The ``(num_labels, size)`` float32 weight table; rows of labels without routes are all ones.

        Raises:
            ValueError: a route entry that selects none of the target's units or that later entries override
                entirely, or (unless the router allows it) a route whose row comes out all ones.
        """
        labels, units = self.router.label_names, self.target.units
        table = route_table(labels, units, self.routes, size, self.unit_groups, self.where)
        raise_route_problems(table, self.where, self.router.allow_noop, units)
        return table.weights

    def build_mask(self, size: int) -> Tensor:
        """The ``(num_labels, size)`` float32 forward mask: 0 on each mask's units (within the target's) for its
        label, 1 elsewhere.

        Raises:
            ValueError: a mask whose units miss the target's units here, or that covers every feature here.
        """
        labels, units = self.router.label_names, self.target.units
        table = route_table(labels, units, self._mask_routes, size, self.unit_groups, self.where)
        for mask, empty in zip(self.masks, table.empty):
            if empty:
                raise ValueError(
                    f"{mask}: units {empty[0]!r} do not intersect the target's units {units_label(units)!r} at "
                    f"{self.where}; it masks nothing"
                )
            if not table.weights[labels.index(mask.label)].any():
                raise ValueError(
                    f"{mask}: units {units_label(mask.units)!r} are every one of the {size} features at {self.where}"
                    ", so its whole value would be zero; name the units to hide"
                )
        return table.weights

    @property
    def _mask_routes(self) -> list[Route]:
        return [mask.as_route() for mask in self.masks]

    def check_unit_groups(self) -> None:
        """Raise now if a symbolic unit group is used here that no expansion defined (sizes may be unknown)."""
        used = [self.target.units] + [units for route in self.routes for units, _ in route.unit_weights()]
        for units in used + [mask.units for mask in self.masks]:
            if isinstance(units, str) and units in SYMBOLIC_UNITS and units not in self.unit_groups:
                unit_indices(units, 0, self.unit_groups, self.where)  # raises the standard message

    def _cached(self, kind: str, size: int, device: torch.device) -> Tensor:
        key = (kind, size, device)
        value = self._cache.get(key)
        if value is None:
            if size % self.unit_width:
                raise ValueError(f"{self.where}: {size} features are not whole units of {self.unit_width}")
            units = size // self.unit_width
            if kind == "groups":
                routes = self.routes + self._mask_routes
                value = telemetry_groups(self.target.units, routes, units, self.unit_groups, self.where)[1]
                value = value.repeat_interleave(self.unit_width, dim=0)
            else:
                value = self.build_table(units) if kind == "table" else self.build_mask(units)
                value = value.repeat_interleave(self.unit_width, dim=1)
            value = self._cache[key] = value.to(device)
        return value

    def table(self, size: int, device: torch.device) -> Tensor:
        """The route weights of :meth:`build_table`, built once per size and device."""
        return self._cached("table", size, device)

    def mask(self, size: int, device: torch.device) -> Tensor | None:
        """The forward mask of :meth:`build_mask` (built once per size and device), or None without masks."""
        return self._cached("mask", size, device) if self.masks else None

    def group_names(self) -> list[str]:
        """The unit groups gradient telemetry reports here: ``"all"`` and every selection a route or mask names."""
        names = ["all"]
        for route in self.routes + self._mask_routes:
            names += [units_label(u) for u, _ in route.unit_weights() if u is not None]
        return list(dict.fromkeys(names))

    def group_matrix(self, size: int, device: torch.device) -> Tensor:
        """``(size, groups)`` 0/1 float32 membership of every feature in each of :meth:`group_names`."""
        return self._cached("groups", size, device)

    # ------------------------------------------------------------------------------------------ routing
    def route(self, x: Any) -> Any:
        labels = self.router.current_labels
        assert labels is not None  # the hooks return early without labels
        self.calls += 1
        if not isinstance(x, Tensor):
            raise ValueError(
                f"{self.where}: the routed value is a {type(x).__name__}, not a tensor; point output_index at a "
                "tensor (or target another module)"
            )
        if not x.requires_grad and not self.masks:  # e.g. the no-grad first pass of reentrant checkpointing;
            return x  # check_coverage judges
        if self.target.feature_dim == -1 and x.dim() >= 4:
            raise ValueError(
                f"{self.where}: the value has shape {tuple(x.shape)}; feature_dim=-1 would route its last dim, which "
                "in a (B, C, H, W) value is a column of pixels, not a channel; set feature_dim=1 for channels (or "
                f"feature_dim={x.dim() - 1} if the last dim is what you mean)"
            )
        if self.target.sequence_first:  # (T, B, ...): lay the (B,) or (B, T) labels over its (T, B) dims
            labels = labels.t() if labels.dim() == 2 else labels.expand(x.shape[0], -1)
        feature_dim = self.target.feature_dim % x.dim() if x.dim() else 0
        if tuple(x.shape[: labels.dim()]) != tuple(labels.shape) or feature_dim < labels.dim():
            raise ValueError(
                f"{self.where}: labels of shape {tuple(labels.shape)} do not match the activation of shape "
                f"{tuple(x.shape)} (labels must equal its leading dims, before feature dim {feature_dim})"
            )
        mask = self.mask(x.shape[feature_dim], x.device)
        if not x.requires_grad:  # masked in any grad mode, so that a recomputation sees the same values
            return mask_forward(x, labels, mask, feature_dim)  # type: ignore[arg-type]
        self.routed += 1
        table = self.table(x.shape[feature_dim], x.device)
        return route_gradient_by_label(x, labels, table, feature_dim, self._on_backward, forward_mask=mask)

    def _on_backward(self, routed_grad: Tensor, labels: Tensor) -> None:
        self.backward += 1
        if self.router.telemetry:
            self._record_grad_norms(routed_grad, labels)

    def _record_grad_norms(self, routed_grad: Tensor, labels: Tensor) -> None:
        """Add the squared norm of the routed gradient per (label, unit group) to :attr:`grad_sq`."""
        feature_dim = self.target.feature_dim % routed_grad.dim()
        square = routed_grad.detach().float().square()
        other = [d for d in range(labels.dim(), square.dim()) if d != feature_dim]
        per_item = (square.sum(dim=other) if other else square).reshape(labels.numel(), -1)
        per_group = per_item @ self.group_matrix(per_item.shape[1], per_item.device)
        membership = label_membership(labels, len(self.router.label_names)).reshape(labels.numel(), -1)
        grad_sq = membership.float().T @ per_group
        self.grad_sq = grad_sq if self.grad_sq is None else self.grad_sq + grad_sq

    def output_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.router.current_labels is None:
            return None
        value, put = pick_value(output, self.target.output_index, f"{self.where}: the module's output", "route")
        return put(self.route(value))

    def input_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.router.current_labels is None:
            return None
        index = self.target.output_index
        if isinstance(index, str):
            if index not in kwargs:
                raise ValueError(
                    f"{self.where}: the module was called without keyword argument {index!r} "
                    f"(keywords: {sorted(kwargs)})"
                )
            return args, {**kwargs, index: self.route(kwargs[index])}
        position = 0 if index is None else index
        if not -len(args) <= position < len(args):
            raise ValueError(
                f"{self.where}: the module was called with {len(args)} positional inputs, none at position "
                f"{position}; route a keyword argument with output_index='name' (keywords: {sorted(kwargs)})"
            )
        routed = list(args)
        routed[position] = self.route(args[position])
        return tuple(routed), kwargs

    def coverage_problem(self) -> str | None:
        """Why this site routed nothing in the batches since attach, or ``None`` if it was called, routed and
        reached by a gradient."""
        if self.calls == 0:
            return (
                f"{self.where} was never called while routing (a container, a module the step does not use, or a "
                "torch.compile graph reused from a hook-less instance: see the README on torch.compile)"
                + (", so its forward masks masked nothing" if self.masks else "")
            )
        if self.masks and not self.routes:  # a mask-only site: called is masked, in any grad mode
            return None
        if self.routed == 0:
            return (
                f"{self.where} was called but its value never required grad (input data, frozen layers upstream, "
                "or torch.no_grad)"
            )
        if self.backward == 0:
            return f"{self.where} received no gradient in backward (its value does not reach the loss)"
        return None


def _check_specs(
    specs: Sequence[Any], kind: type, targets: Mapping[str, Any], labels: list[str], verb: str, merge: str
) -> None:
    """Raise for a route or mask (``kind``) of another type, naming an unknown label or target, or repeating a
    (label, target) pair (``merge`` says what to do instead)."""
    seen: dict[tuple[str, str], int] = {}
    for i, spec in enumerate(specs):
        if not isinstance(spec, kind):
            raise ValueError(f"GradientRouter: {verb}s must be {kind.__name__} objects, got {type(spec).__name__}")
        if spec.label not in labels:
            raise ValueError(f"{spec}: unknown label; labels are {labels}")
        if spec.target not in targets:
            raise ValueError(f"{spec}: unknown target; targets are {sorted(targets)}")
        key = (spec.label, spec.target)
        if key in seen:
            raise ValueError(
                f"{verb}s[{seen[key]}] and {verb}s[{i}] both {verb} label {spec.label!r} at target {spec.target!r}; "
                f"{merge}"
            )
        seen[key] = i


def _activation_sites(
    model: nn.Module, target_name: str, target: Target, routes: Sequence[Route], masks: Sequence[ForwardMask]
) -> list[tuple[str, nn.Module, Target, int]]:
    """``(module name, module, the target at that site, unit width)`` for each site a target hooks: the matched
    modules, or the sites of the component parts in them; each checked for routing something else than meant."""
    hits = resolve_modules(model, target, target_name)
    if target.component is None:
        sites = [(name, module, target, 1) for name, module in hits]
    else:
        sites = []
        for part in find_parts(hits, target.component, f"target {target_name!r}"):
            name, site, index, feature_dim, width = part.site()
            concrete = dataclasses.replace(target, modules=name, site=site, output_index=index,
                                           feature_dim=feature_dim, component=None)  # fmt: skip
            sites.append((name, model.get_submodule(name), concrete, width))
    units = [target.units] + [u for r in routes for u, _ in r.unit_weights() if u is not None]
    units += [m.units for m in masks]
    for name, module, site_target, _ in sites:
        if type(module).forward is nn.Module.forward:
            raise ValueError(
                f"target {target_name!r}: {name!r} is a {type(module).__name__}, a container that is never called; "
                f"target the modules inside it (e.g. '{name}.*')"
            )
        problem = site_problem(model, name, module, site_target.feature_dim, site_target.sequence_first, units,
                               bool(routes))  # fmt: skip
        if problem:
            raise ValueError(f"target {target_name!r}: {name!r} ({type(module).__name__}): {problem}")
    return sites


def _units_of_features(
    groups: dict[str, Sequence[int]], width: int, where: str
) -> dict[str, Sequence[int]]:
    """An expansion's feature groups as groups of ``width``-feature units (heads)."""
    if width == 1:
        return groups
    units = {}
    for name, features in groups.items():
        heads = sorted({f // width for f in features})
        if len(heads) * width != len(features):
            raise ValueError(f"{where}: the expansion's {name!r} features are not whole units of {width}")
        units[name] = heads
    return units


def _per_unit(routed: RoutedParameter) -> bool:
    return bool((routed.table != routed.table[:, :1]).any())


def _check_parameters_by_name(model: nn.Module, parameters: Sequence[RoutedParameter]) -> None:
    """Parameters routed by name that route part of a unit (see
    :func:`~lightning_gradroute.architectures.parameter_problem`), and a layer's bias routed unit by unit beside
    its weight routed along its inputs: a bias indexes outputs, so that pairs unit i of one with an unrelated unit
    i of the other (GPT-2's ``c_fc.weight`` with dim 0 beside ``c_fc.bias``)."""
    by_name = {p.name: p for p in parameters}
    for routed in parameters:
        owner, attribute = routed.owner_and_attribute
        layer = model.get_submodule(owner)
        if not (isinstance(layer, nn.Linear) or is_conv1d(layer)) or routed.target.component is not None:
            continue
        along_outputs = attribute == "bias" or routed.dim == weight_dim(layer, "out")

        def routed_alike(name: str, table: Tensor = routed.table) -> bool:
            other = by_name.get(name)
            return other is not None and other.table.shape == table.shape and bool((other.table == table).all())

        problem = parameter_problem(model, routed.name, along_outputs, _per_unit(routed), routed_alike)
        if problem:
            raise ValueError(f"{routed.where}: {problem}")
        bias = by_name.get(f"{owner}.bias" if owner else "bias")
        if attribute != "weight":
            continue
        if bias is None or not _per_unit(bias):  # a bias weighed alike everywhere pairs nothing
            continue
        if routed.dim != weight_dim(layer, "out"):
            raise ValueError(
                f"{routed.where} routes the layer's input features, while {bias.where} routes its outputs (a bias "
                f"has only those); route the weight with dim='out' to pair them"
            )


def _alias_parameter(
    mode: ParameterRoutingMode, routed: RoutedParameter, attribute: str, module: nn.Module, args: Any
) -> None:
    # A store at every call, even of the parameter itself: under torch.compile, dynamo traces a checkpointed
    # region's body without TorchFunctionModes, and this side effect makes it run that region eagerly instead,
    # where the mode and its replay hooks route it (tests/test_param_checkpointing.py proves the gradients).
    mode.alias(getattr(module, attribute), routed)


class GradientRouter:
    """Routes gradients of chosen activations, or of chosen parameters, by per-example or per-token labels.

    Args:
        targets: named :class:`Target` s (activations), e.g. ``{"mlp": Target("transformer.h.*.mlp.act")}``,
            and :class:`~lightning_gradroute.targets.ParameterTarget` s (parameters), side by side.
        routes: :class:`Route` s referring to those target names and to ``labels``; at most one per
            (label, target).
        labels: the label names; integer labels in a batch index this list. Soft (float) labels need exactly
            two names and give the degree of membership in the second.
        allow_noop: accept configurations that route nothing: an empty ``routes`` list, a target no route
            uses, a route whose weights are all 1 (an unrouted control run with the same callback, a sweep that
            includes weight 1). Off by default, because such a configuration is usually a mistake that no loss
            curve shows.
        telemetry: measure, in backward, the squared norm of the routed gradient reaching each unit group per
            label (see :meth:`pop_grad_norms`). Parameter targets then compute their gradient per label and sum
            it (as with a routed optimizer's ``split_moments``): the same gradient, up to float rounding. A
            mask's units are a group too, so its label's norm there shows 0.
        masks: :class:`~lightning_gradroute.ForwardMask` s: while labels are held, zero chosen units of an
            activation target in the forward pass for items of a label (SGTM's retain mode); at most one per
            (label, target). A target may carry routes, masks or both; with masks, labels must be integers.

    Raises:
        ValueError: empty targets, duplicate label names, a route or mask naming an unknown label or target, a
            mask on a parameter target, two routes (or masks) for the same label and target, and (without
            ``allow_noop``) route sets that route nothing.
    """

    def __init__(
        self,
        targets: Mapping[str, Target | ParameterTarget],
        routes: Sequence[Route],
        labels: Sequence[str] = ("retain", "forget"),
        allow_noop: bool = False,
        telemetry: bool = False,
        masks: Sequence[ForwardMask] = (),
    ) -> None:
        if not targets:
            raise ValueError("GradientRouter: no targets given")
        for name, target in targets.items():
            if not isinstance(target, (Target, ParameterTarget)):
                raise ValueError(
                    f"GradientRouter: target {name!r} must be a Target or ParameterTarget, got {type(target).__name__}"
                )
        labels = list(labels)
        if not labels or len(set(labels)) != len(labels) or not all(isinstance(x, str) and x for x in labels):
            raise ValueError(f"GradientRouter: label names must be unique non-empty strings, got {labels!r}")
        _check_specs(routes, Route, targets, labels, "route", "merge their weights into one Route (a mapping of "
                     "units to weights)")  # fmt: skip
        for route in routes:
            if route.is_identity and not allow_noop:
                raise ValueError(
                    f"Route {route.label!r} -> {route.target!r}: every weight is 1, so it routes nothing; remove "
                    "it (or pass allow_noop=True for a control run)"
                )
        _check_specs(masks, ForwardMask, targets, labels, "mask", "merge their units into one ForwardMask (a list "
                     "of indices)")  # fmt: skip
        for mask in masks:
            if not isinstance(targets[mask.target], Target):
                raise ValueError(
                    f"{mask}: target {mask.target!r} is a {type(targets[mask.target]).__name__}, which has no forward "
                    "value to mask; point the mask at an activation Target (e.g. the MLP's activation module)"
                )
        if not allow_noop:
            if not routes and not masks:
                raise ValueError("GradientRouter: no routes, so nothing is routed (pass allow_noop=True for a control)")
            unused = sorted(set(targets) - {r.target for r in routes} - {m.target for m in masks})
            if unused:
                raise ValueError(
                    f"GradientRouter: target {unused[0]!r} has no route, so it routes nothing; add a Route (or a "
                    "ForwardMask) for it or remove it"
                )
        self.targets = dict(targets)
        self.routes = list(routes)
        self.masks = list(masks)
        self.label_names = labels
        self.allow_noop = allow_noop
        self.telemetry = telemetry
        self.sites: list[RoutedSite] = []
        self.parameters: list[RoutedParameter] = []
        self.coverage_checked = False
        self._handles: list[RemovableHandle] = []
        self._labels: Tensor | None = None
        self._mode: ParameterRoutingMode | None = None
        self._mode_entered = False
        self._labels_checked = False

    @property
    def parameter_targets(self) -> list[str]:
        """The names of the parameter targets (routed inside backward rather than by hooks)."""
        return [name for name, target in self.targets.items() if isinstance(target, ParameterTarget)]

    # ------------------------------------------------------------------ hooks
    @property
    def is_attached(self) -> bool:
        return bool(self._handles or self.parameters)

    def attach(self, model: nn.Module, expansion: ExpansionRecord | UnitGroups | None = None) -> GradientRouter:
        """Resolve every target on ``model``: hooks for activation targets, the routed parameters of parameter
        targets.

        Unit selections are checked now wherever the feature size is known (parameters, an expansion's unit
        groups, or a Linear, Embedding, LayerNorm, convolution or HF Conv1D module), otherwise at the first routed
        forward.

        Args:
            model: the module whose ``named_modules()`` / ``named_parameters()`` the patterns match.
            expansion: the model's :class:`~lightning_gradroute.ExpansionRecord` (what ``expand`` returned), for
                the ``"expanded"`` / ``"original"`` units; or just its ``unit_groups`` (activation targets only).

        Raises:
            ValueError: a pattern matching nothing, a module and its descendant without ``nested``, a container
                that is never called (``ModuleList``), units out of range or routing nothing.
        """
        if self.is_attached:
            raise RuntimeError("GradientRouter.attach: already attached; call detach() first")
        record = expansion if isinstance(expansion, ExpansionRecord) else None
        groups = record.unit_groups if record is not None else (expansion or {})
        sites: list[tuple[RoutedSite, nn.Module]] = []
        parameters: list[RoutedParameter] = []
        for target_name, target in self.targets.items():
            routes = [r for r in self.routes if r.target == target_name]
            if isinstance(target, ParameterTarget):
                expanded = list(record.params) if record is not None else None
                parameters += resolve_routed_parameters(
                    model, target_name, target, routes, self.label_names, expanded, self.allow_noop
                )
                continue
            masks = [m for m in self.masks if m.target == target_name]
            for module_name, module, site_target, width in _activation_sites(model, target_name, target, routes, masks):
                site_groups = groups.get((module_name, site_target.site))
                site = RoutedSite(self, target_name, site_target, module_name, routes, site_groups, masks, width)
                site.check_unit_groups()
                size = site.known_size or feature_size_hint(module, site_target.site, site_target.feature_dim)
                if size is not None:  # fail now, not at step 1, on out-of-range units or routes routing nothing
                    device = next(module.parameters(), torch.empty(0)).device
                    site.table(size, device)
                    site.mask(size, device)
                sites.append((site, module))
        twice = [p.name for i, p in enumerate(parameters) if any(q.param is p.param for q in parameters[:i])]
        if twice:
            raise ValueError(f"GradientRouter: parameter {twice[0]!r} is matched by two parameter targets")
        _check_parameters_by_name(model, parameters)
        for routed in parameters:
            routed.register()
            routed.telemetry = self.telemetry
        if parameters:
            self._mode = ParameterRoutingMode(parameters, lambda: self._labels)
            for routed in parameters:  # see ParameterRoutingMode.alias: what the owner holds during its forward
                owner, attribute = routed.owner_and_attribute
                hook = functools.partial(_alias_parameter, self._mode, routed, attribute)
                self._handles.append(model.get_submodule(owner).register_forward_pre_hook(hook))
            held = {id(r.param) for r in parameters}
            for module in model.modules():  # every holder: a tied weight is held by two modules
                if any(id(p) in held for p in module.parameters(recurse=False)):
                    self._handles += [module.register_forward_pre_hook(self._mode.replay_pre_hook),
                                      module.register_forward_hook(self._mode.replay_post_hook, always_call=True)]
        for site, module in sites:
            if site.target.site == "output":
                handle = module.register_forward_hook(site.output_hook)
            else:
                handle = module.register_forward_pre_hook(site.input_hook, with_kwargs=True)
            self._handles.append(handle)
        self.sites = [site for site, _ in sites]
        self.parameters = parameters
        self.coverage_checked = self._labels_checked = False
        return self

    def detach(self) -> None:
        """Remove every hook this router registered (and only those) and stop routing its parameters."""
        self.clear_labels()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for routed in self.parameters:
            routed.unregister()
        self.sites, self.parameters, self._mode = [], [], None

    @contextlib.contextmanager
    def attached(
        self, model: nn.Module, expansion: ExpansionRecord | UnitGroups | None = None
    ) -> Iterator[GradientRouter]:
        """Context manager: hooks (and parameter routing) exist inside the block only."""
        self.attach(model, expansion)
        try:
            yield self
        finally:
            self.detach()

    # ----------------------------------------------------------------- labels
    @property
    def current_labels(self) -> Tensor | None:
        return self._labels

    def set_labels(self, labels: Tensor) -> Tensor:
        """Validate and hold ``labels`` for every routed forward (and recomputation) until :meth:`clear_labels`;
        with parameter targets, enter the :class:`~lightning_gradroute.param_routing.ParameterRoutingMode`."""
        # The first batch after attach is checked in full (clear errors); later ones on accelerators with a
        # device-side assertion, so that no step waits for the device.
        full = None if self._labels_checked else True
        checked = check_labels(labels, self.label_names, full=full)
        if self.masks and checked.is_floating_point():
            raise ValueError(
                f"GradientRouter: forward masks ({self.masks[0]}...) need integer labels, got {checked.dtype}: a soft "
                "label would scale the units rather than hide them; give hard labels (threshold them in a LabelSource)"
            )
        self._labels = checked
        self._labels_checked = True
        if self._mode is not None and not self._mode_entered:
            self._mode.__enter__()
            self._mode_entered = True
        return self._labels

    def clear_labels(self) -> None:
        self._labels = None
        if self._mode_entered:
            self._mode_entered = False
            self._mode.__exit__(None, None, None)  # type: ignore[union-attr]

    @contextlib.contextmanager
    def route(self, labels: Tensor) -> Iterator[Tensor]:
        """Route every forward and backward inside the block with ``labels``; outside it, nothing is routed.

        Call ``backward()`` inside the block: on the first exit after :meth:`attach`, :meth:`check_coverage`
        verifies that every site was called, routed and reached by a gradient.
        """
        if not self.is_attached:
            raise RuntimeError("GradientRouter.route: attach the router to a model first")
        if self._labels is not None:
            raise RuntimeError("GradientRouter.route: already routing a batch; nested route() is not supported")
        checked = self.set_labels(labels)
        try:
            yield checked
        finally:
            self.clear_labels()
        if not self.coverage_checked:
            self.check_coverage()

    # --------------------------------------------------------------- coverage
    def check_coverage(self) -> None:
        """Raise unless every site was called, routed and reached by a gradient since :meth:`attach`.

        Raises:
            ValueError: one line naming each site that routed nothing, and why.
        """
        problems = [p for p in (s.coverage_problem() for s in [*self.sites, *self.parameters]) if p]
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ValueError(f"gradient routing routed nothing at: {'; '.join(problems[:3])}{more}")
        self.coverage_checked = True

    def pop_grad_norms(self) -> dict[tuple[str, str, str], Tensor]:
        """Squared routed-gradient norms since the last call, per ``(target, label, unit group)``, summed over the
        target's sites (activation targets: the gradient reaching the activation) or parameters (parameter
        targets: each label's items' share of the parameter's gradient); resets them. Needs ``telemetry=True``.
        Every key is present (zero where no gradient came), so ranks return the same keys; values stay on their
        device (no sync)."""
        totals: dict[tuple[str, str, str], Tensor] = {}
        reported: list[tuple[str, list[str], Tensor | None]] = [
            (site.target_name, site.group_names(), site.grad_sq) for site in self.sites
        ]
        reported += [(routed.target_name, routed.group_names, routed.grad_sq) for routed in self.parameters]
        for target_name, names, grad_sq in reported:
            if grad_sq is None:
                grad_sq = torch.zeros(len(self.label_names), len(names))
            for column, group in enumerate(names):
                for row, label in enumerate(self.label_names):
                    key = (target_name, label, group)
                    value = grad_sq[row, column]
                    totals[key] = value if key not in totals else totals[key] + value.to(totals[key].device)
        for item in [*self.sites, *self.parameters]:
            item.grad_sq = None
        return totals

    def dedicated_units(self, label: str, against: Sequence[str] | None = None) -> dict[str, tuple[int, list[int]]]:
        """``{parameter name: (dim, units)}``: the units of each routed parameter that only ``label`` may change
        (weight nonzero for ``label``, zero for every label of ``against``, default every other label);
        parameters without such units are left out. Zeroing them (:func:`~lightning_gradroute.era.zero_units`) is
        SGTM's ablation for parameter routing; where unlabelled data trains in a default mode that may change
        everything, name the retain mode in ``against`` (SGTM's forget units are those its retain mode may not
        change).

        Raises:
            ValueError: an unknown label, a router that routes no parameter (not attached, or no
                :class:`~lightning_gradroute.ParameterTarget`), or no unit dedicated to ``label``.
        """
        others = [n for n in self.label_names if n != label] if against is None else list(against)
        unknown = [n for n in (label, *others) if n not in self.label_names]
        if unknown or label in others or not others:
            raise ValueError(
                f"dedicated_units: label {label!r} against {others} must name known, other labels; labels are "
                f"{self.label_names}"
            )
        if not self.parameters:
            raise ValueError("dedicated_units: the router routes no parameter; attach it, with ParameterTargets")
        index, rows = self.label_names.index(label), [self.label_names.index(n) for n in others]
        found = {}
        for routed in self.parameters:
            only = (routed.table[index] != 0) & (routed.table[rows] == 0).all(0)
            if bool(only.any()):
                found[routed.name] = (routed.dim, only.nonzero().flatten().tolist())
        if not found:
            raise ValueError(
                f"dedicated_units: no routed parameter has a unit that only {label!r} may change (against "
                f"{others}); route those labels away from some units (weight 0) to dedicate them to {label!r}"
            )
        return found

    def config(self) -> dict[str, Any]:
        """The routing configuration as plain data (JSON types): labels, targets, routes and (when there are any,
        so configs from before masks existed compare equal) masks; target fields added later are left out at
        their defaults for the same reason."""

        def plain(value: Any) -> Any:
            if isinstance(value, Mapping):
                return {str(k): plain(v) for k, v in value.items()}
            if isinstance(value, (tuple, list)):
                return [plain(v) for v in value]
            return value

        def spec(target: Target | ParameterTarget) -> dict[str, Any]:
            fields = plain(dataclasses.asdict(target))
            return {k: v for k, v in fields.items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}

        config = {
            "labels": list(self.label_names),
            "targets": {name: spec(t) for name, t in self.targets.items()},
            "routes": [plain(dataclasses.asdict(r)) for r in self.routes],
        }
        if self.masks:
            config["masks"] = [plain(dataclasses.asdict(m)) for m in self.masks]
        return config

    def describe(self) -> str:
        """One line per hooked site: which module, which units get which weight per label, which units each
        masked label does not see."""
        lines = []
        for site in self.sites:
            per_label = {r.label: r.weights for r in site.routes}
            masked = {m.label: units_label(m.units) for m in site.masks}
            line = f"{site.target_name}: {site.module_name} [{site.target.site}] {per_label or 'no routes'}"
            lines.append(line + (f", forward masks (zeroed units) {masked}" if masked else ""))
        for routed in self.parameters:
            per_label = {r.label: r.weights for r in self.routes if r.target == routed.target_name}
            where = f"{routed.name} [parameter, dim {routed.dim}]"
            lines.append(f"{routed.target_name}: {where} {per_label or 'no routes'}")
        return "\n".join(lines)
