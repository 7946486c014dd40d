"""What a neuron, a head, a channel and the residual stream are, per model family: the one table.

A *component* names a part of a model by meaning, so that one configuration routes the same thing on every
architecture the table knows:

=============  ============================================================================================
``neurons``    the hidden units of an MLP: what its down projection reads. ``act(up x)`` on GPT-2, GPT-Neo,
               GPT-J, GPT-NeoX, BERT-style encoders and ``nn.TransformerEncoderLayer``; ``act(gate x) * up x``
               on gated MLPs (Llama, Qwen2, Mistral), as TransformerLens' ``hook_post``.
``heads``      attention heads: the per-head values the output projection reads, and for parameters every
               query/key/value row and output-projection column of those heads (GPT-2's fused ``c_attn`` and
               NeoX's ``query_key_value`` split per head; under grouped KV heads, a key/value head goes with
               the query heads that share it).
``residual``   the residual stream: a block's output (its hidden-state element, where the block returns more).
``channels``   the channels of a convolution's ``(B, C, ...)`` value: dim 1, not the last dim.
=============  ============================================================================================

Activation :class:`~lightning_gradroute.Target` s with ``component=`` route at the component's site (for
``neurons`` the input of the down projection, so both halves of a gated neuron are covered); units count
components (heads, not features). :class:`~lightning_gradroute.ParameterTarget` s with ``component=`` route every
weight and bias that belongs to the units, along the right dim of each (HF ``Conv1D`` stores ``(in, out)``, the
transpose of ``nn.Linear``). :class:`~lightning_gradroute.Expansion` s with ``component=`` add units of it.

The table is keyed by class name (no import of ``transformers``), so it covers a family's model classes of any
version with the same layout. A custom model registers its own::

    register_architecture("MyMLP", mlp=MLPLayout(up=("fc1",), down="fc2", act="act"))
    Target("blocks.*", component="neurons")          # now routes MyMLP's neurons in every block
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "ARCHITECTURES",
    "COMPONENTS",
    "AttentionLayout",
    "Layout",
    "MLPLayout",
    "Part",
    "ParamUnits",
    "ResidualLayout",
    "find_parts",
    "is_conv1d",
    "layer_features",
    "linear_layer",
    "parameter_problem",
    "register_architecture",
    "site_problem",
    "submodule",
    "weight_dim",
]

COMPONENTS = ("neurons", "heads", "residual", "channels")


@dataclass(frozen=True)
class MLPLayout:
    """An MLP, by the names of its layers relative to the module that owns the layout.

    Args:
        up: the layers whose outputs are the neurons (for a gated MLP the gate first, then the up projection).
        down: the layer that reads the neurons.
        act: the activation module between them (the gate's, in a gated MLP), if it is a module.
        gated: the neuron is ``act(gate x) * up x``: routing ``act`` alone would leave ``up`` learning.
    """

    up: tuple[str, ...]
    down: str
    act: str | None = None
    gated: bool = False


@dataclass(frozen=True)
class AttentionLayout:
    """Attention heads, by the names of the projections relative to the owning module.

    Args:
        out: the output projection; its input is the heads' values side by side.
        q, k, v: separate projections (leave empty with ``fused``).
        fused: one projection computing queries, keys and values.
        fused_order: ``"blocks"``: ``[q | k | v]`` (GPT-2's ``c_attn``); ``"heads"``: per head ``[q k v]``
            (GPT-NeoX's ``query_key_value``).
        head_dim: the owner's attribute (dotted path) holding the size of one head.
        heads_attr: an attribute counting the query heads that an expansion must update, if the module has one.
    """

    out: str
    q: str = ""
    k: str = ""
    v: str = ""
    fused: str = ""
    fused_order: Literal["blocks", "heads"] = "blocks"
    head_dim: str = "head_dim"
    heads_attr: str | None = None


@dataclass(frozen=True)
class ResidualLayout:
    """A block: its output is the residual stream (``output_index`` picks it where the block returns a tuple)."""

    output_index: int | None = None


@dataclass(frozen=True)
class Layout:
    """What one module class holds: an MLP, attention heads, a block's residual stream (any of them)."""

    mlp: MLPLayout | None = None
    attention: AttentionLayout | None = None
    residual: ResidualLayout | None = None


#: class name -> its layout. Read by targets, parameter targets and expansion presets; extend it with
#: :func:`register_architecture`.
ARCHITECTURES: dict[str, Layout] = {}


def register_architecture(
    class_name: str,
    mlp: MLPLayout | None = None,
    attention: AttentionLayout | None = None,
    residual: ResidualLayout | None = None,
) -> None:
    """Tell the library what the modules of class ``class_name`` hold (replaces an earlier entry)."""
    if not (mlp or attention or residual):
        raise ValueError(f"register_architecture({class_name!r}): give an mlp, attention or residual layout")
    ARCHITECTURES[class_name] = Layout(mlp, attention, residual)


_GPT_MLP = MLPLayout(up=("c_fc",), down="c_proj", act="act")
_GATED_MLP = MLPLayout(up=("gate_proj", "up_proj"), down="down_proj", act="act_fn", gated=True)
_LLAMA_HEADS = AttentionLayout(q="q_proj", k="k_proj", v="v_proj", out="o_proj")
_BLOCK = ResidualLayout()
_ENCODER_LAYER = Layout(
    mlp=MLPLayout(up=("intermediate.dense",), down="output.dense", act="intermediate.intermediate_act_fn"),
    residual=_BLOCK,
)
for _name, _layout in {
    # GPT-2 (HF Conv1D layers), GPT-Neo, GPT-J, GPT-NeoX
    "GPT2MLP": Layout(mlp=_GPT_MLP),
    "GPT2Attention": Layout(attention=AttentionLayout(out="c_proj", fused="c_attn", heads_attr="num_heads")),
    "GPT2Block": Layout(residual=_BLOCK),
    "GPTNeoMLP": Layout(mlp=_GPT_MLP),
    "GPTNeoSelfAttention": Layout(
        attention=AttentionLayout(q="q_proj", k="k_proj", v="v_proj", out="out_proj", heads_attr="num_heads")
    ),
    "GPTNeoBlock": Layout(residual=ResidualLayout(output_index=0)),
    "GPTJMLP": Layout(mlp=MLPLayout(up=("fc_in",), down="fc_out", act="act")),
    "GPTJAttention": Layout(
        attention=AttentionLayout(q="q_proj", k="k_proj", v="v_proj", out="out_proj", heads_attr="num_attention_heads")
    ),
    "GPTJBlock": Layout(residual=_BLOCK),
    "GPTNeoXMLP": Layout(mlp=MLPLayout(up=("dense_h_to_4h",), down="dense_4h_to_h", act="act")),
    "GPTNeoXAttention": Layout(
        attention=AttentionLayout(out="dense", fused="query_key_value", fused_order="heads", head_dim="head_size")
    ),
    "GPTNeoXLayer": Layout(residual=_BLOCK),
    # gated MLPs with grouped KV heads
    **{f"{family}MLP": Layout(mlp=_GATED_MLP) for family in ("Llama", "Qwen2", "Qwen3", "Mistral", "Gemma")},
    **{f"{family}Attention": Layout(attention=_LLAMA_HEADS) for family in ("Llama", "Qwen2", "Qwen3", "Mistral")},
    **{f"{family}DecoderLayer": Layout(residual=_BLOCK) for family in ("Llama", "Qwen2", "Qwen3", "Mistral")},
    # BERT-style encoders
    **{f"{family}Layer": _ENCODER_LAYER for family in ("Bert", "Roberta")},
    **{
        f"{family}Attention": Layout(attention=AttentionLayout(
            q="self.query", k="self.key", v="self.value", out="output.dense", head_dim="self.attention_head_size"))
        for family in ("Bert", "Roberta")
    },  # fmt: skip
    # torch.nn transformers (heads live inside nn.MultiheadAttention's one function: not addressable)
    **{name: Layout(mlp=MLPLayout(up=("linear1",), down="linear2"), residual=_BLOCK)
       for name in ("TransformerEncoderLayer", "TransformerDecoderLayer")},  # fmt: skip
}.items():
    register_architecture(_name, _layout.mlp, _layout.attention, _layout.residual)


# ------------------------------------------------------------------------------------------- layer types
def is_conv1d(layer: nn.Module) -> bool:
    """An HF ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def layer_features(layer: nn.Module, side: Literal["out", "in"]) -> int:
    """The output or input features of an ``nn.Linear`` or HF ``Conv1D``."""
    weight: Tensor = layer.weight  # type: ignore[assignment]
    out_dim = 1 if is_conv1d(layer) else 0
    return weight.shape[out_dim if side == "out" else 1 - out_dim]


def submodule(module: nn.Module, name: str, where: str) -> nn.Module:
    """``module.get_submodule(name)``, or an error starting with ``where`` that lists the children."""
    try:
        return module.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in module.named_children())
        raise ValueError(f"{where}: no submodule {name!r} (children: {children})") from None


def linear_layer(module: nn.Module, name: str, where: str) -> nn.Module:
    """The ``nn.Linear`` or HF ``Conv1D`` called ``name`` inside ``module``."""
    layer = submodule(module, name, where)
    if not isinstance(layer, nn.Linear) and not is_conv1d(layer):
        raise ValueError(f"{where}: {name!r} is a {type(layer).__name__}, not an nn.Linear or HF Conv1D")
    return layer


def weight_dim(layer: nn.Module, side: Literal["out", "in"]) -> int:
    """The dim of the layer's weight that indexes its output (``"out"``) or input (``"in"``) features."""
    if isinstance(layer, nn.Embedding):
        return 1 if side == "out" else 0  # (vocab, features): a map from one-hot rows to features
    return int((side == "out") == is_conv1d(layer))


# ------------------------------------------------------------------------------------------------ parts
@dataclass
class Part:
    """One component found in a model: the owning module and its layout."""

    component: str
    name: str
    module: nn.Module
    layout: MLPLayout | AttentionLayout | ResidualLayout | None  # None: channels (any module)

    def sub(self, path: str) -> str:
        return f"{self.name}.{path}" if self.name else path

    def layer(self, path: str) -> nn.Module:
        return linear_layer(self.module, path, self.where)

    @property
    def where(self) -> str:
        return f"{self.component} of {self.name!r} ({type(self.module).__name__})"

    def head_dim(self) -> int:
        assert isinstance(self.layout, AttentionLayout)
        value: object = self.module
        for attr in self.layout.head_dim.split("."):
            value = getattr(value, attr, None)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{self.where}: no integer head size at {self.layout.head_dim!r}")
        return value

    def site(self) -> tuple[str, Literal["output", "input"], int | str | None, int, int]:
        """Where activation routing hooks this part: ``(module name, site, output_index, feature_dim, unit
        width)``; units of ``heads`` are ``head_dim`` features wide."""
        if self.component == "neurons":
            assert isinstance(self.layout, MLPLayout)
            return self.sub(self.layout.down), "input", None, -1, 1
        if self.component == "heads":
            assert isinstance(self.layout, AttentionLayout)
            return self.sub(self.layout.out), "input", None, -1, self.head_dim()
        if self.component == "residual":
            assert isinstance(self.layout, ResidualLayout)
            return self.name, "output", self.layout.output_index, -1, 1
        return self.name, "output", None, 1, 1

    def param_units(self) -> list[ParamUnits]:
        """Every weight and bias of this part's units, with the dim and the unit of each index along it."""
        if self.component == "neurons":
            return self._neuron_params()
        assert self.component == "heads", "ParameterTarget admits neurons and heads only"
        return self._head_params()

    def _neuron_params(self) -> list[ParamUnits]:
        assert isinstance(self.layout, MLPLayout)
        found = []
        for path, side in [(u, "out") for u in self.layout.up] + [(self.layout.down, "in")]:
            layer = self.layer(path)
            size = layer_features(layer, side)  # type: ignore[arg-type]
            new_units = getattr(layer, "new_units", None)
            keep = _positions(new_units.keep) if new_units is not None else torch.arange(size)
            found.append(ParamUnits(self.sub(f"{path}.weight"), layer.weight, weight_dim(layer, side), keep))
            if side == "out" and getattr(layer, "bias", None) is not None:
                found.append(ParamUnits(self.sub(f"{path}.bias"), layer.bias, 0, keep))
            if new_units is not None:  # an expansion's neurons: its own weight (reading rows / writing columns)
                new = _positions(new_units.new)
                found.append(ParamUnits(self.sub(f"{path}.new_units.weight"), new_units.weight,
                                        0 if side == "out" else 1, new))  # fmt: skip
                if new_units.bias is not None:
                    found.append(ParamUnits(self.sub(f"{path}.new_units.bias"), new_units.bias, 0, new))
        return found

    def _head_params(self) -> list[ParamUnits]:
        layout = self.layout
        assert isinstance(layout, AttentionLayout)
        hd = self.head_dim()
        out = self.layer(layout.out)
        if hasattr(out, "new_units"):
            raise ValueError(f"{self.where}: parameter routing of expanded heads by component is not supported; "
                             "name the parameters (ParameterTarget('...q_proj.**.weight', dim=0), ...)")
        width = layer_features(out, "in")
        found = [ParamUnits(self.sub(f"{layout.out}.weight"), out.weight, weight_dim(out, "in"),
                            torch.arange(width) // hd)]  # fmt: skip
        if layout.fused:
            index = torch.arange(layer_features(self.layer(layout.fused), "out"))
            # GPT-2: [q | k | v], each `width` wide; NeoX: per head [q k v], 3 * hd wide
            unit = index // (3 * hd) if layout.fused_order == "heads" else (index % width) // hd
            return found + self._rows(layout.fused, unit)
        kv_heads = layer_features(self.layer(layout.k), "out") // hd
        group = width // hd // kv_heads  # query heads per key/value head
        found += self._rows(layout.q, torch.arange(width) // hd)
        for path in (layout.k, layout.v):
            found += self._rows(path, torch.arange(kv_heads * hd) // hd * group, group)
        return found

    def _rows(self, path: str, unit: Tensor, group: int = 1) -> list[ParamUnits]:
        """The output rows of a projection (weight and bias) as units."""
        layer = self.layer(path)
        rows = [ParamUnits(self.sub(f"{path}.weight"), layer.weight, weight_dim(layer, "out"), unit, group)]
        if getattr(layer, "bias", None) is not None:
            rows.append(ParamUnits(self.sub(f"{path}.bias"), layer.bias, 0, unit, group))
        return rows

    @property
    def unit_count(self) -> int:
        """How many units this part has (neurons, heads), expansions included."""
        if self.component == "neurons":
            assert isinstance(self.layout, MLPLayout)
            return layer_features(self.layer(self.layout.down), "in") + _added(self.layer(self.layout.down))
        assert self.component == "heads"
        return layer_features(self.layer(self.layout.out), "in") // self.head_dim()  # type: ignore[union-attr]


@dataclass
class ParamUnits:
    """One parameter of a part: ``unit[i]`` is the unit of index ``i`` along ``dim``. ``group`` > 1: each index
    serves ``group`` consecutive units from ``unit[i]`` on (a key/value head shared by query heads)."""

    name: str
    param: nn.Parameter
    dim: int
    unit: Tensor
    group: int = 1


def _positions(segments: list[tuple[int, int]]) -> Tensor:
    return torch.tensor([i for a, b in segments for i in range(a, b)], dtype=torch.long)


def _added(layer: nn.Module) -> int:
    new_units = getattr(layer, "new_units", None)
    return 0 if new_units is None else new_units.added


def _pick(layout: Layout | None, component: str) -> MLPLayout | AttentionLayout | ResidualLayout | None:
    if layout is None:
        return None
    return {"neurons": layout.mlp, "heads": layout.attention, "residual": layout.residual}[component]


def find_parts(hits: list[tuple[str, nn.Module]], component: str, who: str) -> list[Part]:
    """The ``component`` parts in the modules ``hits`` matched: each hit itself if it owns one, else the
    outermost owners inside it (a block's MLP). ``channels`` are any matched module's dim 1.

    Raises:
        ValueError: an unknown component, or a hit holding none (naming its type and what the table knows).
    """
    if component not in COMPONENTS:
        raise ValueError(f"{who}: unknown component {component!r}; components are {', '.join(COMPONENTS)}")
    if component == "channels":
        return [Part(component, name, module, None) for name, module in hits]
    parts = []
    for name, module in hits:
        found = list(_owners(name, module, component))
        if not found:
            known = sorted(n for n, lay in ARCHITECTURES.items() if _pick(lay, component))
            raise ValueError(
                f"{who}: {name!r} ({type(module).__name__}) holds no {component} the library knows (known owners: "
                f"{', '.join(known[:8])}, ...); register the layout with register_architecture, or use a module "
                "path and dims"
            )
        parts += found
    return parts


def _owners(name: str, module: nn.Module, component: str) -> Iterator[Part]:
    layout = _pick(ARCHITECTURES.get(type(module).__name__), component)
    if layout is not None:
        yield Part(component, name, module, layout)
        return
    for child_name, child in module.named_children():
        yield from _owners(f"{name}.{child_name}" if name else child_name, child, component)


# ------------------------------------------------------------------------------------- raw-site checks
def site_problem(
    model: nn.Module, name: str, module: nn.Module, feature_dim: int, sequence_first: bool, units: list[object],
    routes: bool,
) -> str | None:
    """Why routing module ``name`` of ``model`` by path would route something other than what is meant, or
    ``None``. ``units`` are the selections used there, ``routes`` whether gradients (not only forward masks) are
    routed."""
    if feature_dim == -1 and isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
        return (f"{type(module).__name__} values are (B, C, ...): feature_dim=-1 indexes the last spatial dim, not "
                "channels; set feature_dim=1 (or component='channels')")
    for owner_name, owner, rel in _ancestors(model, name):
        layout_order = _is_sequence_first(owner)
        if layout_order is not None and layout_order != sequence_first:
            if sequence_first:
                return (f"sequence_first=True, but it runs batch-first inside {owner_name or 'the model'!r} "
                        f"({type(owner).__name__}, batch_first=True); drop sequence_first")
            return (f"it runs sequence-first inside {owner_name or 'the model'!r} ({type(owner).__name__}, "
                    "batch_first=False): its values are (T, B, ...) while labels lead with the batch; set "
                    "sequence_first=True on the Target")
        layout = ARCHITECTURES.get(type(owner).__name__)
        mlp, attention = (layout.mlp, layout.attention) if layout else (None, None)
        if routes and mlp is not None and mlp.gated and rel in (*mlp.up, mlp.act):
            return (f"it is {'the gate activation' if rel == mlp.act else 'one half'} of a gated MLP "
                    f"({type(owner).__name__}: a neuron is act({mlp.up[0]} x) * {mlp.up[1]} x), so the other half "
                    f"would keep learning; route the neurons with component='neurons' on {owner_name!r} (the input "
                    f"of {mlp.down})")
        if attention is not None and rel == attention.fused and any(u != "all" for u in units):
            return (f"its output is the fused query/key/value projection of {type(owner).__name__}, so units "
                    f"{', '.join(repr(u) for u in units if u != 'all')} pick features of queries, keys or values "
                    f"separately; route heads with component='heads' on {owner_name!r}")
    return None


def parameter_problem(
    model: nn.Module, name: str, along_outputs: bool, per_unit: bool, routed_alike: Callable[[str], bool]
) -> str | None:
    """Why routing parameter ``name`` by name would route part of a unit, or ``None``. ``along_outputs``: it is
    routed along its layer's outputs; ``per_unit``: its units are weighed differently; ``routed_alike(name)``:
    another parameter is routed with the same table."""
    layer_name, _, attribute = name.rpartition(".")
    if not (along_outputs and per_unit and attribute in ("weight", "bias")):
        return None
    for owner_name, owner, rel in _ancestors(model, layer_name):
        layout = ARCHITECTURES.get(type(owner).__name__)
        mlp, attention = (layout.mlp, layout.attention) if layout else (None, None)
        if mlp is not None and mlp.gated and rel in mlp.up:
            other = f"{owner_name}.{mlp.up[1 - mlp.up.index(rel)]}.{attribute}"
            if not routed_alike(other):
                return (f"a gated MLP's neuron is act({mlp.up[0]} x) * {mlp.up[1]} x ({type(owner).__name__}), and "
                        f"{other!r} is not routed like it, so the other half of the same neurons keeps learning; "
                        f"route both alike, or ParameterTarget(modules={owner_name!r}, component='neurons')")
        if attention is not None and rel == attention.fused:
            return (f"its outputs are {type(owner).__name__}'s fused queries, keys and values, so per-unit weights "
                    "pick some of each separately; route heads with "
                    f"ParameterTarget(modules={owner_name!r}, component='heads')")
    return None


def _ancestors(model: nn.Module, name: str) -> Iterator[tuple[str, nn.Module, str]]:
    """``(name, module, path of `name` inside it)`` for ``name`` itself and every module above it, innermost
    first."""
    parts = name.split(".") if name else []
    for cut in range(len(parts), -1, -1):
        prefix = ".".join(parts[:cut])
        yield prefix, model.get_submodule(prefix), ".".join(parts[cut:])


def _is_sequence_first(module: nn.Module) -> bool | None:
    """Whether a torch.nn transformer module runs sequence-first; ``None`` for modules that do not say."""
    if isinstance(module, (nn.MultiheadAttention, nn.Transformer)):
        return not module.batch_first
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not module.self_attn.batch_first
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and len(module.layers):
        return _is_sequence_first(module.layers[0])
    return None
