"""Expand and Ablate: add fresh units (MLP neurons, attention heads) to a model, and remove them again.

:func:`expand` grows the matched modules *in place*: every touched weight is replaced by a larger
``nn.Parameter`` under the same state-dict key, and size attributes (``in_features``, ``nf``,
``num_heads``...) are updated. Old values are kept bit for bit. New *reading* weights (rows that compute the
new units) are drawn at random, new *writing* weights (columns that feed the new units into the rest of the
network) are zero by default, so an expanded model computes exactly what the original did.

It returns an :class:`ExpansionRecord`: what was resized and how, and the symbolic unit groups
``{(module_name, site): {"expanded": [...], "original": [...]}}`` for every hook site whose features live in
the expanded space, so routes can say ``{"original": -0.75, "expanded": 1.0}`` without sizes.
:func:`contract` slices every parameter back to its original shape (the "ablate" of ERA);
:func:`zero_expanded` zeroes the new units but keeps the shapes.

Example (plain PyTorch, HF GPT-Neo)::

    from lightning_gradroute import Expansion, contract, expand

    record = expand(model, [Expansion("transformer.h.*.mlp", preset="gpt_neo_mlp", add=64)])
    record.unit_groups[("transformer.h.0.mlp.act", "output")]["expanded"]   # [3072, ..., 3135]
    ...  # route and train
    contract(model)                    # original architecture again, new units and what they learned gone

Presets (what a matched module must contain):

============================  =====================================================================
``gpt2_mlp``                  HF GPT-2 MLP: ``c_fc`` → ``act`` → ``c_proj`` (``Conv1D``)
``gpt_neo_mlp``               HF GPT-Neo MLP: ``c_fc`` → ``act`` → ``c_proj`` (``nn.Linear``)
``llama_mlp`` / ``qwen2_mlp``  gated MLP: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
``linear_pair``               any module: give ``up`` (layers producing the units), ``down`` (layers
                              consuming them) and ``between`` (elementwise modules in between)
``gpt2_attn``                 HF GPT-2 attention heads: fused ``c_attn`` q/k/v columns, ``c_proj`` rows
``gpt_neo_attn``              HF GPT-Neo heads (``transformer.h.*.attn.attention``): q/k/v/``out_proj``
``llama_attn`` / ``qwen2_attn``  Llama/Qwen2 heads with grouped KV: ``add`` query heads and
                              ``add / num_key_value_groups`` key/value heads
============================  =====================================================================
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import torch
from safetensors.torch import save_model
from torch import Tensor, nn

from lightning_gradroute.targets import Target, resolve_modules

__all__ = [
    "PRESETS",
    "ablate_state_dict",
    "Expansion",
    "ExpansionRecord",
    "contract",
    "check_same_expansion",
    "expand",
    "expansion_record",
    "save_ablated",
    "zero_expanded",
]

Init = Union[Literal["match", "zeros"], float]
Segments = list[tuple[int, int]]
_RECORD_ATTR = "_gradroute_expansion"


@dataclass(frozen=True)
class Expansion:
    """Add ``add`` units to every module that ``modules`` matches.

    Args:
        modules: a glob over ``model.named_modules()`` (or ``re:`` regex), like a
            :class:`~lightning_gradroute.Target`: ``"transformer.h.*.mlp"``. Names are relative to the model
            you expand (the LightningModule in Lightning: ``"model.transformer.h.*.mlp"`` if it holds the HF
            model as ``self.model``).
        preset: how the matched module is built; see :data:`PRESETS` and the module docstring.
        add: units to add per module: MLP neurons, or attention heads for the ``*_attn`` presets.
        init: new reading weights (rows computing the new units): ``"match"`` draws from a normal with the
            standard deviation of the layer's existing weight, a float is that standard deviation,
            ``"zeros"`` leaves them zero. New biases are always zero.
        output_init: new writing weights (columns feeding the new units forward), same choices. The default
            ``"zeros"`` makes expansion function-preserving.
        up, down, between: ``linear_pair`` only: names (relative to the matched module) of the
            ``nn.Linear``/``Conv1D`` layers whose outputs are the units, of those that take the units as
            input, and of elementwise modules in between (activations) whose hook sites get unit groups too.

    Example::

        Expansion("transformer.h.*.mlp", preset="gpt_neo_mlp", add=64)
        Expansion("encoder", preset="linear_pair", add=8, up=("0",), down=("2",), between=("1",))
    """

    modules: str
    preset: str = "linear_pair"
    add: int = 64
    init: Init = "match"
    output_init: Init = "zeros"
    up: tuple[str, ...] = ()
    down: tuple[str, ...] = ()
    between: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        Target(self.modules)  # same pattern rules and errors as targets
        where = f"Expansion {self.modules!r}"
        if self.preset not in PRESETS:
            raise ValueError(f"{where}: unknown preset {self.preset!r}; presets are {sorted(PRESETS)}")
        if isinstance(self.add, bool) or not isinstance(self.add, int) or self.add < 1:
            raise ValueError(f"{where}: add must be a positive integer, got {self.add!r}")
        for name in ("init", "output_init"):
            value = getattr(self, name)
            if value not in ("match", "zeros") and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf")
            ):
                raise ValueError(f"{where}: {name} must be 'match', 'zeros' or a std >= 0, got {value!r}")
        for name in ("up", "down", "between"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}: {name} must be a list of submodule names, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.preset == "linear_pair":
            if not self.up or not self.down:
                raise ValueError(f"{where}: preset 'linear_pair' needs up=[...] and down=[...] layer names")
        elif self.up or self.down or self.between:
            raise ValueError(f"{where}: up/down/between only apply to preset 'linear_pair', not {self.preset!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Expansion:
        return cls(**spec)


# ---------------------------------------------------------------------------------------------- plans
@dataclass
class _Resize:
    """Grow the ``side`` features of one linear layer: ``inserts`` are ``(position, count)`` in old indices."""

    layer: str
    side: Literal["out", "in"]
    inserts: Segments


@dataclass
class _Plan:
    resizes: list[_Resize]
    between: dict[str, tuple[int, Segments]] = field(default_factory=dict)  # elementwise module -> (size, inserts)
    attrs: dict[str, int] = field(default_factory=dict)  # attributes of the matched module to set


def _submodule(module: nn.Module, name: str, where: str) -> nn.Module:
    try:
        return module.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in module.named_children())
        raise ValueError(f"{where}: no submodule {name!r} (children: {children})") from None


def _layer(module: nn.Module, name: str, where: str) -> nn.Module:
    """The ``nn.Linear`` or HF ``Conv1D`` called ``name`` inside ``module``."""
    layer = _submodule(module, name, where)
    if not isinstance(layer, nn.Linear) and not _is_conv1d(layer):
        raise ValueError(f"{where}: {name!r} is a {type(layer).__name__}, not an nn.Linear or HF Conv1D")
    return layer


def _is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def _features(layer: nn.Module, side: str) -> int:
    weight: Tensor = layer.weight  # type: ignore[assignment]
    out_dim = 1 if _is_conv1d(layer) else 0
    return weight.shape[out_dim if side == "out" else 1 - out_dim]


def _neurons(up: Sequence[str], down: Sequence[str], between: Sequence[str]) -> Callable[..., _Plan]:
    def plan(module: nn.Module, expansion: Expansion, where: str) -> _Plan:
        layers = {name: _layer(module, name, where) for name in (*up, *down)}
        for name in between:
            _submodule(module, name, where)
        sizes = {f"{n}.out": _features(layers[n], "out") for n in up}
        sizes |= {f"{n}.in": _features(layers[n], "in") for n in down}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"{where}: the unit layers disagree on the number of units: {sizes}")
        inserts = [(next(iter(sizes.values())), expansion.add)]
        resizes = [_Resize(n, "out", inserts) for n in up] + [_Resize(n, "in", inserts) for n in down]
        return _Plan(resizes, between={n: (inserts[0][0], inserts) for n in between})

    return plan


def _head_dim(module: nn.Module, where: str) -> int:
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(head_dim, int):
        raise ValueError(f"{where}: a {type(module).__name__} has no integer head_dim; it is not an attention module")
    return head_dim


def _separate_heads(q: str, k: str, v: str, out: str, heads_attr: str | None) -> Callable[..., _Plan]:
    def plan(module: nn.Module, expansion: Expansion, where: str) -> _Plan:
        head_dim = _head_dim(module, where)
        layers = {name: _layer(module, name, where) for name in (q, k, v, out)}
        q_size, kv_size = _features(layers[q], "out"), _features(layers[k], "out")
        heads, kv_heads = q_size // head_dim, kv_size // head_dim
        if q_size % head_dim or kv_size % head_dim or heads % kv_heads or _features(layers[out], "in") != q_size:
            raise ValueError(f"{where}: q/k/v/out sizes {q_size}/{kv_size}/{_features(layers[out], 'in')} do not "
                             f"fit head_dim {head_dim}")
        groups = heads // kv_heads
        if expansion.add % groups:
            raise ValueError(f"{where}: add={expansion.add} heads must be a multiple of the {groups} query heads "
                             "per key/value head")
        q_inserts = [(q_size, expansion.add * head_dim)]
        kv_inserts = [(kv_size, expansion.add // groups * head_dim)]
        resizes = [_Resize(q, "out", q_inserts), _Resize(k, "out", kv_inserts), _Resize(v, "out", kv_inserts),
                   _Resize(out, "in", q_inserts)]
        return _Plan(resizes, attrs={heads_attr: heads + expansion.add} if heads_attr else {})

    return plan


def _gpt2_heads(module: nn.Module, expansion: Expansion, where: str) -> _Plan:
    head_dim = _head_dim(module, where)
    if getattr(module, "is_cross_attention", False):
        raise ValueError(f"{where}: cross-attention GPT-2 layers are not supported by preset 'gpt2_attn'")
    c_attn, c_proj = _layer(module, "c_attn", where), _layer(module, "c_proj", where)
    width = _features(c_proj, "in")
    if _features(c_attn, "out") != 3 * width or width % head_dim or getattr(module, "split_size", None) != width:
        raise ValueError(f"{where}: c_attn ({_features(c_attn, 'out')}) is not a fused q/k/v of c_proj's {width}")
    added = expansion.add * head_dim
    return _Plan(
        [_Resize("c_attn", "out", [(width, added), (2 * width, added), (3 * width, added)]),
         _Resize("c_proj", "in", [(width, added)])],
        attrs={"split_size": width + added, "num_heads": width // head_dim + expansion.add},
    )


_GPT_MLP = _neurons(up=("c_fc",), down=("c_proj",), between=("act",))
_GATED_MLP = _neurons(up=("gate_proj", "up_proj"), down=("down_proj",), between=("act_fn",))
_LLAMA_HEADS = _separate_heads("q_proj", "k_proj", "v_proj", "o_proj", heads_attr=None)
#: Preset name -> planner ``(module, expansion, where) -> plan``.
PRESETS: dict[str, Callable[..., _Plan]] = {
    "gpt2_mlp": _GPT_MLP,
    "gpt_neo_mlp": _GPT_MLP,
    "llama_mlp": _GATED_MLP,
    "qwen2_mlp": _GATED_MLP,
    "linear_pair": lambda module, e, where: _neurons(e.up, e.down, e.between)(module, e, where),
    "gpt2_attn": _gpt2_heads,
    "gpt_neo_attn": _separate_heads("q_proj", "k_proj", "v_proj", "out_proj", heads_attr="num_heads"),
    "llama_attn": _LLAMA_HEADS,
    "qwen2_attn": _LLAMA_HEADS,
}
_PRESET_LAYER_TYPES = {"gpt2_mlp": "Conv1D", "gpt_neo_mlp": "Linear", "gpt2_attn": "Conv1D"}


# --------------------------------------------------------------------------------------------- record
def _split(size: int, inserts: Segments) -> tuple[Segments, Segments]:
    """Kept (old) and new index ranges in the expanded space, for ``inserts`` into ``size`` old features."""
    keep, new, old_pos, shift = [], [], 0, 0
    for pos, count in sorted(inserts):
        keep.append((old_pos + shift, pos + shift))
        new.append((pos + shift, pos + shift + count))
        old_pos, shift = pos, shift + count
    keep.append((old_pos + shift, size + shift))
    return [(a, b) for a, b in keep if b > a], new


def _indices(segments: Iterable[Sequence[int]]) -> list[int]:
    return [i for a, b in segments for i in range(a, b)]


@dataclass
class ExpansionRecord:
    """What :func:`expand` did, as plain data (saved in checkpoints under ``checkpoint["gradroute"]``).

    Attributes:
        spec: the :class:`Expansion` s, as dicts.
        params: ``{param_name: {"dim": d, "keep": [[start, stop], ...]}}``: the old entries' positions along
            the grown dim. Contraction keeps exactly those.
        attrs: ``{module_name: {attr: [original, expanded]}}`` size attributes that were changed.
        unit_groups: ``{(module_name, site): {"expanded": [...], "original": [...]}}`` for routes.
    """

    spec: list[dict[str, Any]]
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    attrs: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    unit_groups: dict[tuple[str, str], dict[str, list[int]]] = field(default_factory=dict)

    @property
    def spec_hash(self) -> str:
        return spec_hash(self.spec)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "params": self.params,
            "attrs": self.attrs,
            "unit_groups": [[m, s, g] for (m, s), g in self.unit_groups.items()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpansionRecord:
        groups = {(m, s): dict(g) for m, s, g in data["unit_groups"]}
        return cls(list(data["spec"]), dict(data["params"]), dict(data["attrs"]), groups)

    def describe(self) -> str:
        return "; ".join(f"{e['modules']} +{e['add']} ({e['preset']})" for e in self.spec)


def spec_hash(spec: Sequence[Mapping[str, Any]]) -> str:
    """A short hash of the shape-defining part of an expansion spec (initialisation does not count)."""
    shape = [{k: v for k, v in e.items() if k not in ("init", "output_init")} for e in spec]
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]


def check_same_expansion(saved: ExpansionRecord | None, current: ExpansionRecord | None, who: str) -> None:
    """Raise if a checkpoint's expansion (``saved``) differs in shape from the model's (``current``)."""
    if (saved.spec_hash if saved else None) != (current.spec_hash if current else None):
        raise ValueError(
            f"{who}: the checkpoint was trained with expansions [{saved.describe() if saved else 'none'}], this "
            f"run has [{current.describe() if current else 'none'}]; resume or load with the same expansions"
        )


def expansion_record(model: nn.Module) -> ExpansionRecord | None:
    """The record of the expansion currently applied to ``model`` (``None`` if it is not expanded)."""
    return model.__dict__.get(_RECORD_ATTR)


# ------------------------------------------------------------------------------------------ operations
def _new_block(like: Tensor, dim: int, count: int, init: Init) -> Tensor:
    shape = list(like.shape)
    shape[dim] = count
    block = torch.zeros(shape, dtype=like.dtype, device=like.device)
    if init == "zeros" or like.dim() < 2:  # biases always start at zero
        return block
    if init == "match":
        std = float(like.detach().float().std()) if like.numel() > 1 else 0.02
    else:
        std = float(init)
    return block.normal_(0.0, std)


def _grow(old: Tensor, dim: int, inserts: Segments, init: Init) -> Tensor:
    pieces, start = [], 0
    for pos, count in sorted(inserts):
        pieces += [old.narrow(dim, start, pos - start), _new_block(old, dim, count, init)]
        start = pos
    pieces.append(old.narrow(dim, start, old.shape[dim] - start))
    return torch.cat(pieces, dim)


def _set_param(module: nn.Module, name: str, value: Tensor) -> None:
    old: nn.Parameter = getattr(module, name)
    setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))


def _size_attrs(layer: nn.Module, side: str) -> tuple[str, ...]:
    if _is_conv1d(layer):
        return ("nf",) if side == "out" else ("nx",)
    return ("out_features",) if side == "out" else ("in_features",)


def expand(model: nn.Module, expansions: Sequence[Expansion]) -> ExpansionRecord:
    """Grow ``model`` in place as ``expansions`` say; return (and attach to ``model``) the record.

    Idempotent: a model already expanded with the same shape spec is left alone and its record returned.

    Raises:
        ValueError: a pattern matching no module, a module the preset does not fit, a parameter grown twice,
            or a model already expanded differently.
    """
    expansions = [e if isinstance(e, Expansion) else Expansion.from_dict(e) for e in expansions]
    spec = [e.to_dict() for e in expansions]
    existing = expansion_record(model)
    if existing is not None:
        if existing.spec_hash != spec_hash(spec):
            raise ValueError(
                f"expand: {type(model).__name__} is already expanded with [{existing.describe()}], "
                f"not [{ExpansionRecord(spec).describe()}]; contract it first"
            )
        return existing
    if not expansions:
        raise ValueError("expand: no expansions given")
    record = ExpansionRecord(spec)
    # Plan everything first so a bad module leaves the model untouched.
    planned: list[tuple[Expansion, str, nn.Module, _Plan]] = []
    for i, expansion in enumerate(expansions):
        for name, module in resolve_modules(model, Target(expansion.modules), f"expansions[{i}]"):
            where = f"Expansion {expansion.modules!r} ({expansion.preset}) at {name!r}"
            plan = PRESETS[expansion.preset](module, expansion, where)
            wanted = _PRESET_LAYER_TYPES.get(expansion.preset)
            for resize in plan.resizes:
                layer = module.get_submodule(resize.layer)
                if wanted and (wanted == "Conv1D") != _is_conv1d(layer):
                    raise ValueError(f"{where}: {resize.layer!r} is a {type(layer).__name__}, the preset expects "
                                     f"{wanted}; pick the preset of this architecture")
            planned.append((expansion, name, module, plan))
    grown: set[str] = set()
    for expansion, name, module, plan in planned:
        for resize in plan.resizes:
            full = f"{name}.{resize.layer}" if name else resize.layer
            if full in grown:
                raise ValueError(f"expand: layer {full!r} is grown by two expansions; make the patterns disjoint")
            grown.add(full)
    for expansion, name, module, plan in planned:
        _apply(record, expansion, name, module, plan)
    model.__dict__[_RECORD_ATTR] = record
    model.register_load_state_dict_pre_hook(_check_loaded_shapes)
    return record


def _apply(record: ExpansionRecord, expansion: Expansion, name: str, module: nn.Module, plan: _Plan) -> None:
    prefix = f"{name}." if name else ""
    for resize in plan.resizes:
        layer = module.get_submodule(resize.layer)
        full = prefix + resize.layer
        conv = _is_conv1d(layer)
        size = _features(layer, resize.side)
        keep, new = _split(size, resize.inserts)
        weight_dim = (1 if conv else 0) if resize.side == "out" else (0 if conv else 1)
        init = expansion.init if resize.side == "out" else expansion.output_init
        _set_param(layer, "weight", _grow(layer.weight, weight_dim, resize.inserts, init))
        record.params[f"{full}.weight"] = {"dim": weight_dim, "keep": [list(s) for s in keep]}
        if resize.side == "out" and getattr(layer, "bias", None) is not None:
            _set_param(layer, "bias", _grow(layer.bias, 0, resize.inserts, "zeros"))
            record.params[f"{full}.bias"] = {"dim": 0, "keep": [list(s) for s in keep]}
        for attr in _size_attrs(layer, resize.side):
            record.attrs.setdefault(full, {})[attr] = [size, size + sum(c for _, c in resize.inserts)]
            setattr(layer, attr, size + sum(c for _, c in resize.inserts))
        site = "output" if resize.side == "out" else "input"
        record.unit_groups[(full, site)] = {"expanded": _indices(new), "original": _indices(keep)}
    for between, (size, inserts) in plan.between.items():
        keep, new = _split(size, inserts)
        for site in ("input", "output"):
            record.unit_groups[(prefix + between, site)] = {"expanded": _indices(new), "original": _indices(keep)}
    for attr, value in plan.attrs.items():
        record.attrs.setdefault(name, {})[attr] = [getattr(module, attr), value]
        setattr(module, attr, value)


def _keep_index(entry: Mapping[str, Any], device: torch.device) -> Tensor:
    return torch.tensor(_indices(entry["keep"]), dtype=torch.long, device=device)


def _contracted(tensor: Tensor, entry: Mapping[str, Any]) -> Tensor:
    return tensor.index_select(entry["dim"], _keep_index(entry, tensor.device)).clone()


def _zeroed(tensor: Tensor, entry: Mapping[str, Any]) -> Tensor:
    kept = torch.zeros(tensor.shape[entry["dim"]], dtype=tensor.dtype, device=tensor.device)
    kept[_keep_index(entry, tensor.device)] = 1
    shape = [1] * tensor.dim()
    shape[entry["dim"]] = -1
    return tensor * kept.view(shape)


_ABLATIONS = {"contract": _contracted, "zero": _zeroed}


def ablate_state_dict(
    state_dict: Mapping[str, Tensor],
    record: ExpansionRecord,
    mode: Literal["contract", "zero"] = "contract",
    prefix: str = "",
) -> dict[str, Tensor]:
    """A copy of an expanded ``state_dict`` with the new units removed (``"contract"``: original shapes) or
    zeroed (``"zero"``), without building the model (this is what ``gradroute ablate`` does to a checkpoint).

    ``prefix`` is prepended to the record's parameter names (e.g. ``"model."``). Tensors the record does not
    name are passed through (not copied).
    """
    if mode not in _ABLATIONS:
        raise ValueError(f"ablate_state_dict: mode must be 'contract' or 'zero', got {mode!r}")
    out = dict(state_dict)
    for name, entry in record.params.items():
        key = prefix + name
        if key not in out:
            raise ValueError(f"ablate_state_dict: the state dict has no {key!r}; was it saved from this expansion?")
        out[key] = _ABLATIONS[mode](out[key], entry)
    return out


def contract(model: nn.Module, record: ExpansionRecord | None = None) -> nn.Module:
    """Slice every expanded parameter of ``model`` back to its original shape (ERA's "ablate"); in place.

    The result has the original architecture: same keys, shapes and size attributes as before
    :func:`expand`, the old entries carrying whatever training did to them.
    """
    record = _require_record(model, record, "contract")
    for name, entry in record.params.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        _set_param(module, attr, _contracted(getattr(module, attr).detach(), entry))
    for module_name, attrs in record.attrs.items():
        module = model.get_submodule(module_name)
        for attr, (original, _) in attrs.items():
            setattr(module, attr, original)
    del model.__dict__[_RECORD_ATTR]
    hooks = model._load_state_dict_pre_hooks
    for key in [k for k, h in hooks.items() if getattr(h, "hook", h) is _check_loaded_shapes]:
        del hooks[key]
    return model


def zero_expanded(model: nn.Module, record: ExpansionRecord | None = None) -> nn.Module:
    """Zero every new entry of the expanded parameters, keeping the expanded shapes (functionally the same as
    :func:`contract`, since the new units then neither read nor write anything)."""
    record = _require_record(model, record, "zero_expanded")
    with torch.no_grad():
        for name, entry in record.params.items():
            param = model.get_parameter(name)
            param.copy_(_zeroed(param.detach(), entry))
    return model


def _require_record(model: nn.Module, record: ExpansionRecord | None, what: str) -> ExpansionRecord:
    record = record or expansion_record(model)
    if record is None:
        raise ValueError(f"{what}: {type(model).__name__} is not expanded (no expansion record on it)")
    return record


def _check_loaded_shapes(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook of an expanded model: a checkpoint of another expansion is a clear error."""
    record = expansion_record(module)
    if record is None:
        return
    for name in record.params:
        key = prefix + name
        if key in state_dict and tuple(state_dict[key].shape) != tuple(module.get_parameter(name).shape):
            raise ValueError(
                f"the state dict's {key!r} has shape {tuple(state_dict[key].shape)} but the model expanded with "
                f"[{record.describe()}] has {tuple(module.get_parameter(name).shape)}: load it with the expansion "
                "config it was saved with (a resumed run must keep its expansions)"
            )


def save_ablated(model: nn.Module, directory: str | Path, hf: bool = True) -> Path:
    """Save ``model``'s weights as ``directory/model.safetensors`` and, with ``hf``, every outermost HF
    ``PreTrainedModel`` inside it with ``save_pretrained`` to ``directory/hf/<its name>`` (``directory/hf`` for
    the model itself), so ``from_pretrained`` with the original config loads the contracted weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / "model.safetensors"))
    if hf and importlib.util.find_spec("transformers") is not None:
        from transformers import PreTrainedModel

        outer: list[str] = []
        for name, module in model.named_modules():
            if isinstance(module, PreTrainedModel) and not any(name.startswith(f"{o}.") or not o for o in outer):
                outer.append(name)
                module.save_pretrained(directory / "hf" / name if name else directory / "hf")
    return directory
