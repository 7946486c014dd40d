"""Ablation for parameter routing without an expansion (SGTM-style): zero the units only the forget label trains.

With parameter routes such as ``Route("retain", "up", {"-64:": 0.0})`` and ``Route("forget", "up", {":-64":
0.0})``, the last 64 neurons of an MLP are *dedicated* to forget data: no other label may change them. SGTM
(Shilov et al. 2025) removes what they learned by zeroing them (its ``ablate()``). :func:`zero_dedicated_units`
does that for every parameter a router routes: the units whose weight is nonzero for ``label`` and zero for every
other label are set to 0.

Zeroing is exact removal, not an approximation, for the layouts the SGTM recipes route: an MLP neuron whose
input row and bias in ``c_fc`` are zero computes ``act(0) = 0`` (GELU), and its ``c_proj`` column is zero too; an
attention head whose ``q/k/v`` rows and ``out_proj`` columns are zero adds nothing to the residual stream. The
model keeps its shapes (the units are still there, as zeros), so it can be fine-tuned afterwards (the retraining
attack may re-grow them).
"""

from __future__ import annotations

import torch

from lightning_gradroute.router import GradientRouter

__all__ = ["dedicated_units", "zero_dedicated_units"]


def dedicated_units(router: GradientRouter, label: str = "forget") -> dict[str, tuple[int, list[int]]]:
    """``{parameter name: (dim, units)}``: the units of each routed parameter that only ``label`` may change.

    Raises:
        ValueError: the router is not attached to a model, routes no parameter, has no label ``label``, or no
            parameter has a unit dedicated to it.
    """
    if label not in router.label_names:
        raise ValueError(f"dedicated_units: the router has no label {label!r} (labels: {router.label_names})")
    if not router.parameters:
        raise ValueError("dedicated_units: the router routes no parameter (attach it, with ParameterTargets)")
    index = router.label_names.index(label)
    found = {}
    for routed in router.parameters:
        others = torch.cat([routed.table[:index], routed.table[index + 1 :]])
        only = (routed.table[index] != 0) & (others == 0).all(0)
        if bool(only.any()):
            found[routed.name] = (routed.dim, only.nonzero().flatten().tolist())
    if not found:
        raise ValueError(
            f"dedicated_units: no routed parameter has a unit that only {label!r} may change; route the other "
            f"labels away from some units (weight 0) to dedicate them to {label!r}"
        )
    return found


@torch.no_grad()
def zero_dedicated_units(router: GradientRouter, label: str = "forget") -> dict[str, int]:
    """Zero the units of every routed parameter that only ``label`` may change (see :func:`dedicated_units`).

    Returns:
        ``{parameter name: number of units zeroed}``.
    """
    units = dedicated_units(router, label)
    params = {routed.name: routed.param for routed in router.parameters}
    for name, (dim, index) in units.items():
        param = params[name]
        param.index_fill_(dim, torch.tensor(index, device=param.device), 0.0)
    return {name: len(index) for name, (_, index) in units.items()}
