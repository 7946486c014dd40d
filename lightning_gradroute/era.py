"""ERA state: what an expansion did, which phase a model is in, how checkpoints carry it, and ablation.

This module owns the Expand-Route-Ablate state and lifecycle. The :class:`ExpansionRecord` (what
:func:`~lightning_gradroute.expand` added, as plain data) and the :class:`Phase` live on the model, as
:func:`era_state`. Checkpoints carry them under one key, in one schema, written by :func:`write_checkpoint` and read
by :func:`read_checkpoint`::

    checkpoint["gradroute"] = {"version": 2, "phase": "expanded" | "zeroed" | "contracted", "expansion": {...}}

Ablation ends ERA: :func:`contract` removes the new units (the original architecture, every original parameter
the very tensor it was), :func:`zero_expanded` zeroes them and keeps the shapes, :func:`ablate_state_dict` does
either to a saved state dict without building the model (``gradroute ablate``), :func:`zero_units` zeroes the
units a router dedicates to one label (``"dedicated"``: parameter routing without an expansion, SGTM's ablation),
:func:`save_ablated` writes the result as safetensors (and HF ``save_pretrained`` folders). :class:`Ablation` lists
the modes, :meth:`Ablation.parse` checks them.

:class:`EraLifecycle` runs ERA in a ``fit`` (for the callback): expand at setup, ablate and save at fit end;
:func:`restore_checkpoint` is the one rule of loading a checkpoint's ERA state (the callback's and the mixin's).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from safetensors.torch import save_file, save_model
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from lightning_gradroute._compat import launched_by_multiprocessing, local_slice, strategy_family
from lightning_gradroute.new_units import remove_new_units

if TYPE_CHECKING:
    from lightning_gradroute.expansion import Expansion
    from lightning_gradroute.router import GradientRouter

__all__ = [
    "CHECKPOINT_KEY",
    "Ablation",
    "AblationMode",
    "EraLifecycle",
    "EraState",
    "ExpansionRecord",
    "Phase",
    "ablate",
    "ablate_state_dict",
    "check_same_expansion",
    "contract",
    "era_state",
    "expansion_record",
    "hf_folders",
    "read_checkpoint",
    "restore_checkpoint",
    "save_ablated",
    "set_era_state",
    "spec_hash",
    "write_checkpoint",
    "zero_expanded",
    "zero_units",
]

CHECKPOINT_KEY = "gradroute"
SCHEMA_VERSION = 2
_STATE_ATTR = "_gradroute_era"


class Phase(str, Enum):
    """Where a model is in ERA: new units training (``expanded``), zeroed in place, or removed."""

    EXPANDED = "expanded"
    ZEROED = "zeroed"
    CONTRACTED = "contracted"


#: The ablation modes as a type for signatures (YAML strings); :class:`Ablation` is the same list as an enum.
AblationMode = Literal["contract", "zero", "dedicated"]


class Ablation(str, Enum):
    """How ERA (or parameter routing) ends: ``contract`` removes an expansion's new units (the original
    architecture), ``zero`` zeroes them keeping the shapes, ``dedicated`` zeroes the units a router lets only one
    label change (parameter routing without an expansion, SGTM's ablation; see :func:`zero_units`)."""

    CONTRACT = "contract"
    ZERO = "zero"
    DEDICATED = "dedicated"

    @classmethod
    def parse(cls, value: Any, who: str, expansion: bool = False) -> Ablation:
        """``value`` (an :class:`Ablation` or its string) as an :class:`Ablation`; with ``expansion``, only the
        modes that ablate an expansion (``contract``, ``zero``).

        Raises:
            ValueError: one line naming ``who`` and the valid values.
        """
        valid = [mode for mode in cls if mode.phase is not None or not expansion]
        mode = cls._value2member_map_.get(value) if isinstance(value, str) else None
        if mode not in valid:
            raise ValueError(f"{who}: ablate mode must be one of {[v.value for v in valid]}, got {value!r}")
        return mode  # type: ignore[return-value]

    @property
    def phase(self) -> Phase | None:
        """The :class:`Phase` an expanded model is in after this ablation (``None`` for ``dedicated``)."""
        return {Ablation.CONTRACT: Phase.CONTRACTED, Ablation.ZERO: Phase.ZEROED}.get(self)


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


def restore_checkpoint(checkpoint: Mapping[str, Any], model: nn.Module, who: str, resume: bool = False) -> None:
    """Before ``checkpoint``'s weights load into ``model``: bring the model to the checkpoint's ERA state, or check
    that it is in it. The one rule for the mixin's and the callback's ``on_load_checkpoint``.

    Loading (``resume=False``, the mixin): an unexpanded model gets the checkpoint's new units; an expanded one is
    contracted for a contracted checkpoint. Resuming a fit (``resume=True``, the callback): a contracted
    checkpoint has nothing left to resume. Either way the expansions must be the same.

    Raises:
        ValueError: expansions that differ (naming both), or a contracted checkpoint to resume.
    """
    saved = read_checkpoint(checkpoint)
    current = expansion_record(model)
    if saved is not None and saved.phase is Phase.CONTRACTED:
        if resume:
            raise ValueError(
                f"{who}: the checkpoint holds already-ablated (contracted) weights, nothing to resume; load them "
                "into the model and start a new fit without ckpt_path"
            )
        if current is not None:
            check_same_expansion(saved.record, current, who)
            contract(model)
    elif saved is not None and current is None and not resume:
        from lightning_gradroute.expansion import expand  # expansion imports this module

        expand(model, saved.record.spec)
    else:
        check_same_expansion(saved.record if saved else None, current, who)


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


def ablate(model: nn.Module, mode: Ablation | Literal["contract", "zero"]) -> Phase:
    """:func:`contract` or :func:`zero_expanded` ``model``; return the new phase."""
    mode = Ablation.parse(mode, "ablate", expansion=True)
    (contract if mode is Ablation.CONTRACT else zero_expanded)(model)
    return era_state(model).phase  # type: ignore[union-attr]


@torch.no_grad()
def zero_units(model: nn.Module, units: Mapping[str, tuple[int, Sequence[int]]]) -> dict[str, int]:
    """Zero, in place, the ``units`` ``{parameter name: (dim, indices)}`` of ``model`` (what
    :meth:`~lightning_gradroute.GradientRouter.dedicated_units` returns); return ``{name: units zeroed}``.

    A sharded (FSDP2 ``DTensor``) parameter is zeroed on this rank's shard, the global indices cut to the ones it
    holds: call this on every rank.
    """
    for name, (dim, index) in units.items():
        param, wanted = model.get_parameter(name), torch.tensor(list(index), dtype=torch.long)
        local = param.to_local() if isinstance(param, DTensor) else param
        span = local_slice(param, dim)
        if span is not None:
            wanted = wanted[(wanted >= span[0]) & (wanted < span[1])] - span[0]
        local.index_fill_(dim, wanted.to(local.device), 0.0)
    return {name: len(index) for name, (_, index) in units.items()}


def _expanded_state(model: nn.Module, what: str) -> EraState:
    state = era_state(model)
    if state is None or state.phase is Phase.CONTRACTED:
        raise ValueError(f"{what}: {type(model).__name__} is not expanded (no new units on it)")
    return state


def ablate_state_dict(
    state_dict: Mapping[str, Tensor],
    record: ExpansionRecord,
    mode: Ablation | Literal["contract", "zero"] = "contract",
    prefix: str = "",
) -> dict[str, Tensor]:
    """A copy of an expanded ``state_dict`` with the new parameters removed (``"contract"``: the original
    architecture's keys) or zeroed (``"zero"``), without building the model (``gradroute ablate`` does this).

    ``prefix`` is prepended to the record's parameter names (e.g. ``"model."``). Other tensors are passed
    through (not copied).
    """
    mode = Ablation.parse(mode, "ablate_state_dict", expansion=True)
    out = dict(state_dict)
    for name in record.params:
        key = prefix + name
        if key not in out:
            raise ValueError(f"ablate_state_dict: the state dict has no {key!r}; was it saved from this expansion?")
        if mode is Ablation.CONTRACT:
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
    for name, target in (hf_folders(model, directory) if hf else []):
        prefix = f"{name}." if name else ""
        own = None if full is None else {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
        model.get_submodule(name).save_pretrained(target, state_dict=own)
    return directory


def hf_folders(model: nn.Module, directory: str | Path) -> list[tuple[str, Path]]:
    """``(name, folder)`` of every outermost HF ``PreTrainedModel`` in ``model`` and where :func:`save_ablated`
    saves it: ``directory/hf/<name>`` (``directory/hf`` for ``model`` itself); none without transformers."""
    if importlib.util.find_spec("transformers") is None:
        return []
    from transformers import PreTrainedModel

    outer: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not any(name.startswith(f"{o}.") or not o for o in outer):
            outer.append(name)
    return [(name, Path(directory) / "hf" / name if name else Path(directory) / "hf") for name in outer]


def _full_state_dict(model: nn.Module) -> dict[str, Tensor] | None:
    """The full (unsharded, CPU) state dict of a model with ``DTensor`` parameters, gathered from every rank (on
    rank 0; others get an empty dict); ``None`` for a model that is not sharded."""
    if not any(isinstance(t, DTensor) for t in model.state_dict().values()):
        return None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


# ------------------------------------------------------------------------------------------------ lifecycle
class EraLifecycle:
    """ERA in one ``fit``, for :class:`~lightning_gradroute.GradientRoutingCallback` (its ``era``): every rule of
    when to expand, which ablation fits which run and what fit end does. :meth:`setup` (``setup("fit")``) expands
    around ``configure_model``, attaches ``router`` and plans the ablation; :meth:`fit_end` ablates and saves.
    The arguments are the callback's (``who`` starts the errors).

    Attributes:
        state: the module's :class:`EraState` after :meth:`setup` (``None`` without an expansion).
        dedicated: ``{parameter name: (dim, units)}`` that ``"dedicated"`` zeroes (set in :meth:`setup`).
        ablated_units: ``{parameter name: units zeroed}`` after a ``"dedicated"`` ablation.
        ablated_dir: where :meth:`fit_end` saves the ablated weights (``None``: nowhere).
    """

    def __init__(
        self,
        router: GradientRouter,
        expansions: Sequence[Expansion],
        ablate: Ablation | str | None,
        ablate_label: str | None = None,
        save_ablated: bool | str = True,
        who: str = "GradientRoutingCallback",
        ablate_against: Sequence[str] | None = None,
    ) -> None:
        from lightning_gradroute.expansion import Expansion  # expansion imports this module

        for expansion in expansions:
            if not isinstance(expansion, Expansion):
                raise ValueError(f"{who}: expansions must be Expansion objects, got {expansion!r}")
        mode = None if ablate is None else Ablation.parse(ablate, who)
        dedicated = mode is Ablation.DEDICATED
        if dedicated and not router.parameter_targets:
            raise ValueError(
                f"{who}: ablate='dedicated' zeroes the units parameter routes dedicate to one label, but there is no "
                "ParameterTarget; add parameter targets, or use ablate='contract' with an expansion"
            )
        if dedicated and ablate_label not in router.label_names:
            raise ValueError(
                f"{who}: ablate='dedicated' needs ablate_label, the label whose dedicated units are zeroed, one of "
                f"{router.label_names}; got {ablate_label!r}"
            )
        if not dedicated and ablate_label is not None:
            raise ValueError(f"{who}: ablate_label={ablate_label!r} is only used by ablate='dedicated', got {ablate!r}")
        if ablate_against is not None:
            against = list(ablate_against)
            if not dedicated:
                raise ValueError(f"{who}: ablate_against is only used by ablate='dedicated', got {ablate!r}")
            wrong = [n for n in against if n not in router.label_names or n == ablate_label]
            if wrong or not against:
                raise ValueError(
                    f"{who}: ablate_against must name labels other than ablate_label={ablate_label!r}, among "
                    f"{router.label_names}; got {against}"
                )
        if dedicated and expansions:
            raise ValueError(self._dedicated_with_expansion(who))
        self.router, self.expansions, self.ablate, self.ablate_label = router, list(expansions), mode, ablate_label
        self.ablate_against = None if ablate_against is None else list(ablate_against)
        self.save_ablated, self.who = save_ablated, who
        self.state: EraState | None = None
        self.dedicated: dict[str, tuple[int, list[int]]] = {}
        self.ablated_units: dict[str, int] = {}
        self.ablated_dir: Path | None = None

    @staticmethod
    def _dedicated_with_expansion(who: str) -> str:
        return (
            f"{who}: ablate='dedicated' is for parameter routing without an expansion; with an expansion the new "
            "units are what the forget data trains: use ablate='contract' (or 'zero')"
        )

    def setup(self, trainer: pl.Trainer, module: pl.LightningModule) -> ExpansionRecord | None:
        """Expand ``module`` (if asked), attach the router and plan the ablation; return the expansion record."""
        from lightning_gradroute.expansion import expand  # expansion imports this module

        if self.expansions and self.ablate is not Ablation.CONTRACT and launched_by_multiprocessing(trainer):
            raise ValueError(
                f"{self.who}: ablate={self.ablate and self.ablate.value!r} keeps the expanded shapes, which a "
                f"{type(trainer.strategy).__name__} launched by multiprocessing (ddp_spawn, ddp_fork) cannot "
                "hand back to the main process's unexpanded model; use ablate='contract' or strategy='ddp'"
            )
        # Lightning calls configure_model only after Callback.setup: call it here (it must be idempotent) so
        # that lazily built layers exist before the patterns are resolved. Under ModelParallelStrategy it shards
        # the model, so new units must exist before it: expand first (the layers must then exist at __init__).
        sharded = strategy_family(trainer.strategy) == "model_parallel"
        if self.expansions and sharded:
            expand(module, self.expansions)
        if is_overridden("configure_model", module):
            module.configure_model()
        if self.expansions and not sharded:
            expand(module, self.expansions)
        record = expansion_record(module)  # the callback's expansion, or the mixin's from configure_model
        self.state = era_state(module) if record is not None else None
        if record is not None and self.ablate is Ablation.DEDICATED:
            raise ValueError(self._dedicated_with_expansion(self.who))
        self.router.attach(module, record)
        if self.ablate is Ablation.DEDICATED:
            label: str = self.ablate_label  # type: ignore[assignment]
            self.dedicated = self.router.dedicated_units(label, self.ablate_against)
        if self.ablate and self.save_ablated and (record is not None or self.dedicated):
            # Resolved here on every rank: trainer.log_dir broadcasts, which must not run on rank 0 alone.
            root = self.save_ablated if isinstance(self.save_ablated, str) else trainer.log_dir
            self.ablated_dir = Path(root or trainer.default_root_dir) / "ablated"
        return record

    def fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """Ablate ``module`` as planned (on every rank) and save it; nothing without an ablation to do."""
        if self.ablate is Ablation.DEDICATED:
            self.ablated_units = zero_units(module, self.dedicated)
            what, hf = f"{self.ablate_label!r}-dedicated units zeroed", True
        elif self.ablate is not None and expansion_record(module) is not None:
            phase = ablate(module, self.ablate)
            what, hf = phase.value, phase is Phase.CONTRACTED
        else:
            return
        if self.ablated_dir is not None:  # every rank: gathering a sharded model is a collective
            save_ablated(module, self.ablated_dir, hf=hf, write=trainer.is_global_zero)
            rank_zero_info(f"ablated ({what}) weights saved to {self.ablated_dir}")
