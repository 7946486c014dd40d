"""Expand: add fresh units (MLP neurons, attention heads) to a model, beside the ones it has.

:func:`expand` gives every matched layer a :class:`~lightning_gradroute.new_units.NewUnits` branch: new
*reading* weights (rows that compute the new units) are drawn at random, new *writing* weights (columns that
feed the new units into the rest of the network) are zero by default. Each original layer keeps running on
exactly the tensor it ran on before, so with zero writing weights the expanded model computes exactly what the
original did (bit for bit for MLP neurons and ``linear_pair``; see :mod:`lightning_gradroute.new_units`).
The original parameters keep their names, shapes and identities; the new ones are ``<layer>.new_units.*``.

It returns an :class:`~lightning_gradroute.ExpansionRecord`: what was added where, and the symbolic unit groups
``{(module_name, site): {"expanded": [...], "original": [...]}}`` for every hook site whose features live in
the expanded space, so routes can say ``{"original": -0.75, "expanded": 1.0}`` without sizes. Ablation
(:func:`~lightning_gradroute.contract`, :func:`~lightning_gradroute.zero_expanded`) is in
:mod:`lightning_gradroute.era`.

Example (plain PyTorch, HF GPT-Neo)::

    from lightning_gradroute import Expansion, contract, expand

    record = expand(model, [Expansion("transformer.h.*.mlp", preset="gpt_neo_mlp", add=64)])
    record.unit_groups[("transformer.h.0.mlp.act", "output")]["expanded"]   # [3072, ..., 3135]
    ...  # route and train
    contract(model)                    # original architecture again, new units and what they learned gone

``Expansion(modules, component="neurons" | "heads", add=...)`` finds the parts in the matched modules (a
block's MLP) and takes their layout from the architecture table (:mod:`lightning_gradroute.architectures`), on
every family it knows; the presets below name the same layouts for one family each.

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

Attention-head presets run the attention kernel over more heads; the original heads' values then depend on
that kernel computing each head independently, which the projections around it cannot guarantee. They are
function-preserving to float rounding (the tests assert 1e-5 relative), not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from lightning_gradroute.architectures import (
    ARCHITECTURES,
    AttentionLayout,
    MLPLayout,
    find_parts,
    is_conv1d,
    layer_features,
    linear_layer,
    submodule,
)
from lightning_gradroute.era import EraState, ExpansionRecord, Phase, era_state, set_era_state, spec_hash
from lightning_gradroute.new_units import NewUnits, Role, Segments, add_new_units
from lightning_gradroute.targets import Target, resolve_modules

__all__ = ["PRESETS", "Expansion", "expand"]

Init = Union[Literal["match", "zeros"], float]


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
        component: ``"neurons"`` or ``"heads"``: add units of that component to every part the pattern names
            or holds (``Expansion("transformer.h.*", component="neurons")``), with the layout the architecture
            table (:mod:`~lightning_gradroute.architectures`) gives for the part's class; no preset needed.
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
    component: str | None = None

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
        if self.component is not None:
            if self.component not in ("neurons", "heads"):
                raise ValueError(f"{where}: component must be 'neurons' or 'heads', got {self.component!r}")
            if self.preset != "linear_pair" or self.up or self.down or self.between:
                raise ValueError(f"{where}: component {self.component!r} decides the layout; drop preset and "
                                 "up/down/between")  # fmt: skip
        elif self.preset == "linear_pair":
            if not self.up or not self.down:
                raise ValueError(f"{where}: preset 'linear_pair' needs up=[...] and down=[...] layer names")
        elif self.up or self.down or self.between:
            raise ValueError(f"{where}: up/down/between only apply to preset 'linear_pair', not {self.preset!r}")

    def to_dict(self) -> dict[str, Any]:
        spec = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if spec["component"] is None:  # so that specs (and their hashes) from before components stay the same
            del spec["component"]
        return spec

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


def _neurons(up: Sequence[str], down: Sequence[str], between: Sequence[str]) -> Callable[..., _Plan]:
    def plan(module: nn.Module, expansion: Expansion, where: str) -> _Plan:
        layers = {name: linear_layer(module, name, where) for name in (*up, *down)}
        for name in between:
            submodule(module, name, where)
        sizes = {f"{n}.out": layer_features(layers[n], "out") for n in up}
        sizes |= {f"{n}.in": layer_features(layers[n], "in") for n in down}
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
        layers = {name: linear_layer(module, name, where) for name in (q, k, v, out)}
        q_size, kv_size = layer_features(layers[q], "out"), layer_features(layers[k], "out")
        heads, kv_heads = q_size // head_dim, kv_size // head_dim
        if q_size % head_dim or kv_size % head_dim or heads % kv_heads or layer_features(layers[out], "in") != q_size:
            raise ValueError(f"{where}: q/k/v/out sizes {q_size}/{kv_size}/{layer_features(layers[out], 'in')} do not "
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
    c_attn, c_proj = linear_layer(module, "c_attn", where), linear_layer(module, "c_proj", where)
    width = layer_features(c_proj, "in")
    if layer_features(c_attn, "out") != 3 * width or width % head_dim or getattr(module, "split_size", None) != width:
        raise ValueError(f"{where}: c_attn ({layer_features(c_attn, 'out')}) is not a fused q/k/v of c_proj's {width}")
    added = expansion.add * head_dim
    return _Plan(
        [_Resize("c_attn", "out", [(width, added), (2 * width, added), (3 * width, added)]),
         _Resize("c_proj", "in", [(width, added)])],
        attrs={"split_size": width + added, "num_heads": width // head_dim + expansion.add},
    )


def _planner(layout: MLPLayout | AttentionLayout, where: str) -> Callable[..., _Plan]:
    """The planner that adds units to a part with this layout (from the architecture table)."""
    if isinstance(layout, MLPLayout):
        return _neurons(layout.up, (layout.down,), (layout.act,) if layout.act else ())
    if layout.fused and layout.fused_order == "blocks" and (layout.fused, layout.out) == ("c_attn", "c_proj"):
        return _gpt2_heads
    if layout.fused or "." in layout.head_dim:
        raise ValueError(f"{where}: adding heads to this attention layout is not supported")
    return _separate_heads(layout.q, layout.k, layout.v, layout.out, layout.heads_attr)


def _preset(class_name: str, component: str) -> Callable[..., _Plan]:
    layout = ARCHITECTURES[class_name]
    return _planner(layout.mlp if component == "neurons" else layout.attention, class_name)  # type: ignore[arg-type]


#: Preset name -> planner ``(module, expansion, where) -> plan``, from the architecture table.
PRESETS: dict[str, Callable[..., _Plan]] = {
    "gpt2_mlp": _preset("GPT2MLP", "neurons"),
    "gpt_neo_mlp": _preset("GPTNeoMLP", "neurons"),
    "llama_mlp": _preset("LlamaMLP", "neurons"),
    "qwen2_mlp": _preset("Qwen2MLP", "neurons"),
    "linear_pair": lambda module, e, where: _neurons(e.up, e.down, e.between)(module, e, where),
    "gpt2_attn": _preset("GPT2Attention", "heads"),
    "gpt_neo_attn": _preset("GPTNeoSelfAttention", "heads"),
    "llama_attn": _preset("LlamaAttention", "heads"),
    "qwen2_attn": _preset("Qwen2Attention", "heads"),
}
_PRESET_LAYER_TYPES = {"gpt2_mlp": "Conv1D", "gpt_neo_mlp": "Linear", "gpt2_attn": "Conv1D"}


# ----------------------------------------------------------------------------------------------- expand
def expand(model: nn.Module, expansions: Sequence[Expansion | Mapping[str, Any]]) -> ExpansionRecord:
    """Add new units to ``model`` in place as ``expansions`` say; return the record (also on the model, see
    :func:`~lightning_gradroute.era.era_state`).

    Idempotent: a model already expanded with the same shape spec is left alone and its record returned.

    Raises:
        ValueError: a pattern matching no module, a module the preset does not fit, a layer grown twice or
            shared by several places of the model, or a model already expanded differently. The model is left
            untouched.
    """
    expansions = [e if isinstance(e, Expansion) else Expansion.from_dict(e) for e in expansions]
    spec = [e.to_dict() for e in expansions]
    state = era_state(model)
    if state is not None and state.phase is not Phase.CONTRACTED:
        if state.record.spec_hash != spec_hash(spec):
            raise ValueError(
                f"expand: {type(model).__name__} is already expanded with [{state.record.describe()}], "
                f"not [{ExpansionRecord(spec).describe()}]; contract it first"
            )
        return state.record
    if not expansions:
        raise ValueError("expand: no expansions given")
    # Plan and check everything first, so that a bad module leaves the model untouched.
    planned: list[tuple[Expansion, str, nn.Module, _Plan]] = []
    for i, expansion in enumerate(expansions):
        hits = resolve_modules(model, Target(expansion.modules), f"expansions[{i}]")
        if expansion.component is not None:
            for part in find_parts(hits, expansion.component, f"Expansion {expansion.modules!r}"):
                where = f"Expansion {expansion.modules!r} ({part.where})"
                if not isinstance(part.layout, (MLPLayout, AttentionLayout)):
                    raise ValueError(f"{where}: only neurons and heads can be added")
                plan = _planner(part.layout, where)(part.module, expansion, where)
                planned.append((expansion, part.name, part.module, plan))
            continue
        for name, module in hits:
            where = f"Expansion {expansion.modules!r} ({expansion.preset}) at {name!r}"
            plan = PRESETS[expansion.preset](module, expansion, where)
            wanted = _PRESET_LAYER_TYPES.get(expansion.preset)
            for resize in plan.resizes:
                layer = module.get_submodule(resize.layer)
                if wanted and (wanted == "Conv1D") != is_conv1d(layer):
                    raise ValueError(f"{where}: {resize.layer!r} is a {type(layer).__name__}, the preset expects "
                                     f"{wanted}; pick the preset of this architecture")
            planned.append((expansion, name, module, plan))
    _check_branch_sites(model, planned)
    record = ExpansionRecord(spec)
    for expansion, name, module, plan in planned:
        _apply(record, expansion, name, module, plan)
    set_era_state(model, EraState(record))
    return record


def _check_branch_sites(model: nn.Module, planned: Sequence[tuple[Expansion, str, nn.Module, _Plan]]) -> None:
    """Each layer takes one branch: not two expansions', not a module that several places of the model share
    (its other uses would see the new units too), not one whose ``forward`` another tool replaced."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    claimed: dict[int, str] = {}
    for _, name, module, plan in planned:
        for sub in [r.layer for r in plan.resizes] + list(plan.between):
            full = f"{name}.{sub}" if name else sub
            layer = module.get_submodule(sub)
            if id(layer) in claimed:
                raise ValueError(f"expand: layer {full!r} is grown by two expansions; make the patterns disjoint")
            others = [n for n in names.get(id(layer), []) if n != full]
            if others:
                raise ValueError(f"expand: {full!r} is the same module as {others[0]!r}; a shared module cannot take "
                                 "new units for one of its uses")
            if hasattr(layer, "new_units") or "forward" in vars(layer):
                raise ValueError(f"expand: {full!r} already has new units or a replaced forward")
            claimed[id(layer)] = full


def _new_block(like: Tensor, shape: Sequence[int], init: Init) -> Tensor:
    block = torch.zeros(tuple(shape), dtype=like.dtype, device=like.device)
    if init == "zeros":
        return block
    if init == "match":
        std = float(like.detach().float().std()) if like.numel() > 1 else 0.02
    else:
        std = float(init)
    return block.normal_(0.0, std)


def _layer_units(layer: nn.Module, role: Role, inserts: Segments, expansion: Expansion) -> NewUnits:
    """The branch of a reading (``up``) or writing (``down``) layer, initialised as ``expansion`` says."""
    weight: Tensor = layer.weight  # type: ignore[assignment]
    added = sum(count for _, count in inserts)
    if role == "reads":
        bias: Tensor | None = getattr(layer, "bias", None)
        units = NewUnits(
            role,
            layer_features(layer, "out"),
            inserts,
            _new_block(weight, (added, layer_features(layer, "in")), expansion.init),
            None if bias is None else torch.zeros(added, dtype=bias.dtype, device=bias.device),  # biases start at 0
        )
    else:
        writing = _new_block(weight, (layer_features(layer, "out"), added), expansion.output_init)
        units = NewUnits(role, layer_features(layer, "in"), inserts, writing)
    units.requires_grad_(weight.requires_grad)
    return units


def _indices(segments: Iterable[Sequence[int]]) -> list[int]:
    return [i for a, b in segments for i in range(a, b)]


def _apply(record: ExpansionRecord, expansion: Expansion, name: str, module: nn.Module, plan: _Plan) -> None:
    prefix = f"{name}." if name else ""
    branches: list[tuple[str, nn.Module, NewUnits, tuple[str, ...]]] = []
    for resize in plan.resizes:
        layer = module.get_submodule(resize.layer)
        role: Role = "reads" if resize.side == "out" else "writes"
        sites = ("output",) if role == "reads" else ("input",)
        branches.append((prefix + resize.layer, layer, _layer_units(layer, role, resize.inserts, expansion), sites))
    for between, (size, inserts) in plan.between.items():
        units = NewUnits("elementwise", size, inserts)
        branches.append((prefix + between, module.get_submodule(between), units, ("input", "output")))
    for full, layer, units, sites in branches:
        add_new_units(layer, units)
        record.layers[full] = {"role": units.role, "size": units.size, "inserts": [list(s) for s in units.inserts]}
        record.params |= {f"{full}.new_units.{n}": list(p.shape) for n, p in units.named_parameters()}
        for site in sites:
            record.unit_groups[(full, site)] = {"expanded": _indices(units.new), "original": _indices(units.keep)}
    for attr, value in plan.attrs.items():
        record.attrs.setdefault(name, {})[attr] = [getattr(module, attr), value]
        setattr(module, attr, value)
