"""Where to route: module-name patterns, hook sites and unit selections; what to route: per-label weights.

A :class:`Target` names a set of modules (a dotted-path glob over ``named_modules()``, or a regex with the
``re:`` prefix, matched with ``fullmatch``), the hook site (``output`` or ``input``) and the feature dim. A
:class:`Route` says: for data with this label, at this target, multiply the gradient of these units by these
weights. A :class:`ForwardMask` says: for data with this label, at this target, zero these units in the forward
pass (SGTM's retain mode).

Module patterns have path semantics: a name is a list of dotted segments, ``*`` and ``?`` match within one
segment, ``[0-4]`` is a character class, and a segment that is exactly ``**`` matches any number of whole
segments (zero included). On an HF GPT-2, ``transformer.h.*`` is the blocks (``transformer.h.0``, ...) and
nothing inside them; ``transformer.h.*.mlp`` is every block's MLP; ``transformer.**.act`` is every ``act``
at any depth.

Units are written as

* ``"all"``: every feature;
* a slice string ``"0:16"``, ``":8"``, ``"-64:"`` or a single index ``"3"``;
* a comma list ``"0,3,5"``, a list of ints ``[0, 3, 5]`` or a single int ``3``;
* ``"expanded"`` / ``"original"``: symbolic groups filled in by the expansion step, so recipes never hard-code
  sizes.

By meaning, ``Target(..., component="neurons")`` and ``ParameterTarget(modules=..., component="neurons")`` address
the MLP neurons, attention heads, residual stream or conv channels on any architecture
:mod:`~lightning_gradroute.architectures` knows, and units count those components.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from lightning_gradroute.architectures import COMPONENTS, is_conv1d, layer_features, weight_dim

__all__ = [
    "ForwardMask",
    "ParameterTarget",
    "Route",
    "Target",
    "UnitGroups",
    "Units",
    "RouteTable",
    "feature_size_hint",
    "pick_value",
    "raise_route_problems",
    "resolve_modules",
    "resolve_parameters",
    "route_table",
    "telemetry_groups",
    "unit_indices",
    "units_label",
]

Units = Union[str, int, Sequence[int]]
#: Symbolic unit groups per hook site: ``{(module_name, site): {"expanded": [...], "original": [...]}}``.
UnitGroups = Mapping[tuple[str, str], Mapping[str, Sequence[int]]]
SYMBOLIC_UNITS = ("expanded", "original")
_SLICE = re.compile(r"^\s*(-?\d*)\s*:\s*(-?\d*)\s*$")
_INDEX_LIST = re.compile(r"^\s*-?\d+(\s*,\s*-?\d+)*\s*$")


def _check_units(units: object, where: str) -> None:
    if isinstance(units, str):
        if units == "all" or units in SYMBOLIC_UNITS or _SLICE.match(units) or _INDEX_LIST.match(units):
            return
        raise ValueError(
            f"{where}: units {units!r} are not 'all', 'expanded', 'original', a slice like '0:16' or a list like '0,3'"
        )
    if _is_int(units):
        return
    if not isinstance(units, Sequence) or not units or not all(_is_int(i) for i in units):
        raise ValueError(
            f"{where}: units {units!r} are not a unit selection: use 'all', 'expanded', 'original', a slice like "
            "'0:16', an index like 3 or a list of ints like [0, 3]"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def units_label(units: Units) -> str:
    """A short name for a unit selection (``"original"``, ``"0:16"``, ``"3"``, ``"0,3"``), for messages and logs."""
    if isinstance(units, str):
        return units
    if _is_int(units):
        return str(units)
    return ",".join(str(i) for i in units)  # type: ignore[union-attr]


def unit_indices(
    units: Units, size: int, groups: Mapping[str, Sequence[int]] | None = None, where: str = ""
) -> list[int]:
    """Resolve ``units`` to a sorted list of feature indices in ``range(size)``.

    Raises:
        ValueError: an index out of range, or a symbolic group that no expansion defined.
    """
    _check_units(units, where)
    if _is_int(units):
        units = [units]  # type: ignore[list-item]
    if isinstance(units, str):
        if units == "all":
            return list(range(size))
        if units in SYMBOLIC_UNITS:
            if not groups or units not in groups:
                raise ValueError(
                    f"{where}: units {units!r} need an expansion of this module; none defines them "
                    "(add an Expansion that covers it, or use explicit units like '0:16')"
                )
            indices = list(groups[units])
        elif m := _SLICE.match(units):
            start, stop = (int(v) if v else None for v in m.groups())
            for bound in (start, stop):
                if bound is not None and not -size <= bound <= size:
                    raise ValueError(f"{where}: slice {units!r} is out of range for {size} features")
            indices = list(range(size))[slice(start, stop)]
            if not indices:
                raise ValueError(f"{where}: slice {units!r} selects no feature out of {size}")
            return indices
        else:
            indices = [int(v) for v in units.split(",")]
    else:
        indices = list(units)  # type: ignore[arg-type]
    bad = [i for i in indices if not -size <= i < size]
    if bad:
        raise ValueError(f"{where}: unit indices {bad} are out of range for {size} features")
    return sorted({i % size for i in indices})


@dataclass(frozen=True)
class Target:
    """A set of hook sites addressed by module name.

    Args:
        modules: a dotted-path glob over ``model.named_modules()`` or, with the ``re:`` prefix, a regex matched
            with ``re.fullmatch`` (``"re:blocks\\.(0|1)\\.mlp"``). In a glob, ``*`` matches within one dotted
            segment and a ``**`` segment spans any number of segments: ``"transformer.h.*"`` is the blocks of an
            HF GPT-2 and nothing inside them, ``"transformer.h.[0-4].mlp.act"`` five activations,
            ``"**.act"`` every ``act`` at any depth. Names are those of the module you train (the LightningModule
            in Lightning). A pattern that matches nothing is an error listing the closest names.
        site: ``"output"`` routes the module's output (forward hook), ``"input"`` its input (forward pre-hook).
        output_index: which part of a structured value to route. For ``site="output"``: an int picks an element
            of a tuple or list output, a str a key of a dict-like output (an HF ``ModelOutput``:
            ``"last_hidden_state"``). For ``site="input"``: an int picks a positional argument (default 0), a str
            a keyword argument. Leave it ``None`` for a module that returns a tensor; a structured output without
            it, or an index on a tensor output, is an error at the first routed forward.
        feature_dim: the dim of the routed tensor that indexes features (units). The label dims (batch, and
            sequence for per-token labels) must lead.
        units: the features this target addresses; routes may narrow them further. Default ``"all"``.
        nested: allow the pattern to match a module *and* one of its descendants (both are routed, so their
            weights multiply along that path). Off by default: such a match is usually a too-wide pattern.
        component: route a part of the matched modules by meaning, on any architecture
            :mod:`~lightning_gradroute.architectures` knows: ``"neurons"`` (an MLP's hidden units, both halves of a
            gated one), ``"heads"`` (attention heads; units count heads), ``"residual"`` (a block's output),
            ``"channels"`` (dim 1 of a conv value). The pattern may name the parts or modules holding them (the
            blocks: ``Target("transformer.h.*", component="neurons")``); the site, index and feature dim follow
            from the architecture, so leave ``site``, ``output_index`` and ``feature_dim`` at their defaults.
        sequence_first: the routed value is ``(T, B, ...)`` (``nn.TransformerEncoderLayer(batch_first=False)``);
            labels ``(B,)`` or ``(B, T)`` are laid over it accordingly. A path into a module the library knows
            to be sequence-first without it is an error: the labels would be read along the wrong dims.
    """

    modules: str
    site: Literal["output", "input"] = "output"
    output_index: int | str | None = None
    feature_dim: int = -1
    units: Units = "all"
    nested: bool = False
    component: str | None = None
    sequence_first: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.modules, str) or not self.modules:
            raise ValueError(f"Target.modules must be a non-empty pattern, got {self.modules!r}")
        if self.modules.startswith("re:"):
            try:
                re.compile(self.modules[3:])
            except re.error as err:
                raise ValueError(f"Target.modules regex {self.modules!r} does not compile: {err}") from None
        else:
            bad = [seg for seg in self.modules.split(".") if "**" in seg and seg != "**" or not seg]
            if bad:
                raise ValueError(
                    f"Target.modules glob {self.modules!r}: segment {bad[0]!r} is not allowed ('**' must be a whole "
                    "segment, and segments are non-empty)"
                )
        if self.site not in ("output", "input"):
            raise ValueError(f"Target {self.modules!r}: site must be 'output' or 'input', got {self.site!r}")
        if self.output_index is not None and not (_is_int(self.output_index) or isinstance(self.output_index, str)):
            raise ValueError(
                f"Target {self.modules!r}: output_index must be an int, a str key or None, got {self.output_index!r}"
            )
        if not _is_int(self.feature_dim):
            raise ValueError(f"Target {self.modules!r}: feature_dim must be an int, got {self.feature_dim!r}")
        _check_units(self.units, f"Target {self.modules!r}")
        if not isinstance(self.units, str) and not _is_int(self.units):
            object.__setattr__(self, "units", tuple(self.units))  # type: ignore[arg-type]
        if self.component is not None:
            _check_component(self.component, f"Target {self.modules!r}")
            if (self.site, self.output_index, self.feature_dim) != ("output", None, -1):
                raise ValueError(
                    f"Target {self.modules!r}: component {self.component!r} decides the site, output_index and "
                    "feature_dim; leave them at their defaults (or drop component and name the site yourself)"
                )

    def matches(self, name: str) -> bool:
        """Whether the module called ``name`` is one of this target's (see ``modules`` for the syntax)."""
        if self.modules.startswith("re:"):
            return re.fullmatch(self.modules[3:], name) is not None
        return _glob_match(tuple(self.modules.split(".")), tuple(name.split(".")))


@dataclass(frozen=True)
class ParameterTarget:
    """A set of parameters whose gradient is routed per item, inside backward (parameter-level routing).

    Where a :class:`Target` scales the gradient flowing back through an activation (so everything upstream
    learns less), a ``ParameterTarget`` scales only what each item contributes to these parameters' gradients:
    the gradient flowing on to the layer's input, and so to every earlier layer, is untouched. Exact per example
    or per token, in mixed batches, before any all-reduce (so under DDP and gradient accumulation too), for
    parameters used as the weight or bias of ``F.linear`` (``nn.Linear``), ``torch.addmm`` (HF ``Conv1D``) or
    ``F.embedding`` (``nn.Embedding``). Any other differentiable use of a routed parameter is an error.

    Either by meaning — ``modules`` and ``component``: every weight and bias of the units, along the right dim of
    each, on any architecture :mod:`~lightning_gradroute.architectures` knows — or by name — ``params`` and
    ``dim``.

    Args:
        params: a dotted-path glob over ``model.named_parameters()`` (same syntax as ``Target.modules``) or a
            ``re:`` regex: ``"transformer.h.*.mlp.c_fc.weight"``.
        dim: the dim of the parameter that units index. ``"out"`` / ``"in"``: the layer's output / input
            features whatever its layout (an MLP's neurons are the ``"out"`` of its up projection and the ``"in"``
            of its down projection; for an ``nn.Embedding``, ``"out"`` is its features and ``"in"`` its vocabulary
            rows). An int is the tensor dim: for an ``nn.Linear`` weight ``(out, in)``, 0 is its outputs; a bias
            has only dim 0. HF ``Conv1D`` weights (GPT-2) are stored ``(in, out)``, the transpose, so an int dim
            there is refused: write ``"out"`` or ``"in"``.
        units: the units this target addresses (the same language as activation targets). By name,
            ``"expanded"`` is all of a parameter an expansion added and ``"original"`` all of one it did not; by
            component they are the expansion's units and the model's own, and units count components (heads).
        modules: with ``component``: a module glob naming the parts or the modules holding them (the blocks).
        component: ``"neurons"`` (an MLP's up/gate rows and biases and down-projection columns, an expansion's
            new ones included) or ``"heads"`` (query/key/value rows and biases — GPT-2's fused ``c_attn`` and
            NeoX's ``query_key_value`` split per head — and output-projection columns; under grouped KV heads, a
            key/value head is routed with the query heads sharing it, which must then be routed alike).

    Example (SGTM-style: forget tokens may only change neurons 64: of every MLP; GPT-2, GPT-Neo, Llama alike)::

        targets = {"mlp": ParameterTarget(modules="model.transformer.h.*", component="neurons")}
        routes = [Route("forget", "mlp", {":64": 0.0})]
    """

    params: str = ""
    dim: Union[int, Literal["out", "in"]] = 0
    units: Units = "all"
    modules: str = ""
    component: str | None = None

    def __post_init__(self) -> None:
        where = f"ParameterTarget {self.params or self.modules!r}"
        if self.component is not None:
            _check_component(self.component, where)
            if self.component not in ("neurons", "heads"):
                raise ValueError(
                    f"{where}: component {self.component!r} has no parameters of its own that parameter routing "
                    "covers (it does 'neurons' and 'heads'); route it with an activation Target"
                )
            if self.params or not self.modules or self.dim != 0:
                raise ValueError(
                    f"{where}: with component {self.component!r}, give modules= (the blocks or MLPs / attention "
                    "modules) and neither params nor dim: the component decides which dims are its units"
                )
            Target(self.modules)  # the same pattern rules and errors
        else:
            if not self.params or self.modules:
                raise ValueError(
                    f"{where}: give params= (a parameter glob), or modules= with component= (e.g. 'neurons')"
                )
            Target(self.params)
        if self.dim not in ("out", "in") and (not _is_int(self.dim) or self.dim < 0):  # type: ignore[operator]
            raise ValueError(f"{where}: dim must be 'out', 'in' or an int >= 0, got {self.dim!r}")
        _check_units(self.units, where)
        if not isinstance(self.units, str) and not _is_int(self.units):
            object.__setattr__(self, "units", tuple(self.units))  # type: ignore[arg-type]

    @property
    def pattern(self) -> str:
        """The glob this target matches: over parameters by name, over modules by component."""
        return self.modules if self.component is not None else self.params

    def matches(self, name: str) -> bool:
        """Whether the parameter (or, by component, module) called ``name`` is one of this target's."""
        return Target(self.pattern).matches(name)


#: Fields added after configs were first checkpointed, with their defaults: a config leaves them out at the
#: default, so that a checkpoint from before them resumes under the same configuration.
LATER_FIELDS = {"component": None, "sequence_first": False, "modules": ""}


def _check_component(component: object, where: str) -> None:
    if component not in COMPONENTS:
        raise ValueError(f"{where}: unknown component {component!r}; components are {', '.join(COMPONENTS)}")


def resolve_parameters(
    model: nn.Module, target: ParameterTarget, target_name: str = ""
) -> list[tuple[str, nn.Parameter, int]]:
    """Return the ``(name, parameter, dim)`` of ``model`` that a by-name ``target`` matches, in model order, with
    ``"out"`` / ``"in"`` resolved to each parameter's tensor dim.

    Raises:
        ValueError: nothing matched (with the closest names; a tied alias names the parameter it is), a parameter
            without ``dim``, an int dim on an HF ``Conv1D`` weight, or a parameter that does not require grad.
    """
    label = target_name or target.params
    named = list(model.named_parameters())
    hits = [(n, p) for n, p in named if target.matches(n)]
    if not hits:
        canonical = {id(p): n for n, p in named}
        tied = [(n, canonical[id(p)]) for n, p in model.named_parameters(remove_duplicate=False)
                if target.matches(n) and id(p) in canonical]  # fmt: skip
        if tied:
            raise ValueError(
                f"parameter target {label!r}: {tied[0][0]!r} is tied to {tied[0][1]!r} (the same tensor), which "
                f"is the name it goes by; target {tied[0][1]!r} (its routing covers every use of the tensor)"
            )
        names = [n for n, _ in named]
        probe = target.params.removeprefix("re:")
        close = difflib.get_close_matches(probe, names, n=5, cutoff=0.3) or names[:5]
        raise ValueError(
            f"parameter target {label!r}: pattern {target.params!r} matches no parameter of "
            f"{type(model).__name__}; closest names: {', '.join(close)}"
        )
    found = []
    for name, param in hits:
        owner = model.get_submodule(name.rpartition(".")[0])
        dim = target.dim
        if isinstance(dim, str):
            if param.dim() == 1:
                if dim == "in":
                    raise ValueError(f"parameter target {label!r}: {name!r} is a bias; it has only output features")
                dim = 0
            elif isinstance(owner, (nn.Linear, nn.Embedding)) or is_conv1d(owner):
                dim = weight_dim(owner, dim)  # type: ignore[arg-type]
            else:
                raise ValueError(
                    f"parameter target {label!r}: {name!r} belongs to a {type(owner).__name__}, whose 'out' / 'in' "
                    "features the library does not know; give dim as an int"
                )
        elif is_conv1d(owner) and param.dim() == 2:
            meaning = "input" if dim == 0 else "output"
            raise ValueError(
                f"parameter target {label!r}: {name!r} is an HF Conv1D weight, stored (in, out) = "
                f"{tuple(param.shape)}, the transpose of nn.Linear: dim={dim} indexes its {param.shape[dim]} "
                f"{meaning} features; write dim='out' for its outputs (an up projection's neurons) or dim='in' "
                "for its inputs, or use component='neurons' / 'heads'"
            )
        if param.dim() <= dim:
            raise ValueError(
                f"parameter target {label!r}: {name!r} of shape {tuple(param.shape)} has no dim {target.dim}"
            )
        if not param.requires_grad:
            raise ValueError(f"parameter target {label!r}: {name!r} does not require grad; nothing to route")
        found.append((name, param, dim))
    return found


@functools.lru_cache(maxsize=4096)
def _glob_match(pattern: tuple[str, ...], name: tuple[str, ...]) -> bool:
    """Segment-wise glob: ``**`` spans any number of whole segments, anything else matches one segment."""
    if not pattern:
        return not name
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_glob_match(rest, name[i:]) for i in range(len(name) + 1))
    return bool(name) and fnmatch.fnmatchcase(name[0], head) and _glob_match(rest, name[1:])


@dataclass(frozen=True)
class Route:
    """For data with ``label``, at ``target``, multiply the gradient of some units by some weights.

    Args:
        label: one of the label names declared on the router / callback.
        target: a key of the router's ``targets`` mapping.
        weights: a single weight for all of the target's units, or a mapping from a unit selection
            (``"expanded"``, ``"original"``, ``"0:16"``, ``"all"``, an int index...) to a weight. Later entries win
            where selections overlap; an entry that later ones override entirely, or that selects none of the
            target's units, is an error at ``attach`` (it would route nothing). Units not named keep weight 1;
            labels with no route keep weight 1 everywhere.

    Example: the paper's ERA route for forget tokens::

        Route(label="forget", target="mlp", weights={"original": -0.75, "expanded": 1.0})
    """

    label: str
    target: str
    weights: Union[float, Mapping[str, float]] = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.weights, Mapping):
            if not self.weights:
                raise ValueError(f"Route {self.label!r} -> {self.target!r}: weights mapping is empty")
            for units, w in self.weights.items():
                _check_units(units, f"Route {self.label!r} -> {self.target!r}")
                _check_weight(w, self)
            object.__setattr__(self, "weights", dict(self.weights))
        else:
            _check_weight(self.weights, self)

    def __str__(self) -> str:
        return f"Route {self.label!r} -> {self.target!r}"

    def unit_weights(self) -> list[tuple[Units | None, float]]:
        """``(units, weight)`` pairs in application order; ``None`` units mean the target's own units."""
        if isinstance(self.weights, Mapping):
            return [(u, float(w)) for u, w in self.weights.items()]
        return [(None, float(self.weights))]

    @property
    def is_identity(self) -> bool:
        """Every weight is 1: the route leaves every gradient as it is."""
        return all(w == 1.0 for _, w in self.unit_weights())


@dataclass(frozen=True)
class ForwardMask:
    """For data with ``label``, at ``target``, multiply ``units`` by 0 in the forward pass (in training steps).

    Routes never change a forward value; a mask does: items of ``label`` do not see the units at all (their value
    there is ``x * 0``, so no gradient flows through them either), while every other item's value is bit for bit
    what it would be without the mask. This is SGTM's "retain mode" (Shilov et al. 2025): retain data never learns
    to rely on the units dedicated to forget data, so removing them afterwards costs it nothing it trained with.
    SGTM runs retain mode on only a fraction of its retain data (``retain_retain_perc``: 25% in its TinyStories
    configs) and trains the rest, and unlabelled data, unmasked; to do the same, give that fraction its own label
    (``labels=["retain", "forget", "retain_masked"]``) and mask only that one.

    Masks apply exactly when routes do: while the router holds labels (a training step, from
    ``on_train_batch_start`` to ``on_train_batch_end``, its backward and any recomputation included, in any grad
    mode); validation, test, predict and anything after ``fit`` run unmasked. Labels must be integers: a soft
    label is refused, since it would scale activations rather than hide them.

    Args:
        label: one of the label names declared on the router / callback.
        target: a key of the router's ``targets`` mapping naming an activation :class:`Target` (a parameter target
            has no forward value to mask). The target may also carry routes, or only masks.
        units: the units to zero, within the target's units, in the language of :class:`Target` (a slice
            ``"192:"``, a list, ``"expanded"`` / ``"original"`` of an expansion). ``"all"``, and a selection that
            comes out as every feature of a site, are refused: zeroing a site's whole value cuts every path through
            it, which is a too-wide selection, not a retain mode.

    Example: retain tokens do not see the 64 forget neurons an ERA expansion added::

        ForwardMask(label="retain", target="mlp", units="expanded")
    """

    label: str
    target: str
    units: Units

    def __post_init__(self) -> None:
        _check_units(self.units, str(self))
        if self.units == "all":
            raise ValueError(
                f"{self}: units 'all' would zero the whole value for {self.label!r} items, cutting every path "
                "through the site; name the units to hide (a slice like '192:', or 'expanded')"
            )
        if not isinstance(self.units, str) and not _is_int(self.units):
            object.__setattr__(self, "units", tuple(self.units))  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"ForwardMask {self.label!r} -> {self.target!r}"

    def as_route(self) -> Route:
        """The route whose weight table is this mask's (0 on the units for the label), to build tables with."""
        return Route(self.label, self.target, {units_label(self.units): 0.0})


def _check_weight(w: object, route: Route) -> None:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w != w or w in (float("inf"), float("-inf")):
        raise ValueError(f"Route {route.label!r} -> {route.target!r}: weight {w!r} is not a finite number")


@dataclass
class RouteTable:
    """A ``(labels, units)`` weight table and, per route, what in it routes nothing (for the errors)."""

    weights: torch.Tensor
    routes: list[Route]
    #: per route: the unit selections that select none of the target's units here
    empty: list[list[str]]
    #: per route: the unit selections that later entries override entirely here
    shadowed: list[list[str]]
    #: per route: whether its row is all ones here
    identity: list[bool]


def route_table(
    label_names: Sequence[str],
    target_units: Units,
    routes: Sequence[Route],
    size: int,
    unit_groups: Mapping[str, Sequence[int]],
    where: str,
) -> RouteTable:
    """Build the ``(num_labels, size)`` float32 weights of ``routes`` over ``size`` features (rows of labels
    without routes are all ones; later entries of a route win), noting the entries that route nothing."""
    weights = torch.ones(len(label_names), size)
    allowed = set(unit_indices(target_units, size, unit_groups, where))
    empty, shadowed, identity = [], [], []
    for route in routes:
        row = label_names.index(route.label)
        owner: dict[int, int] = {}
        entries = route.unit_weights()
        missing = []
        for k, (units, weight) in enumerate(entries):
            selected = allowed
            if units is not None:
                selected = allowed.intersection(unit_indices(units, size, unit_groups, where))
            if not selected:
                missing.append(units_label(units if units is not None else target_units))
            owner.update(dict.fromkeys(selected, k))
            weights[row, sorted(selected)] = weight
        empty.append(missing)
        kept = set(owner.values())
        shadowed.append([units_label(u) for k, (u, _) in enumerate(entries) if k not in kept and u is not None
                         and units_label(u) not in missing])  # fmt: skip
        identity.append(bool((weights[row] == 1).all()))
    return RouteTable(weights, list(routes), empty, shadowed, identity)


def telemetry_groups(
    target_units: Units, routes: Sequence[Route], size: int, unit_groups: Mapping[str, Sequence[int]], where: str
) -> tuple[list[str], Tensor]:
    """The unit groups gradient telemetry reports for a target: ``"all"`` (the target's units) and every selection
    a route names (within the target's units), as ``(names, (size, groups) 0/1 float32 membership matrix)``."""
    target = unit_indices(target_units, size, unit_groups, where)
    selections: dict[str, list[int]] = {"all": target}
    for route in routes:
        for units, _ in route.unit_weights():
            if units is not None:
                chosen = set(unit_indices(units, size, unit_groups, where))
                selections[units_label(units)] = sorted(chosen.intersection(target))
    matrix = torch.zeros(size, len(selections))
    for column, indices in enumerate(selections.values()):
        matrix[indices, column] = 1.0
    return list(selections), matrix


def raise_route_problems(table: RouteTable, where: str, allow_noop: bool, target_units: Units = "all") -> None:
    """Raise for the first route entry of ``table`` that routes nothing (see :class:`RouteTable`)."""
    for route, empty, shadowed, identity in zip(table.routes, table.empty, table.shadowed, table.identity):
        name = f"Route {route.label!r} -> {route.target!r}"
        if empty:
            raise ValueError(
                f"{name}: units {empty[0]!r} do not intersect the target's units {units_label(target_units)!r} at "
                f"{where}; the entry routes nothing"
            )
        if shadowed:
            raise ValueError(
                f"{name}: entry {shadowed[0]!r} is overridden entirely by later entries at {where} (later entries "
                "win); reorder or remove it"
            )
        if identity and not allow_noop:
            raise ValueError(
                f"{name}: every weight at {where} is 1, so it routes nothing; remove the route (or pass "
                "allow_noop=True for a control run)"
            )


def pick_value(value: Any, index: int | str | None, where: str, verb: str) -> tuple[Any, Callable[[Any], Any]]:
    """The part of a module's input or output that ``index`` names (see ``Target.output_index``), and a function
    that puts a replacement back in its place (a new tuple or list, a new dict, or an HF ``ModelOutput`` updated in
    place, being this call's own object).

    Raises:
        ValueError: a tensor with an index, a structured value without a fitting one, or any other type; the
            message starts with ``where`` and says what to ``verb``.
    """
    if isinstance(value, Tensor):
        if index is not None:
            raise ValueError(f"{where} is a tensor, not a tuple or dict; drop output_index={index!r}")
        return value, lambda new: new
    if isinstance(value, Mapping):  # dicts and HF ModelOutput
        if not isinstance(index, str) or index not in value:
            raise ValueError(
                f"{where} is a {type(value).__name__} with keys {list(value)}; set output_index to the key to {verb} "
                f"(got {index!r})"
            )

        def put_key(new: Any) -> Any:
            if type(value) is dict:
                return {**value, index: new}
            value[index] = new
            return value

        return value[index], put_key
    if isinstance(value, (tuple, list)):
        if not _is_int(index) or not -len(value) <= index < len(value):  # type: ignore[operator]
            raise ValueError(
                f"{where} is a {type(value).__name__} of {len(value)}; set output_index to the position to {verb} "
                f"(got {index!r})"
            )

        def put_item(new: Any) -> Any:
            items = list(value)
            items[index] = new  # type: ignore[index]
            if isinstance(value, tuple):
                return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
            return items

        return value[index], put_item  # type: ignore[index]
    raise ValueError(f"{where} is a {type(value).__name__}, not a tensor, tuple or dict; there is nothing to {verb}")


def resolve_modules(model: nn.Module, target: Target, target_name: str = "") -> list[tuple[str, nn.Module]]:
    """Return the ``(name, module)`` pairs of ``model`` that ``target`` matches, in model order.

    Raises:
        ValueError: nothing matched (the message lists the closest module names), or the pattern matched a module
            and one of its descendants without ``nested=True``.
    """
    label = target_name or target.modules
    named = [(n, m) for n, m in model.named_modules() if n]
    hits = [(n, m) for n, m in named if target.matches(n)]
    if not hits:
        names = [n for n, _ in named]
        probe = target.modules[3:] if target.modules.startswith("re:") else target.modules
        close = difflib.get_close_matches(probe, names, n=5, cutoff=0.3) or names[:5]
        raise ValueError(
            f"target {label!r}: pattern {target.modules!r} matches no module of "
            f"{type(model).__name__}; closest names: {', '.join(close)}"
        )
    if not target.nested:
        names = [n for n, _ in hits]
        for outer in names:
            inner = [n for n in names if n.startswith(f"{outer}.")]
            if inner:
                shown = ", ".join(inner[:3]) + (f" (+{len(inner) - 3} more)" if len(inner) > 3 else "")
                raise ValueError(
                    f"target {label!r}: pattern {target.modules!r} matches {outer!r} and its descendants {shown}; "
                    "narrow the pattern, or set nested=True to route both"
                )
    return hits


def feature_size_hint(module: nn.Module, site: str, feature_dim: int = -1) -> int | None:
    """The feature size at a site when the module type tells it (so unit ranges are checked before training)."""
    if feature_dim == 1 and isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if site == "output" else module.in_channels
    if feature_dim != -1:
        return None
    if isinstance(module, nn.Linear):
        return module.out_features if site == "output" else module.in_features
    if isinstance(module, nn.Embedding) and site == "output":
        return module.embedding_dim
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.normalized_shape:
        return module.normalized_shape[-1]
    if is_conv1d(module):  # HF GPT-2 Conv1D: weight (in, out)
        return layer_features(module, "out" if site == "output" else "in")
    return None
