"""ERA state: what an expansion did, which phase a model is in, how checkpoints carry it, and ablation.

This module owns the Expand-Route-Ablate state. The :class:`ExpansionRecord` (what :func:`~lightning_gradroute.expand`
added, as plain data) and the :class:`Phase` live on the model, as :func:`era_state`. Checkpoints carry them
under one key, in one schema, written by :func:`write_checkpoint` and read by :func:`read_checkpoint`::

    checkpoint["gradroute"] = {"version": 2, "phase": "expanded" | "zeroed" | "contracted", "expansion": {...}}

Ablation ends ERA: :func:`contract` removes the new units (the original architecture, every original parameter
the very tensor it was), :func:`zero_expanded` zeroes them and keeps the shapes, :func:`ablate_state_dict` does
either to a saved state dict without building the model (``gradroute ablate``), :func:`save_ablated` writes the
result as safetensors (and HF ``save_pretrained`` folders).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file, save_model
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from lightning_gradroute.new_units import remove_new_units

__all__ = [
    "CHECKPOINT_KEY",
    "EraState",
    "ExpansionRecord",
    "Phase",
    "ablate",
    "ablate_state_dict",
    "check_same_expansion",
    "contract",
    "era_state",
    "expansion_record",
    "read_checkpoint",
    "save_ablated",
    "set_era_state",
    "spec_hash",
    "write_checkpoint",
    "zero_expanded",
]

CHECKPOINT_KEY = "gradroute"
SCHEMA_VERSION = 2
_STATE_ATTR = "_gradroute_era"


class Phase(str, Enum):
    """Where a model is in ERA: new units training (``expanded``), zeroed in place, or removed."""

    EXPANDED = "expanded"
    ZEROED = "zeroed"
    CONTRACTED = "contracted"


@dataclass
class ExpansionRecord:
    """What :func:`~lightning_gradroute.expand` did, as plain data.

    Attributes:
        spec: the :class:`~lightning_gradroute.Expansion` s, as dicts.
        layers: ``{layer_name: {"role": "reads" | "writes" | "elementwise", "size": n, "inserts": [[pos, count]]}}``,
            every layer that got a :class:`~lightning_gradroute.new_units.NewUnits` branch.
        params: ``{param_name: shape}`` of the new parameters (``<layer>.new_units.weight`` / ``.bias``).
        attrs: ``{module_name: {attr: [original, expanded]}}`` size attributes that were changed (head counts).
        unit_groups: ``{(module_name, site): {"expanded": [...], "original": [...]}}`` for routes.
    """

    spec: list[dict[str, Any]]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    params: dict[str, list[int]] = field(default_factory=dict)
    attrs: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    unit_groups: dict[tuple[str, str], dict[str, list[int]]] = field(default_factory=dict)

    @property
    def spec_hash(self) -> str:
        return spec_hash(self.spec)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "layers": self.layers,
            "params": self.params,
            "attrs": self.attrs,
            "unit_groups": [[m, s, g] for (m, s), g in self.unit_groups.items()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpansionRecord:
        groups = {(m, s): dict(g) for m, s, g in data["unit_groups"]}
        return cls(list(data["spec"]), dict(data["layers"]), dict(data["params"]), dict(data["attrs"]), groups)

    def describe(self) -> str:
        return "; ".join(f"{e['modules']} +{e['add']} ({e['preset']})" for e in self.spec)


def spec_hash(spec: Sequence[Mapping[str, Any]]) -> str:
    """A short hash of the shape-defining part of an expansion spec (initialisation does not count)."""
    shape = [{k: v for k, v in e.items() if k not in ("init", "output_init")} for e in spec]
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class EraState:
    """A model's ERA state: its expansion record and phase. The record is kept after contraction."""

    record: ExpansionRecord
    phase: Phase = Phase.EXPANDED

    def to_dict(self) -> dict[str, Any]:
        return {"version": SCHEMA_VERSION, "phase": self.phase.value, "expansion": self.record.to_dict()}


# ---------------------------------------------------------------------------------------------- on the model
def era_state(model: nn.Module) -> EraState | None:
    """The ERA state of ``model`` (``None`` if it was never expanded)."""
    return model.__dict__.get(_STATE_ATTR)


def set_era_state(model: nn.Module, state: EraState) -> None:
    """Attach ``state`` to ``model`` (done by :func:`~lightning_gradroute.expand`)."""
    model.__dict__[_STATE_ATTR] = state


def expansion_record(model: nn.Module) -> ExpansionRecord | None:
    """The record of the expansion ``model`` carries now (``None`` if it is not expanded, or was contracted)."""
    state = era_state(model)
    return state.record if state is not None and state.phase is not Phase.CONTRACTED else None


# ---------------------------------------------------------------------------------------------- checkpoints
def write_checkpoint(checkpoint: dict[str, Any], model: nn.Module) -> None:
    """Record ``model``'s ERA state in ``checkpoint`` (idempotent; nothing for a never-expanded model)."""
    state = era_state(model)
    if state is not None:
        checkpoint[CHECKPOINT_KEY] = state.to_dict()


def read_checkpoint(checkpoint: Mapping[str, Any], where: str = "the checkpoint") -> EraState | None:
    """The ERA state saved in ``checkpoint`` (``None`` if it has none).

    Raises:
        ValueError: a ``gradroute`` entry in another schema version.
    """
    saved = checkpoint.get(CHECKPOINT_KEY)
    if not saved:
        return None
    if saved.get("version") != SCHEMA_VERSION:
        raise ValueError(
            f"{where} holds ERA state in schema version {saved.get('version', 1)}, this lightning-gradroute reads "
            f"version {SCHEMA_VERSION} (new units as branches); ablate it with the version that wrote it"
        )
    return EraState(ExpansionRecord.from_dict(saved["expansion"]), Phase(saved["phase"]))


def check_same_expansion(saved: ExpansionRecord | None, current: ExpansionRecord | None, who: str) -> None:
    """Raise if a checkpoint's expansion (``saved``) differs in shape from the model's (``current``)."""
    if (saved.spec_hash if saved else None) != (current.spec_hash if current else None):
        raise ValueError(
            f"{who}: the checkpoint was trained with expansions [{saved.describe() if saved else 'none'}], this "
            f"run has [{current.describe() if current else 'none'}]; resume or load with the same expansions"
        )


# ------------------------------------------------------------------------------------------------- ablation
def contract(model: nn.Module) -> nn.Module:
    """Remove every new unit of ``model`` (ERA's "ablate"), in place: the original architecture, with each
    original parameter the same tensor it was (carrying whatever training did to it)."""
    state = _expanded_state(model, "contract")
    for name in state.record.layers:
        remove_new_units(model.get_submodule(name))
    for module_name, attrs in state.record.attrs.items():
        module = model.get_submodule(module_name)
        for attr, (original, _) in attrs.items():
            setattr(module, attr, original)
    state.phase = Phase.CONTRACTED
    return model


def zero_expanded(model: nn.Module) -> nn.Module:
    """Zero every new parameter, keeping the expanded shapes. The model then computes exactly what the
    contracted one does: the new units' writing weights add ``+ 0``."""
    state = _expanded_state(model, "zero_expanded")
    with torch.no_grad():
        for name in state.record.params:
            model.get_parameter(name).zero_()
    state.phase = Phase.ZEROED
    return model


def ablate(model: nn.Module, mode: Literal["contract", "zero"]) -> Phase:
    """:func:`contract` or :func:`zero_expanded` ``model``; return the new phase."""
    if mode not in ("contract", "zero"):
        raise ValueError(f"ablate: mode must be 'contract' or 'zero', got {mode!r}")
    (contract if mode == "contract" else zero_expanded)(model)
    return era_state(model).phase  # type: ignore[union-attr]


def _expanded_state(model: nn.Module, what: str) -> EraState:
    state = era_state(model)
    if state is None or state.phase is Phase.CONTRACTED:
        raise ValueError(f"{what}: {type(model).__name__} is not expanded (no new units on it)")
    return state


def ablate_state_dict(
    state_dict: Mapping[str, Tensor],
    record: ExpansionRecord,
    mode: Literal["contract", "zero"] = "contract",
    prefix: str = "",
) -> dict[str, Tensor]:
    """A copy of an expanded ``state_dict`` with the new parameters removed (``"contract"``: the original
    architecture's keys) or zeroed (``"zero"``), without building the model (``gradroute ablate`` does this).

    ``prefix`` is prepended to the record's parameter names (e.g. ``"model."``). Other tensors are passed
    through (not copied).
    """
    if mode not in ("contract", "zero"):
        raise ValueError(f"ablate_state_dict: mode must be 'contract' or 'zero', got {mode!r}")
    out = dict(state_dict)
    for name in record.params:
        key = prefix + name
        if key not in out:
            raise ValueError(f"ablate_state_dict: the state dict has no {key!r}; was it saved from this expansion?")
        if mode == "contract":
            del out[key]
        else:
            out[key] = torch.zeros_like(out[key])
    return out


def save_ablated(model: nn.Module, directory: str | Path, hf: bool = True, write: bool = True) -> Path:
    """Save ``model``'s weights as ``directory/model.safetensors`` and, with ``hf``, every outermost HF
    ``PreTrainedModel`` inside it with ``save_pretrained`` to ``directory/hf/<its name>`` (``directory/hf`` for
    the model itself), so ``from_pretrained`` with the original config loads the contracted weights.

    A sharded model (FSDP2: ``DTensor`` parameters) is gathered into full, unsharded tensors first, which is a
    collective: call this on every rank, with ``write`` true on one (rank 0).
    """
    directory = Path(directory)
    full = _full_state_dict(model)
    if not write:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    if full is None:
        save_model(model, str(directory / "model.safetensors"))
    else:
        save_file({k: v.detach().contiguous() for k, v in full.items()}, str(directory / "model.safetensors"))
    if hf and importlib.util.find_spec("transformers") is not None:
        from transformers import PreTrainedModel

        outer: list[str] = []
        for name, module in model.named_modules():
            if isinstance(module, PreTrainedModel) and not any(name.startswith(f"{o}.") or not o for o in outer):
                outer.append(name)
                target = directory / "hf" / name if name else directory / "hf"
                prefix = f"{name}." if name else ""
                own = None if full is None else {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
                module.save_pretrained(target, state_dict=own)
    return directory


def _full_state_dict(model: nn.Module) -> dict[str, Tensor] | None:
    """The full (unsharded, CPU) state dict of a model with ``DTensor`` parameters, gathered from every rank (on
    rank 0; others get an empty dict); ``None`` for a model that is not sharded."""
    if not any(isinstance(t, DTensor) for t in model.state_dict().values()):
        return None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
