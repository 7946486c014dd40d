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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_gradroute.grad import route_gradient_by_label
from lightning_gradroute.labels import check_labels
from lightning_gradroute.targets import (
    SYMBOLIC_UNITS,
    Route,
    Target,
    UnitGroups,
    feature_size_hint,
    resolve_modules,
    unit_indices,
)

__all__ = ["GradientRouter", "RoutedSite"]


class RoutedSite:
    """One hooked tensor: a (module, site) pair of a target, with its per-label weight tables."""

    def __init__(
        self,
        router: GradientRouter,
        target_name: str,
        target: Target,
        module_name: str,
        routes: Sequence[Route],
        unit_groups: Mapping[str, Sequence[int]] | None,
    ) -> None:
        self.router = router
        self.target_name = target_name
        self.target = target
        self.module_name = module_name
        self.routes = list(routes)
        self.unit_groups = dict(unit_groups or {})
        self._tables: dict[tuple[int, torch.device], Tensor] = {}

    @property
    def where(self) -> str:
        return f"target {self.target_name!r} (module {self.module_name!r}, {self.target.site})"

    def build_table(self, size: int) -> Tensor:
        """The ``(num_labels, size)`` float32 weight table; rows of labels without routes are all ones."""
        labels = self.router.label_names
        table = torch.ones(len(labels), size)
        target_units = set(unit_indices(self.target.units, size, self.unit_groups, self.where))
        for route in self.routes:
            row = labels.index(route.label)
            for units, weight in route.unit_weights():
                selected = target_units
                if units is not None:
                    selected = target_units.intersection(unit_indices(units, size, self.unit_groups, self.where))
                table[row, sorted(selected)] = weight
        return table

    def check_unit_groups(self) -> None:
        """Raise now if a symbolic unit group is used here that no expansion defined (sizes may be unknown)."""
        used = [self.target.units] + [units for route in self.routes for units, _ in route.unit_weights()]
        for units in used:
            if isinstance(units, str) and units in SYMBOLIC_UNITS and units not in self.unit_groups:
                unit_indices(units, 0, self.unit_groups, self.where)  # raises the standard message

    def table(self, size: int, device: torch.device) -> Tensor:
        key = (size, device)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = self.build_table(size).to(device)
        return table

    def route(self, x: Any) -> Any:
        labels = self.router.current_labels
        if labels is None or not isinstance(x, Tensor) or not x.requires_grad:
            return x
        feature_dim = self.target.feature_dim % x.dim() if x.dim() else 0
        if tuple(x.shape[: labels.dim()]) != tuple(labels.shape) or feature_dim < labels.dim():
            raise ValueError(
                f"{self.where}: labels of shape {tuple(labels.shape)} do not match the activation of shape "
                f"{tuple(x.shape)} (labels must equal its leading dims, before feature dim {feature_dim})"
            )
        return route_gradient_by_label(x, labels, self.table(x.shape[feature_dim], x.device), feature_dim)

    def _pick(self, value: Any, what: str) -> tuple[Any, int | None]:
        index = self.target.output_index
        if isinstance(value, tuple):
            if index is None:
                raise ValueError(
                    f"{self.where}: the module's {what} is a tuple of {len(value)}; set output_index on the Target"
                )
            return value[index], index
        return value, None

    def output_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        value, index = self._pick(output, "output")
        if index is None:
            return self.route(value)
        return (*output[:index], self.route(value), *output[index + 1 :])

    def input_hook(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        if not args:
            raise ValueError(f"{self.where}: the module was called with no positional input to route")
        index = self.target.output_index or 0
        return (*args[:index], self.route(args[index]), *args[index + 1 :])


class GradientRouter:
    """Routes gradients of chosen activations by per-example or per-token labels.

    Args:
        targets: named :class:`Target` s, e.g. ``{"mlp": Target("transformer.h.*.mlp.act")}``.
        routes: :class:`Route` s referring to those target names and to ``labels``.
        labels: the label names; integer labels in a batch index this list. Soft (float) labels need exactly
            two names and give the degree of membership in the second.

    Raises:
        ValueError: empty targets, duplicate label names, a route naming an unknown label or target.
    """

    def __init__(
        self,
        targets: Mapping[str, Target],
        routes: Sequence[Route],
        labels: Sequence[str] = ("retain", "forget"),
    ) -> None:
        if not targets:
            raise ValueError("GradientRouter: no targets given")
        for name, target in targets.items():
            if not isinstance(target, Target):
                raise ValueError(f"GradientRouter: target {name!r} must be a Target, got {type(target).__name__}")
        labels = list(labels)
        if not labels or len(set(labels)) != len(labels) or not all(isinstance(x, str) and x for x in labels):
            raise ValueError(f"GradientRouter: label names must be unique non-empty strings, got {labels!r}")
        for route in routes:
            if not isinstance(route, Route):
                raise ValueError(f"GradientRouter: routes must be Route objects, got {type(route).__name__}")
            if route.label not in labels:
                raise ValueError(f"Route {route.label!r} -> {route.target!r}: unknown label; labels are {labels}")
            if route.target not in targets:
                raise ValueError(
                    f"Route {route.label!r} -> {route.target!r}: unknown target; targets are {sorted(targets)}"
                )
        self.targets = dict(targets)
        self.routes = list(routes)
        self.label_names = labels
        self.sites: list[RoutedSite] = []
        self._handles: list[RemovableHandle] = []
        self._labels: Tensor | None = None

    # ------------------------------------------------------------------ hooks
    @property
    def is_attached(self) -> bool:
        return bool(self._handles)

    def attach(self, model: nn.Module, unit_groups: UnitGroups | None = None) -> GradientRouter:
        """Resolve every target on ``model`` and register its hooks.

        Unit selections are checked now wherever the module type tells the feature size (Linear, Embedding,
        LayerNorm, HF Conv1D), otherwise at the first routed forward.

        Args:
            model: the module whose ``named_modules()`` the target patterns match.
            unit_groups: ``{(module_name, site): {"expanded": [...], "original": [...]}}`` from an expansion.
        """
        if self.is_attached:
            raise RuntimeError("GradientRouter.attach: already attached; call detach() first")
        groups = unit_groups or {}
        sites: list[tuple[RoutedSite, nn.Module]] = []
        for target_name, target in self.targets.items():
            routes = [r for r in self.routes if r.target == target_name]
            for module_name, module in resolve_modules(model, target, target_name):
                site_groups = groups.get((module_name, target.site))
                site = RoutedSite(self, target_name, target, module_name, routes, site_groups)
                site.check_unit_groups()
                size = feature_size_hint(module, target.site) if target.feature_dim == -1 else None
                if size is not None:
                    site.build_table(size)  # fail now, not at step 1, on out-of-range or undefined units
                sites.append((site, module))
        for site, module in sites:
            if site.target.site == "output":
                handle = module.register_forward_hook(site.output_hook)
            else:
                handle = module.register_forward_pre_hook(site.input_hook)
            self._handles.append(handle)
        self.sites = [site for site, _ in sites]
        return self

    def detach(self) -> None:
        """Remove every hook this router registered (and only those)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.sites = []
        self._labels = None

    @contextlib.contextmanager
    def attached(self, model: nn.Module, unit_groups: UnitGroups | None = None) -> Iterator[GradientRouter]:
        """Context manager: hooks exist inside the block only."""
        self.attach(model, unit_groups)
        try:
            yield self
        finally:
            self.detach()

    # ----------------------------------------------------------------- labels
    @property
    def current_labels(self) -> Tensor | None:
        return self._labels

    def set_labels(self, labels: Tensor) -> Tensor:
        """Validate and hold ``labels`` for every routed forward (and recomputation) until :meth:`clear_labels`."""
        self._labels = check_labels(labels, self.label_names)
        return self._labels

    def clear_labels(self) -> None:
        self._labels = None

    @contextlib.contextmanager
    def route(self, labels: Tensor) -> Iterator[Tensor]:
        """Route every forward and backward inside the block with ``labels``; outside it, nothing is routed."""
        if not self.is_attached:
            raise RuntimeError("GradientRouter.route: attach the router to a model first")
        if self._labels is not None:
            raise RuntimeError("GradientRouter.route: already routing a batch; nested route() is not supported")
        checked = self.set_labels(labels)
        try:
            yield checked
        finally:
            self.clear_labels()

    def describe(self) -> str:
        """One line per hooked site: which module, which units get which weight per label."""
        lines = []
        for site in self.sites:
            per_label = {r.label: r.weights for r in site.routes}
            lines.append(f"{site.target_name}: {site.module_name} [{site.target.site}] {per_label or 'no routes'}")
        return "\n".join(lines)
