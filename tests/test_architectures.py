"""Units by meaning (components), and the configurations that would route something other than what they say.

Every component is checked against an independent computation: per-token gradients weighted by hand from an
unrouted pass for parameter routing, a hand-written gradient hook for activation routing. Every refusal is a case
that routed the wrong units without a word before components existed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

from lightning_gradroute import Expansion, ForwardMask, GradientRouter, ParameterTarget, Route, Target, expand
from lightning_gradroute.architectures import ARCHITECTURES, MLPLayout, is_conv1d, layer_features, register_architecture

D, HEADS, FF, VOCAB, SEQ = 16, 4, 32, 30, 5


def gpt2() -> nn.Module:
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=D, n_head=HEADS, n_inner=FF, vocab_size=VOCAB,
                                            resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).double()  # fmt: skip


def gpt_neo() -> nn.Module:
    config = tf.GPTNeoConfig(num_layers=2, hidden_size=D, num_heads=HEADS, intermediate_size=FF, vocab_size=VOCAB,
                             attention_types=[[["global"], 2]], resid_dropout=0, embed_dropout=0, attention_dropout=0)
    return tf.GPTNeoForCausalLM(config).double()


def llama() -> nn.Module:
    config = tf.LlamaConfig(num_hidden_layers=2, hidden_size=D, num_attention_heads=HEADS, num_key_value_heads=2,
                            intermediate_size=FF, vocab_size=VOCAB)  # fmt: skip
    return tf.LlamaForCausalLM(config).double()


def neox() -> nn.Module:
    config = tf.GPTNeoXConfig(num_hidden_layers=2, hidden_size=D, num_attention_heads=HEADS, intermediate_size=FF,
                              vocab_size=VOCAB, hidden_dropout=0, attention_dropout=0)  # fmt: skip
    return tf.GPTNeoXForCausalLM(config).double()


BLOCKS = {gpt2: "transformer.h.*", gpt_neo: "transformer.h.*", llama: "model.layers.*", neox: "gpt_neox.layers.*"}


def loss(model: nn.Module, ids: Tensor) -> Tensor:
    return model(ids, labels=ids).loss


def grads(model: nn.Module, ids: Tensor, router: GradientRouter | None = None, labels: Tensor | None = None
          ) -> dict[str, Tensor]:  # fmt: skip
    model.zero_grad()
    if router is None:
        loss(model, ids).backward()
    else:
        with router.attached(model), router.route(labels):  # type: ignore[arg-type]
            loss(model, ids).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def hand_weighted(model: nn.Module, ids: Tensor, labels: Tensor, router: GradientRouter) -> dict[str, Tensor]:
    """Parameter routing computed by hand from an unrouted pass: each routed weight's gradient is
    ``sum_i m_i * outer(dy_i, x_i)`` over the items (tokens) of its layer, with ``m_i`` the row of item i's label
    along the routed dim (parameter routing leaves every activation gradient as it is)."""
    with router.attached(model):
        tables = {p.name: (p.dim, p.table.clone()) for p in router.parameters}
    seen: dict[str, list[Tensor]] = {}

    def keep(owner: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            seen[owner] = [args[0].detach().reshape(-1, args[0].shape[-1])]
            out.register_hook(lambda g: seen[owner].append(g.reshape(-1, g.shape[-1])))
        return hook

    owners = {name.rpartition(".")[0] for name in tables}
    handles = [model.get_submodule(o).register_forward_hook(keep(o)) for o in owners]
    expected = grads(model, ids)
    for handle in handles:
        handle.remove()
    for name, (dim, table) in tables.items():
        owner, _, attribute = name.rpartition(".")
        x, dy = seen[owner]
        m = table[labels.reshape(-1)].to(x.dtype)  # (items, units along dim)
        conv1d = is_conv1d(model.get_submodule(owner))
        if attribute == "bias":
            expected[name] = (m * dy).sum(0)
            continue
        outputs = dim == (1 if conv1d else 0)
        weight = (m * dy).t() @ x if outputs else dy.t() @ (m * x)  # (out, in)
        expected[name] = weight.t() if conv1d else weight
    return expected


# --------------------------------------------------------------------------------- parameter components
@pytest.mark.parametrize("build", [gpt2, gpt_neo, llama, neox], ids=lambda b: b.__name__)
@pytest.mark.parametrize("component", ["neurons", "heads"])
def test_parameter_components_equal_a_hand_weighted_gradient(build: Any, component: str) -> None:
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, VOCAB, (2, SEQ))
    labels = torch.randint(0, 2, (2, SEQ))
    routes = [Route("forget", "p", {":-2": 0.0, "-2:": 1.0}), Route("retain", "p", {"-2:": 0.0})]
    router = GradientRouter({"p": ParameterTarget(modules=BLOCKS[build], component=component)}, routes)
    expected = hand_weighted(model, ids, labels, router)
    got = grads(model, ids, router, labels)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)


def readme_parameter_example() -> Any:
    """The README's SGTM example, run as written (the code block up to the LightningModule)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    (block,) = [b for b in blocks if 'component="neurons")},' in b and "ablate_label" in b]
    scope: dict[str, Any] = {}
    exec(block.split("class LM")[0], scope)
    return scope["routing"]


def test_the_readme_parameter_example_routes_the_neurons_on_gpt2_and_gpt_neo_alike() -> None:
    """The same config on a Conv1D (in, out) GPT-2 and an nn.Linear (out, in) GPT-Neo: forget tokens change only
    the last 64 neurons, i.e. c_fc's last 64 output features and c_proj's last 64 input features, on both."""
    ff = 96
    for out_dim, config in ((1, tf.GPT2Config(n_layer=2, n_embd=D, n_head=HEADS, n_inner=ff, vocab_size=VOCAB)),
                            (0, tf.GPTNeoConfig(num_layers=2, hidden_size=D, num_heads=HEADS, intermediate_size=ff,
                                                vocab_size=VOCAB, attention_types=[[["global"], 2]]))):  # fmt: skip
        torch.manual_seed(1)
        lm = nn.Module()
        lm.model = tf.AutoModelForCausalLM.from_config(config).double().eval()
        router = readme_parameter_example().router
        lm.zero_grad()
        ids = torch.randint(0, VOCAB, (2, SEQ))
        with router.attached(lm), router.route(torch.tensor([1, 1])):  # forget only
            loss(lm.model, ids).backward()
        for block in range(2):
            mlp = lm.model.transformer.h[block].mlp
            up, down, bias = mlp.c_fc.weight.grad, mlp.c_proj.weight.grad, mlp.c_fc.bias.grad
            assert not up.narrow(out_dim, 0, ff - 64).any() and up.narrow(out_dim, ff - 64, 64).abs().sum() > 0
            assert not down.narrow(1 - out_dim, 0, ff - 64).any() and down.narrow(1 - out_dim, ff - 64, 64).any()
            assert not bias[: ff - 64].any() and bias[ff - 64 :].any()


def test_heads_of_fused_projections_are_their_query_key_and_value_slices() -> None:
    hd = D // HEADS
    for build, fused, rows in ((gpt2, "attn.c_attn", [0, D, 2 * D]), (neox, "attention.query_key_value", None)):
        torch.manual_seed(2)
        model = build().eval()
        blocks = BLOCKS[build]
        router = GradientRouter({"h": ParameterTarget(modules=blocks, component="heads")},
                                [Route("forget", "h", {"1": 0.0})])  # fmt: skip
        got = grads(model, torch.randint(0, VOCAB, (2, SEQ)), router, torch.ones(2, SEQ, dtype=torch.long))
        grad = got[f"{blocks[:-2]}.0.{fused}.weight"]
        grad = grad if build is neox else grad.t()  # GPT-2's Conv1D is (in, out)
        # GPT-2: [q | k | v] blocks of D, head 1 is features hd:2hd of each; NeoX: head 1 is rows 3hd:6hd
        blocked = [r + hd + i for r in rows for i in range(hd)] if rows else list(range(3 * hd, 6 * hd))
        free = [r for r in range(3 * D) if r not in blocked]
        assert not grad[blocked].any() and grad[free].abs().sum(1).all()


def test_grouped_kv_heads_go_with_their_query_heads_and_a_split_group_is_an_error() -> None:
    model = llama()
    router = GradientRouter({"h": ParameterTarget(modules="model.layers.*", component="heads")},
                            [Route("forget", "h", {"2:": 0.0})])  # fmt: skip
    with router.attached(model):
        k_proj = next(p for p in router.parameters if p.name == "model.layers.0.self_attn.k_proj.weight")
        assert k_proj.table[1].tolist() == [1.0] * 4 + [0.0] * 4  # KV head 1 serves query heads 2 and 3
    split = GradientRouter({"h": ParameterTarget(modules="model.layers.*", component="heads")},
                           [Route("forget", "h", {"1": 0.0})])  # fmt: skip
    with pytest.raises(ValueError, match=r"k_proj.weight'.*key/value head 0 serves query heads 0-1 \(grouped KV\)"):
        split.attach(model)


# -------------------------------------------------------------------------------- activation components
def hand_masked(model: nn.Module, ids: Tensor, module: str, mask: Tensor, site: str) -> dict[str, Tensor]:
    """The gradient with ``mask`` multiplied into the gradient of ``module``'s output / first input by a hook."""
    layer = model.get_submodule(module)

    def scale(value: Tensor) -> None:
        value.register_hook(lambda g: g * mask)

    if site == "input":
        handle = layer.register_forward_pre_hook(lambda m, args: scale(args[0]))
    else:
        handle = layer.register_forward_hook(lambda m, args, out: scale(out[0] if isinstance(out, tuple) else out))
    try:
        return grads(model, ids)
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("build", "component", "site_module", "site", "width"),
    [(llama, "neurons", "model.layers.1.mlp.down_proj", "input", 1),
     (gpt2, "neurons", "transformer.h.1.mlp.c_proj", "input", 1),
     (llama, "heads", "model.layers.1.self_attn.o_proj", "input", D // HEADS),
     (gpt_neo, "residual", "transformer.h.1", "output", 1)],
    ids=["llama-neurons", "gpt2-neurons", "llama-heads", "gpt_neo-residual"],
)  # fmt: skip
def test_activation_components_equal_a_hand_masked_gradient_at_their_site(
    build: Any, component: str, site_module: str, site: str, width: int
) -> None:
    torch.manual_seed(3)
    model = build().eval()
    ids = torch.randint(0, VOCAB, (2, SEQ))
    labels = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]])
    block = ".".join(site_module.split(".")[:3])  # the block holding the site
    router = GradientRouter({"c": Target(block, component=component)}, [Route("forget", "c", {"1:3": -0.5})])
    with router.attached(model):
        (found,) = router.sites
        assert (found.module_name, found.target.site, found.unit_width) == (site_module, site, width)
    size = layer_features(model.get_submodule(site_module), "in") if site == "input" else D
    table = torch.ones(2, size // width, dtype=torch.float64)
    table[1, 1:3] = -0.5
    mask = table.repeat_interleave(width, 1)[labels]
    expected = hand_masked(model, ids, site_module, mask, site)
    got = grads(model, ids, router, labels)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)
    if component == "neurons" and build is llama:  # both halves of a gated neuron are blocked, not only the gate
        only = GradientRouter({"c": Target("model.layers.1", component="neurons")}, [Route("forget", "c", {":4": 0})])
        blocked = grads(model, ids, only, torch.ones(2, SEQ, dtype=torch.long))
        for half in ("gate_proj", "up_proj"):
            g = blocked[f"model.layers.1.mlp.{half}.weight"]
            assert not g[:4].any() and g[4:].abs().sum(1).all()


def test_expanding_by_component_equals_the_architecture_preset() -> None:
    for build, presets in ((gpt2, ("gpt2_mlp", "gpt2_attn")), (llama, ("llama_mlp", "llama_attn"))):
        by_preset, by_component = build(), build()
        blocks = BLOCKS[build]
        mlp, attn = (".mlp", ".attn") if build is gpt2 else (".mlp", ".self_attn")
        a = expand(by_preset, [Expansion(blocks + mlp, preset=presets[0], add=4),
                               Expansion(blocks + attn, preset=presets[1], add=2)])  # fmt: skip
        b = expand(by_component, [Expansion(blocks, component="neurons", add=4),
                                  Expansion(blocks, component="heads", add=2)])  # fmt: skip
        assert a.params == b.params and a.unit_groups == b.unit_groups and a.attrs == b.attrs


def test_expanded_neurons_are_the_expanded_units_of_a_component_target() -> None:
    model = gpt_neo()
    record = expand(model, [Expansion("transformer.h.*", component="neurons", add=4)])
    router = GradientRouter(
        {"p": ParameterTarget(modules="transformer.h.*", component="neurons"),
         "a": Target("transformer.h.*", component="neurons")},
        [Route("retain", "p", {"expanded": 0.0}), Route("forget", "a", {"original": -0.75, "expanded": 1.0})],
    )  # fmt: skip
    with router.attached(model, record):
        tables = {p.name.split(".", 3)[-1]: p.table[0] for p in router.parameters if ".h.0." in p.name}
        assert tables["mlp.c_fc.weight"].all() and not tables["mlp.c_fc.new_units.weight"].any()
        assert not tables["mlp.c_proj.new_units.weight"].any() and tables["mlp.c_proj.weight"].all()
        assert router.sites[0].unit_groups["expanded"] == list(range(FF, FF + 4))


def test_a_registered_custom_layout_is_routed_by_component() -> None:
    class MyMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc2(self.act(self.fc1(x)))

    model = nn.Sequential(MyMLP(), MyMLP())
    target = Target("*", component="neurons")
    with pytest.raises(ValueError, match=r"'0' \(MyMLP\) holds no neurons the library knows.*register_architecture"):
        GradientRouter({"n": target}, [Route("forget", "n", 0.0)]).attach(model)
    register_architecture("MyMLP", mlp=MLPLayout(up=("fc1",), down="fc2", act="act"))
    try:
        router = GradientRouter({"n": target}, [Route("forget", "n", 0.0)]).attach(model)
        assert [s.module_name for s in router.sites] == ["0.fc2", "1.fc2"]
    finally:
        del ARCHITECTURES["MyMLP"]


def test_config_leaves_the_new_fields_out_at_their_defaults_so_old_checkpoints_resume() -> None:
    router = GradientRouter({"a": Target("x"), "p": ParameterTarget("w", dim=0)}, [Route("forget", "a", 0.0),
                            Route("forget", "p", 0.0)])  # fmt: skip
    config = router.config()["targets"]
    assert config == {"a": {"modules": "x", "site": "output", "output_index": None, "feature_dim": -1,
                            "units": "all", "nested": False}, "p": {"params": "w", "dim": 0, "units": "all"}}


# ------------------------------------------------------------------------------ what used to route silently
def test_an_int_dim_on_a_conv1d_weight_is_refused_with_the_layout_it_has() -> None:
    """Case 1: the README's SGTM example copied onto GPT-2 routed c_fc's 16 *input* features as 'neurons'."""
    router = GradientRouter({"up": ParameterTarget("transformer.h.*.mlp.c_fc.weight", dim=0)},
                            [Route("forget", "up", {":-8": 0.0})])  # fmt: skip
    with pytest.raises(ValueError, match=r"'transformer.h.0.mlp.c_fc.weight' is an HF Conv1D weight, stored \(in, "
                       r"out\) = \(16, 32\).*dim=0 indexes its 16 input features; write dim='out'"):
        router.attach(gpt2())
    by_side = GradientRouter({"up": ParameterTarget("transformer.h.*.mlp.c_fc.weight", dim="out")},
                             [Route("forget", "up", {":-8": 0.0})]).attach(gpt2())  # fmt: skip
    assert {p.dim for p in by_side.parameters} == {1}


def test_a_weight_routed_along_its_inputs_beside_its_bias_is_refused() -> None:
    """Sibling of case 1: a bias indexes outputs, so unit i of the two are unrelated (a bias routed alike in every
    unit pairs nothing and is fine)."""
    targets = {"down": ParameterTarget("transformer.h.*.mlp.c_proj.weight", dim=1),
               "down_bias": ParameterTarget("transformer.h.*.mlp.c_proj.bias")}  # fmt: skip
    router = GradientRouter(targets, [Route("forget", t, {":8": 0.0}) for t in targets])
    with pytest.raises(ValueError, match=r"'down'.*routes the layer's input features, while.*'down_bias'.*outputs"):
        router.attach(gpt_neo())
    whole_bias = [Route("forget", "down", {":8": 0.0}), Route("forget", "down_bias", 0.0)]  # SGTM: bias frozen
    GradientRouter(targets, whole_bias).attach(gpt_neo())


def test_routing_one_half_of_a_gated_mlp_is_refused_and_masking_it_is_not() -> None:
    """Case 2: Llama's act_fn is only the gate path; up_proj rows of 'blocked' neurons kept learning."""
    for module in ("act_fn", "up_proj", "gate_proj"):
        router = GradientRouter({"mlp": Target(f"model.layers.*.mlp.{module}")}, [Route("forget", "mlp", 0.0)])
        with pytest.raises(ValueError, match=r"of a gated MLP \(LlamaMLP: a neuron is act\(gate_proj x\) \* up_proj x"
                           r"\).*component='neurons' on 'model.layers.0.mlp'"):
            router.attach(llama())
    masked = GradientRouter({"act": Target("model.layers.*.mlp.act_fn")}, [], masks=[ForwardMask("retain", "act",
                            "-4:")])  # fmt: skip
    masked.attach(llama())  # act * 0 * up is 0: a forward mask hides the whole neuron


def test_a_conv_value_routed_along_its_last_dim_is_refused() -> None:
    """Case 3: on (B, C, H, W), feature_dim=-1 with units '0:1' routed a column of pixels, not a channel."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match=r"'0' \(Conv2d\): Conv2d values are \(B, C, \.\.\.\): feature_dim=-1"):
        GradientRouter({"c": Target("0", units="0:1")}, [Route("forget", "c", 0.0)]).attach(model)
    after_relu = GradientRouter({"c": Target("1", units="0:1")}, [Route("forget", "c", 0.0)]).attach(model)
    with pytest.raises(ValueError, match=r"shape \(2, 4, 4, 4\); feature_dim=-1.*column of pixels.*feature_dim=1"):
        with after_relu.route(torch.tensor([0, 1])):
            model(torch.randn(2, 3, 6, 6))
    after_relu.detach()
    channels = GradientRouter({"c": Target("0", component="channels", units="0:1")}, [Route("forget", "c", 0.0)])
    x, labels = torch.randn(2, 3, 6, 6), torch.tensor([1, 1])
    model.zero_grad()
    with channels.attached(model), channels.route(labels):
        model(x).sum().backward()
    assert not model[0].weight.grad[0].any() and model[0].weight.grad[1:].abs().sum() > 0


def test_sequence_first_values_are_refused_without_sequence_first_and_routed_exactly_with_it() -> None:
    """Case 4: (T, B, D) activations with (B, T) labels misrouted silently when B == T."""
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=FF, dropout=0.0).double()
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match=r"'0.linear2' \(Linear\): it runs sequence-first inside '0'.*sequence_first"
                       r"=True"):
        GradientRouter({"n": Target("0.linear2", site="input")}, [Route("forget", "n", 0.0)]).attach(model)
    with pytest.raises(ValueError, match=r"sequence-first"):
        GradientRouter({"n": Target("0", component="neurons")}, [Route("forget", "n", 0.0)]).attach(model)
    batch_first = nn.Sequential(nn.TransformerEncoderLayer(D, 2, dim_feedforward=FF, batch_first=True))
    with pytest.raises(ValueError, match=r"sequence_first=True, but it runs batch-first inside '0'"):
        GradientRouter({"n": Target("0.linear2", site="input", sequence_first=True)},
                       [Route("forget", "n", 0.0)]).attach(batch_first)  # fmt: skip
    x = torch.randn(3, 3, D, dtype=torch.float64)  # (T, B, D), B == T
    labels = torch.tensor([[0, 1, 1], [1, 0, 0], [0, 0, 1]])  # (B, T)
    router = GradientRouter({"n": Target("0.linear2", site="input", sequence_first=True)},
                            [Route("forget", "n", {":8": 0.0})])  # fmt: skip
    model.zero_grad()
    with router.attached(model), router.route(labels):
        model(x).pow(2).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    table = torch.ones(2, FF, dtype=torch.float64)
    table[1, :8] = 0.0
    mask = table[labels.t()]  # (T, B, FF)
    model.zero_grad()

    def scale(module: nn.Module, args: Any) -> None:
        args[0].register_hook(lambda g: g * mask)

    handle = layer.linear2.register_forward_pre_hook(scale)
    model(x).pow(2).sum().backward()
    handle.remove()
    for name, param in model.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_part_of_a_fused_qkv_output_is_refused() -> None:
    router = GradientRouter({"qkv": Target("transformer.h.*.attn.c_attn", units="0:4")}, [Route("forget", "qkv", 0.0)])
    with pytest.raises(ValueError, match=r"fused query/key/value projection of GPT2Attention.*component='heads'"):
        router.attach(gpt2())
    GradientRouter({"qkv": Target("transformer.h.*.attn.c_attn")}, [Route("forget", "qkv", 0.0)]).attach(gpt2())


def test_a_tied_alias_names_the_parameter_it_is() -> None:
    router = GradientRouter({"unembed": ParameterTarget("lm_head.weight", dim="out")},
                            [Route("forget", "unembed", 0.0)])  # fmt: skip
    with pytest.raises(ValueError, match=r"'lm_head.weight' is tied to 'transformer.wte.weight' \(the same tensor\)"):
        router.attach(gpt2())


@pytest.mark.parametrize(
    ("make", "message"),
    [(lambda: Target("x", component="neuron"), r"unknown component 'neuron'; components are neurons, heads"),
     (lambda: Target("x", component="heads", feature_dim=1), r"component 'heads' decides the site"),
     (lambda: ParameterTarget("x.weight", component="neurons"), r"give modules= .*and neither params nor dim"),
     (lambda: ParameterTarget(modules="x"), r"give params= .*or modules= with component="),
     (lambda: ParameterTarget("x", dim="rows"), r"dim must be 'out', 'in' or an int >= 0, got 'rows'"),
     (lambda: ParameterTarget(modules="x", component="residual"), r"'residual' has no parameters of its own"),
     (lambda: Expansion("x", component="residual"), r"component must be 'neurons' or 'heads'"),
     (lambda: Expansion("x", preset="gpt2_mlp", component="neurons"), r"decides the layout; drop preset")],
)  # fmt: skip
def test_component_arguments_are_checked_at_construction(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_by_name_half_a_gated_neuron_or_part_of_a_fused_qkv_weight_is_refused() -> None:
    """The parameter-routing siblings of cases 2 and the fused q/k/v output."""
    gate_only = GradientRouter({"g": ParameterTarget("model.layers.*.mlp.gate_proj.weight", dim="out")},
                               [Route("forget", "g", {":8": 0.0})])  # fmt: skip
    with pytest.raises(ValueError, match=r"gate_proj.weight'.*'model.layers.0.mlp.up_proj.weight' is not routed "
                       r"like it.*component='neurons'"):  # fmt: skip
        gate_only.attach(llama())
    both = {"g": ParameterTarget("model.layers.*.mlp.gate_proj.weight", dim="out"),
            "u": ParameterTarget("model.layers.*.mlp.up_proj.weight", dim="out")}  # fmt: skip
    GradientRouter(both, [Route("forget", t, {":8": 0.0}) for t in both]).attach(llama())
    qkv = GradientRouter({"a": ParameterTarget("transformer.h.*.attn.c_attn.weight", dim="out")},
                         [Route("forget", "a", {":4": 0.0})])  # fmt: skip
    with pytest.raises(ValueError, match=r"c_attn.weight'.*fused queries, keys and values.*component='heads'"):
        qkv.attach(gpt2())
    GradientRouter({"a": ParameterTarget("transformer.h.*.attn.c_attn.weight", dim="out")},
                   [Route("forget", "a", 0.0)]).attach(gpt2())  # fmt: skip
