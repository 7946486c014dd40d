"""SGTM's "retain mode" as a callback: in training, tokens labelled retain do not see the forget units.

SGTM (Shilov et al. 2025) zeroes the forget units' activations in the forward pass of retain data, in every one of
its strategies (parameter masking, activation routing, activation masking). So the retain data never learns to
rely on those units, and removing them afterwards costs the retain data nothing it was trained with. Gradient
routing alone never changes a forward value: without this, retain tokens still read the forget units (trained by
forget data only), the rest of the network adapts to them, and ablating them costs retain loss.

:class:`RetainMask` multiplies the named units of each matched site by 0 on every token whose routing label is
``label`` (``retain``), during training steps only; validation, the evaluation and anything after ``fit`` run
unmasked. Units are those of :class:`~lightning_gradroute.Target` (slices, lists, or ``"expanded"`` /
``"original"`` of an ERA expansion). Put it after the ``GradientRoutingCallback`` (whose expansion it may name);
its hooks are added at ``on_fit_start`` and removed at ``on_train_end``. After the first training batch it checks
that every matched site was masked (a site the step never reaches would mask nothing, silently).

Example (SGTM: MLP neurons 192: and attention dims 48: belong to forget data)::

    RetainMask([Target("model.transformer.h.*.mlp.act", units="192:"),
                Target("model.transformer.h.*.attn.attention.out_proj", site="input", units="48:")])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_gradroute.era import expansion_record
from lightning_gradroute.targets import Target, resolve_modules, unit_indices

__all__ = ["RetainMask"]


class RetainMask(Callback):
    """Zero ``targets``' units on training tokens labelled ``label`` (see the module docstring).

    Args:
        targets: where and which units: :class:`~lightning_gradroute.Target` s with ``site`` and ``units``.
        label: the integer routing label whose tokens do not see the units (0: ``retain``).
        label_key: the batch key holding the integer labels, ``(B,)`` or ``(B, T)`` matching the site's leading
            dims.

    Raises:
        ValueError: in the constructor for no targets, ``units="all"`` or a structured-value target; at
            ``on_fit_start`` for a pattern matching no module; at the first training step for units the site does
            not have, for labels that are not integers of a fitting shape, and for a site the step never reached.
    """

    def __init__(self, targets: Sequence[Target], label: int = 0, label_key: str = "route_labels") -> None:
        if not targets:
            raise ValueError("RetainMask: give at least one target")
        for target in targets:
            if not isinstance(target, Target) or target.units == "all" or target.output_index is not None:
                raise ValueError(
                    f"RetainMask: targets must be Targets naming some units of a plain tensor site, got {target!r}"
                )
        self.targets = list(targets)
        self.label, self.label_key = label, label_key
        self._labels: Tensor | None = None
        self._handles: list[RemovableHandle] = []
        self._masked: dict[str, int] = {}  # per hooked site: forwards masked in training steps
        self._checked = False
        self._unit_masks: dict[tuple[str, int, torch.dtype, torch.device], Tensor] = {}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = expansion_record(pl_module)
        for target in self.targets:
            for name, module in resolve_modules(pl_module, target, "RetainMask"):
                groups = record.unit_groups.get((name, target.site)) if record is not None else None
                where = f"RetainMask at {name!r} ({target.site})"
                self._masked[where] = 0
                if target.site == "output":
                    hook = self._output_hook(target, groups, where)
                    self._handles.append(module.register_forward_hook(hook))
                else:
                    hook = self._input_hook(target, groups, where)
                    self._handles.append(module.register_forward_pre_hook(hook))

    def _keep(self, x: Tensor, target: Target, groups: Any, where: str) -> Tensor | None:
        """``x`` with the units zeroed on tokens of ``label``, or None when nothing is masked now."""
        labels = self._labels
        if labels is None or not torch.is_grad_enabled():
            return None
        self._masked[where] += 1
        if labels.is_floating_point() or tuple(labels.shape) != tuple(x.shape[: labels.dim()]):
            raise ValueError(
                f"{where}: needs integer labels whose shape leads the site's {tuple(x.shape)}; got "
                f"{tuple(labels.shape)} {labels.dtype}"
            )
        hidden = (labels == self.label).reshape(*labels.shape, *([1] * (x.dim() - labels.dim())))
        return x * torch.where(hidden, self._unit_mask(x, target, groups, where), 1.0)

    def _unit_mask(self, x: Tensor, target: Target, groups: Any, where: str) -> Tensor:
        """``(features,)``: 0 on the target's units, 1 elsewhere; built once per site, size, dtype and device."""
        key = (where, x.shape[-1], x.dtype, x.device)
        mask = self._unit_masks.get(key)
        if mask is None:
            units = torch.tensor(unit_indices(target.units, x.shape[-1], groups, where), device=x.device)
            mask = self._unit_masks[key] = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device).index_fill_(
                0, units, 0.0
            )
        return mask

    def _output_hook(self, target: Target, groups: Any, where: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
            return self._keep(output, target, groups, where) if module.training else None

        return hook

    def _input_hook(self, target: Target, groups: Any, where: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            masked = self._keep(args[0], target, groups, where) if module.training else None
            return None if masked is None else (masked, *args[1:])

        return hook

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._labels = batch[self.label_key]

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._labels = None
        if not self._checked:
            missed = [where for where, count in self._masked.items() if count == 0]
            if missed:
                raise ValueError(f"{missed[0]}: the training step never reached this site, so it masks nothing")
            self._checked = True

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._labels = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove()
