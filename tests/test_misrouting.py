"""No silent mis-routing: every configuration routes exactly what it says or stops with one line naming the culprit.

One test per way a configuration used to route the wrong thing, or nothing, without a word: globs that crossed
dots, structured outputs that were skipped, containers that are never called, route sets that route nothing,
sites that never saw a gradient, and unit keys that crashed obscurely. Gradients are compared with an
independent computation: the routed tensors replaced by ``a.detach() + m * (a - a.detach())`` with a mask built
by hand, differentiated with ``torch.autograd.grad``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from era_models import SEQ, VOCAB, gpt2
from torch import Tensor, nn

from lightning_gradroute import GradientRouter, Route, Target


def hand_routed(model: nn.Module, masks: Mapping[str, Tensor], loss_fn: Callable[[nn.Module], Tensor],
                pick: Callable[[Any], Tensor] = lambda out: out,
                put: Callable[[Any, Tensor], Any] = lambda out, new: new) -> dict[str, Tensor]:
    """Gradients of ``loss_fn(model)`` with the output of each module in ``masks`` routed by hand."""

    def hook(mask: Tensor) -> Callable[..., Any]:
        def delta(module: nn.Module, args: Any, out: Any) -> Any:
            a = pick(out)
            return put(out, a.detach() + mask * (a - a.detach()))

        return delta

    handles = [model.get_submodule(name).register_forward_hook(hook(m)) for name, m in masks.items()]
    try:
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(loss_fn(model), list(params.values()), allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return {n: g if g is not None else torch.zeros_like(params[n]) for n, g in zip(params, grads)}


def routed(model: nn.Module, router: GradientRouter, labels: Tensor, loss_fn: Callable[[nn.Module], Tensor]
           ) -> dict[str, Tensor]:
    model.zero_grad()
    with router.attached(model), router.route(labels):
        loss_fn(model).backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


def assert_same(got: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def lm_loss(ids: Tensor) -> Callable[[nn.Module], Tensor]:
    return lambda model: model(ids, labels=ids).loss


IDS = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1, 1])
# forget: hidden dims 0:8 blocked, 8:12 reversed; per example, broadcast over the sequence.
FORGET = Route("forget", "blocks", {"0:8": 0.0, "8:12": -0.75})
MASK = torch.ones(2, 16)
MASK[1, :8], MASK[1, 8:12] = 0.0, -0.75


# ---------------------------------------------------------------------------------------- 1. path-semantics globs
def test_star_matches_one_dotted_segment_and_routes_exactly_the_blocks() -> None:
    torch.manual_seed(0)
    model = gpt2()
    router = GradientRouter({"blocks": Target("transformer.h.*")}, [FORGET])
    with router.attached(model):
        assert [s.module_name for s in router.sites] == ["transformer.h.0", "transformer.h.1"]
    mask = MASK[LABELS][:, None, :]
    expected = hand_routed(copy.deepcopy(model), {"transformer.h.0": mask, "transformer.h.1": mask}, lm_loss(IDS))
    assert_same(routed(model, router, LABELS, lm_loss(IDS)), expected)


@pytest.mark.parametrize(
    ("pattern", "names"),
    [
        ("transformer.h.*.mlp", ["transformer.h.0.mlp", "transformer.h.1.mlp"]),
        ("**.mlp.act", ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]),
        ("transformer.**.c_fc", ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]),
        ("transformer.h.[1].**.c_proj", ["transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]),
        ("transformer.h.?.ln_*", [f"transformer.h.{i}.ln_{j}" for i in (0, 1) for j in (1, 2)]),
        ("re:transformer\\.h\\.\\d", ["transformer.h.0", "transformer.h.1"]),  # regex: unchanged, fullmatch
    ],
)
def test_glob_segments(pattern: str, names: list[str]) -> None:
    router = GradientRouter({"t": Target(pattern)}, [Route("forget", "t", 0.0)])
    with router.attached(gpt2()):
        assert [s.module_name for s in router.sites] == names


def test_a_partial_double_star_segment_is_refused() -> None:
    with pytest.raises(ValueError, match=r"glob 'transformer.h\*\*.mlp': segment 'h\*\*' is not allowed"):
        Target("transformer.h**.mlp")


def test_matching_a_module_and_its_descendants_is_refused_unless_nested() -> None:
    router = GradientRouter({"t": Target("transformer.h.0.**")}, [Route("forget", "t", 0.0)])
    message = (r"target 't': pattern 'transformer.h.0.\*\*' matches 'transformer.h.0' and its descendants "
               r"transformer.h.0.ln_1, transformer.h.0.attn, .*set nested=True")
    with pytest.raises(ValueError, match=message):
        router.attach(gpt2())
    nested = GradientRouter({"t": Target("transformer.h.*.mlp.**", nested=True)}, [Route("forget", "t", 0.0)])
    with nested.attached(gpt2()):
        assert [s.module_name for s in nested.sites][:2] == ["transformer.h.0.mlp", "transformer.h.0.mlp.c_fc"]


# ----------------------------------------------------------------------------------------- 2. structured outputs
def test_an_hf_model_output_is_routed_by_key() -> None:
    torch.manual_seed(1)
    model = gpt2()
    router = GradientRouter({"blocks": Target("transformer", output_index="last_hidden_state")}, [FORGET])

    def put(out: Any, new: Tensor) -> Any:
        out["last_hidden_state"] = new
        return out

    expected = hand_routed(copy.deepcopy(model), {"transformer": MASK[LABELS][:, None, :]}, lm_loss(IDS),
                           pick=lambda out: out["last_hidden_state"], put=put)
    assert_same(routed(model, router, LABELS, lm_loss(IDS)), expected)
    assert expected["transformer.h.1.mlp.c_fc.weight"].abs().sum() > 0


class DictBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 16)

    def forward(self, x: Tensor, scale: Tensor | None = None) -> dict[str, Any]:
        h = self.proj(x) * (1.0 if scale is None else scale)
        return {"hidden": h, "count": 3}


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = DictBlock()
        self.head = nn.Linear(16, 2)
        self.scale = nn.Parameter(torch.full((1,), 1.5))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale.expand(x.shape[0], 1)  # per example, passed as a keyword
        return self.head(torch.tanh(self.block(x, scale=scale)["hidden"]))


def test_a_plain_dict_output_and_a_keyword_input_are_routed_by_key() -> None:
    torch.manual_seed(2)
    model, x = DictNet(), torch.randn(2, 5)

    def loss(m: nn.Module) -> Tensor:
        return m(x).pow(2).sum()

    by_key = GradientRouter({"blocks": Target("block", output_index="hidden")}, [FORGET])
    expected = hand_routed(copy.deepcopy(model), {"block": MASK[LABELS[1:]]}, loss,
                           pick=lambda out: out["hidden"], put=lambda out, new: {**out, "hidden": new})
    assert_same(routed(model, by_key, LABELS[1:], loss), expected)

    keyword = GradientRouter({"s": Target("block", site="input", output_index="scale")}, [Route("forget", "s", 0.0)])
    grads = routed(model, keyword, torch.tensor([1, 1]), loss)  # both examples forget: the scale learns nothing
    plain = hand_routed(copy.deepcopy(model), {}, loss)
    assert plain["scale"].abs().sum() > 0 and torch.equal(grads["scale"], torch.zeros(1))
    assert_same({k: v for k, v in grads.items() if k != "scale"}, {k: v for k, v in plain.items() if k != "scale"})


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (Target("transformer"), r"target 't' \(module 'transformer', output\): the module's output is a "
                                r"BaseModelOutputWithPastAndCrossAttentions with keys \['last_hidden_state', .*\]; "
                                r"set output_index to the key to route \(got None\)"),
        (Target("transformer", output_index=0), r"with keys .*; set output_index to the key to route \(got 0\)"),
        (Target("transformer.h.*", output_index=0), r"output is a tensor, not a tuple or dict; drop output_index=0"),
        (Target("transformer.h.0.attn", output_index=1), r"the routed value is a NoneType, not a tensor"),
        (Target("transformer.h.0", site="input", output_index="encoder_hidden_states"),
         r"called without keyword argument 'encoder_hidden_states'"),
    ],
)
def test_structured_values_that_cannot_be_routed_are_errors_at_the_first_routed_forward(
    target: Target, message: str
) -> None:
    model = gpt2()
    router = GradientRouter({"t": target}, [Route("forget", "t", 0.0)])
    with router.attached(model), pytest.raises(ValueError, match=message), router.route(LABELS):
        model(IDS)


def test_a_container_that_is_never_called_is_refused_at_attach() -> None:
    router = GradientRouter({"t": Target("transformer.h")}, [Route("forget", "t", 0.0)])
    with pytest.raises(ValueError, match=r"target 't': 'transformer.h' is a ModuleList, a container that is never "
                                         r"called; target the modules inside it \(e.g. 'transformer.h.\*'\)"):
        router.attach(gpt2())


# --------------------------------------------------------------------------------- 3. route sets that route nothing
TARGETS = {"t": Target("transformer.h.*.mlp.c_fc", units="0:16")}


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ([Route("forget", "t", {"0:4": 0.0}), Route("forget", "t", {"4:8": 0.0})],
         r"routes\[0\] and routes\[1\] both route label 'forget' at target 't'; merge their weights"),
        ([Route("forget", "t", 1.0)], r"Route 'forget' -> 't': every weight is 1, so it routes nothing"),
        ([], r"GradientRouter: no routes, so nothing is routed"),
    ],
)
def test_route_sets_that_route_nothing_fail_in_the_constructor(routes: list[Route], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradientRouter(TARGETS, routes)


def test_a_target_without_a_route_fails_in_the_constructor() -> None:
    with pytest.raises(ValueError, match=r"target 'u' has no route, so it routes nothing"):
        GradientRouter({**TARGETS, "u": Target("lm_head")}, [Route("forget", "t", 0.0)])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"16:32": 0.0}, r"units '16:32' do not intersect the target's units '0:16' at target 't' \(module "
                         r"'transformer.h.0.mlp.c_fc', output\); the entry routes nothing"),
        ({"0:4": 0.0, "all": -1.0}, r"entry '0:4' is overridden entirely by later entries"),
        ({"0:4": 1.0, "-4:": 0.0}, r"units '-4:' do not intersect"),
        ({"0:4": 0.0, "0:8": 1.0}, r"entry '0:4' is overridden entirely"),
        ({"20:30": 0.0, "0:16": 1.0}, r"units '20:30' do not intersect"),
    ],
)
def test_route_entries_that_route_nothing_fail_at_attach(weights: dict[str, float], message: str) -> None:
    router = GradientRouter(TARGETS, [Route("forget", "t", weights)])
    with pytest.raises(ValueError, match=message):
        router.attach(gpt2())


def test_a_route_whose_effective_weights_are_all_one_fails_at_attach() -> None:
    router = GradientRouter(TARGETS, [Route("forget", "t", {"all": 0.0, "0:16": 1.0})])
    with pytest.raises(ValueError, match=r"entry 'all' is overridden entirely"):
        router.attach(gpt2())
    router = GradientRouter(TARGETS, [Route("forget", "t", {"16:32": 0.0})])  # outside the target's own units
    with pytest.raises(ValueError, match=r"units '16:32' do not intersect"):
        router.attach(gpt2())


def test_allow_noop_accepts_control_configurations() -> None:
    for routes in ([], [Route("forget", "t", 1.0)]):
        router = GradientRouter({**TARGETS, "u": Target("lm_head")}, routes, allow_noop=True)
        model = gpt2()
        plain = copy.deepcopy(model)
        assert_same(routed(model, router, LABELS, lm_loss(IDS)), hand_routed(plain, {}, lm_loss(IDS)))


# ------------------------------------------------------------------------------------- 4. coverage and telemetry
class Partial(nn.Module):
    """``unused`` is never called; ``frozen`` only sees data (no grad); ``dead`` feeds nothing into the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.used = nn.Linear(4, 4)
        self.dead = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.used(self.frozen(x))
        self.dead(h)
        return h.sum()


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("unused", r"target 't' \(module 'unused', output\) was never called while routing"),
        ("frozen", r"target 't' \(module 'frozen', output\) was called but its value never required grad"),
        ("dead", r"target 't' \(module 'dead', output\) received no gradient in backward"),
    ],
)
def test_sites_that_route_nothing_are_errors_after_the_first_routed_batch(module: str, message: str) -> None:
    model = Partial()
    router = GradientRouter({"t": Target(module), "ok": Target("used")},
                            [Route("forget", "t", 0.0), Route("forget", "ok", 0.0)])
    with router.attached(model), pytest.raises(ValueError, match=f"gradient routing routed nothing at: {message}"):
        with router.route(torch.tensor([0, 1])):
            model(torch.randn(2, 4)).backward()


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act(self.fc(x)))


def test_a_compiled_graph_reused_without_the_hooks_is_caught() -> None:
    """torch.compile reuses one instance's graph for another instance of the class, and by default does not guard
    on hooks: the routed instance would silently run unrouted. The coverage check stops it; guarding on hooks
    (what the README recommends when compiling several instances) routes it."""
    torch.manual_seed(0)
    x, labels = torch.randn(3, 4), torch.tensor([1, 1, 1])
    router = GradientRouter({"a": Target("act")}, [Route("forget", "a", 0.0)])

    def compile_then_route() -> Small:
        torch._dynamo.reset()
        torch.compile(Small(), backend="aot_eager")(x).sum().backward()  # an unrouted instance, compiled first
        routed = Small()
        compiled = torch.compile(routed, backend="aot_eager")
        with router.attached(routed), router.route(labels):
            compiled(x).sum().backward()
        return routed

    with pytest.raises(ValueError, match=r"'act', output\) was never called while routing"):
        compile_then_route()
    # config.patch, not monkeypatch: restoring through setattr left dynamo's config unreadable for later tests
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        routed = compile_then_route()
    assert torch.count_nonzero(routed.fc.weight.grad) == 0  # all forget, weight 0: nothing reached fc
    torch._dynamo.reset()


def test_coverage_is_proved_once_per_attach_and_without_backward_it_says_so() -> None:
    model = Partial()
    router = GradientRouter({"ok": Target("used")}, [Route("forget", "ok", 0.0)])
    with router.attached(model):
        with router.route(torch.tensor([0, 1])):
            model(torch.randn(2, 4)).backward()
        assert router.coverage_checked and router.sites[0].backward == 1
    with router.attached(model), pytest.raises(ValueError, match="received no gradient in backward"):
        with router.route(torch.tensor([0, 1])):
            model(torch.randn(2, 4))  # backward outside route() is not routed: say so


def test_grad_norm_telemetry_per_label_and_unit_group_matches_a_hand_computation() -> None:
    torch.manual_seed(3)
    model = gpt2()
    router = GradientRouter({"blocks": Target("transformer.h.*")}, [FORGET], telemetry=True)
    captured: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            out.register_hook(lambda g: captured.__setitem__(name, g))

        return hook

    with router.attached(model):
        blocks = ("transformer.h.0", "transformer.h.1")
        handles = [model.get_submodule(n).register_forward_hook(keep(n), prepend=True) for n in blocks]
        with router.route(LABELS):
            lm_loss(IDS)(model).backward()
        for handle in handles:
            handle.remove()
        norms = router.pop_grad_norms()
        assert all(v == 0 for v in router.pop_grad_norms().values())  # popped: reset
    groups = ("all", "0:8", "8:12")
    assert set(norms) == {("blocks", label, group) for label in ("retain", "forget") for group in groups}
    # captured before the router's hook (prepend): the gradient reaching the raw block output, i.e. after routing.
    for label, rows in (("retain", LABELS == 0), ("forget", LABELS == 1)):
        for group, units in (("all", slice(None)), ("0:8", slice(0, 8)), ("8:12", slice(8, 12))):
            expected = sum(g[rows][..., units].pow(2).sum() for g in captured.values())
            torch.testing.assert_close(norms[("blocks", label, group)], expected, rtol=1e-5, atol=1e-12)
    assert norms[("blocks", "forget", "0:8")] == 0 and norms[("blocks", "forget", "8:12")] > 0  # no leakage


# --------------------------------------------------------------------------------------------- 5. unit keys
def test_integer_unit_keys_route_that_unit() -> None:
    torch.manual_seed(4)
    model = gpt2()
    router = GradientRouter({"blocks": Target("transformer.h.*")}, [Route("forget", "blocks", {0: 0.0, 3: -0.5})])
    mask = torch.ones(2, 16)
    mask[1, 0], mask[1, 3] = 0.0, -0.5
    mask = mask[LABELS][:, None, :]
    expected = hand_routed(copy.deepcopy(model), {"transformer.h.0": mask, "transformer.h.1": mask}, lm_loss(IDS))
    assert_same(routed(model, router, LABELS, lm_loss(IDS)), expected)


@pytest.mark.parametrize("units", [1.5, True, [0, "1"], (), None])
def test_malformed_unit_keys_are_one_line_errors(units: Any) -> None:
    with pytest.raises(ValueError, match=r"are not a unit selection: use 'all', 'expanded', 'original', a slice"):
        Route("forget", "t", {units: 0.0} if not isinstance(units, list) else {tuple(units): 0.0})
