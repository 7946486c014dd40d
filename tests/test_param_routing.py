"""Parameter-level routing: exact per item in mixed batches, input gradients untouched, never silent.

The reference is independent of the library: one backward pass per label, each on the loss of that label's items
only (weighted by their membership, for soft labels), and each parameter's gradients summed with the label's
weights along the routed dim (built by hand from the route's slice). Items are independent tokens (no attention),
so "the gradient from label l's items" is exactly what a backward pass on label l's loss gives. Float64.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from lightning_gradroute import GradientRouter, ParameterTarget, Route, Target


class TokenNet(nn.Module):
    """``ids -> embed -> layer (Linear or HF Conv1D) -> tanh -> head``: every token is an independent item."""

    def __init__(self, vocab: int, d_in: int, hidden: int, d_out: int, conv1d: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_in)
        self.layer = Conv1D(hidden, d_in) if conv1d else nn.Linear(d_in, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.layer(self.embed(ids))))


def token_losses(model: nn.Module, ids: Tensor, y: Tensor) -> Tensor:
    return (model(ids) - y).pow(2).sum(-1)  # (B, T)


def membership(labels: Tensor, n_labels: int, shape: tuple[int, int]) -> Tensor:
    """(B, T, labels): how much each token belongs to each label (per-example labels cover the sequence)."""
    if labels.is_floating_point():
        m = torch.stack([1 - labels, labels], -1)
    else:
        m = F.one_hot(labels, n_labels).double()
    return m[:, None, :].expand(*shape, n_labels) if labels.dim() == 1 else m


def per_label_reference(model: nn.Module, ids: Tensor, y: Tensor, labels: Tensor, n_labels: int,
                        tables: dict[str, tuple[int, Tensor]]) -> dict[str, Tensor]:  # fmt: skip
    """Sum over labels of (the gradient of that label's items' loss) x (its weights along the routed dim)."""
    member = membership(labels, n_labels, tuple(ids.shape))
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for label in range(n_labels):
        model.zero_grad()
        (token_losses(model, ids, y) * member[..., label]).sum().backward()
        for name, param in model.named_parameters():
            grad = param.grad.clone()
            if name in tables:
                dim, table = tables[name]
                shape = [1] * grad.dim()
                shape[dim] = -1
                grad = grad * table[label].view(shape)
            total[name] += grad
    return total


def routed_grads(model: nn.Module, router: GradientRouter, ids: Tensor, y: Tensor, labels: Tensor
                 ) -> dict[str, Tensor]:  # fmt: skip
    model.zero_grad()
    with router.attached(model), router.route(labels):
        token_losses(model, ids, y).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# (parameter, dim) pairs a case may route, per layer type
CHOICES = {
    False: [("layer.weight", 0), ("layer.weight", 1), ("layer.bias", 0), ("embed.weight", 0), ("embed.weight", 1),
            ("head.weight", 1)],
    True: [("layer.weight", 0), ("layer.weight", 1), ("layer.bias", 0), ("embed.weight", 1)],  # Conv1D: (in, out)
}  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_parameter_routing_equals_one_backward_per_label_summed_with_the_weights(data: st.DataObject) -> None:
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    conv1d, soft, per_token = data.draw(st.booleans()), data.draw(st.booleans()), data.draw(st.booleans())
    n_labels = 2 if soft else data.draw(st.integers(2, 3))
    b, t = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    vocab, d_in, hidden, d_out = (data.draw(st.integers(2, 6)) for _ in range(4))
    model = TokenNet(vocab, d_in, hidden, d_out, conv1d).double()
    ids, y = torch.randint(0, vocab, (b, t)), torch.randn(b, t, d_out, dtype=torch.float64)
    label_shape = (b, t) if per_token else (b,)
    labels = torch.rand(label_shape, dtype=torch.float64) if soft else torch.randint(0, n_labels, label_shape)
    names = [f"label{i}" for i in range(n_labels)]

    chosen = data.draw(st.lists(st.sampled_from(CHOICES[conv1d]), min_size=1, max_size=3,
                                unique_by=lambda c: c[0]))  # fmt: skip
    linear_dims = dict(chosen)  # a weight routed along its inputs beside its bias is refused (see test_architectures)
    assume(not ("layer.bias" in linear_dims and linear_dims.get("layer.weight") == (0 if conv1d else 1)))
    targets, routes, tables = {}, [], {}
    for k, (name, dim) in enumerate(chosen):
        size = model.get_parameter(name).shape[dim]
        conv1d_weight = conv1d and name == "layer.weight"  # Conv1D weights take their side, not a tensor dim
        targets[f"t{k}"] = ParameterTarget(name, dim=("in", "out")[dim] if conv1d_weight else dim)
        table = torch.ones(n_labels, size, dtype=torch.float64)
        for label in data.draw(st.lists(st.integers(0, n_labels - 1), min_size=1, max_size=n_labels, unique=True)):
            start = data.draw(st.integers(0, size - 1))
            stop = data.draw(st.integers(start + 1, size))
            weight = data.draw(st.sampled_from([0.0, 0.5, -0.75, 2.0]))
            routes.append(Route(names[label], f"t{k}", {f"{start}:{stop}": weight}))
            table[label, start:stop] = weight
        tables[name] = (dim, table)
    router = GradientRouter(targets, routes, names, allow_noop=True)  # a drawn weight may make a row all ones

    expected = per_label_reference(copy.deepcopy(model), ids, y, labels, n_labels, tables)
    got = routed_grads(model, router, ids, y, labels)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_forward_is_bit_identical_and_upstream_gradients_are_untouched() -> None:
    torch.manual_seed(0)
    model = TokenNet(7, 5, 6, 4, conv1d=True)
    ids, y = torch.randint(0, 7, (3, 4)), torch.randn(3, 4, 4)
    plain = model(ids)
    token_losses(model, ids, y).sum().backward()
    unrouted = {n: p.grad.clone() for n, p in model.named_parameters()}
    router = GradientRouter({"w": ParameterTarget("layer.weight", dim="out")}, [Route("forget", "w", 0.0)])
    model.zero_grad()
    with router.attached(model), router.route(torch.ones(3, dtype=torch.long)):
        routed = model(ids)
        assert torch.equal(routed, plain)
        (routed - y).pow(2).sum(-1).sum().backward()
    assert torch.count_nonzero(model.layer.weight.grad) == 0  # all forget: the weight learns nothing
    for name in ("embed.weight", "layer.bias", "head.weight", "head.bias"):  # upstream and downstream untouched
        torch.testing.assert_close(model.get_parameter(name).grad, unrouted[name], rtol=1e-6, atol=1e-7, msg=name)


def test_per_token_routing_inside_a_transformer_matches_a_hand_computation() -> None:
    """In a GPT-2 (attention mixes tokens), the weight gradient is sum_i m_i * outer(x_i, dy_i) over positions i."""
    from era_models import SEQ, VOCAB, gpt2

    torch.manual_seed(1)
    model = gpt2().double()
    ids = torch.randint(0, VOCAB, (2, SEQ))
    labels = torch.randint(0, 2, (2, SEQ))
    seen: dict[str, Tensor] = {}
    layer = model.transformer.h[1].mlp.c_fc  # Conv1D (in 16, out 32)

    def keep(module: nn.Module, args: Any, out: Tensor) -> None:
        seen["x"] = args[0].detach()
        out.register_hook(lambda g: seen.__setitem__("dy", g))

    handle = layer.register_forward_hook(keep)
    model(ids, labels=ids).loss.backward()  # unrouted: parameter routing leaves every activation gradient as is
    handle.remove()
    mask = torch.ones(2, 32, dtype=torch.float64)
    mask[1, :20] = 0.0
    mask[1, 20:] = -0.5
    m = mask[labels]  # (B, T, 32): per position, over the output units
    expected = torch.einsum("bti,btj->ij", seen["x"], seen["dy"] * m)
    router = GradientRouter({"fc": ParameterTarget("transformer.h.1.mlp.c_fc.weight", dim="out")},
                            [Route("forget", "fc", {":20": 0.0, "20:": -0.5})])  # fmt: skip
    model.zero_grad()
    with router.attached(model), router.route(labels):
        model(ids, labels=ids).loss.backward()
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-10, atol=1e-12)


def test_activation_and_parameter_targets_side_by_side() -> None:
    torch.manual_seed(2)
    model = TokenNet(6, 4, 5, 3, conv1d=False).double()
    ids, y, labels = torch.randint(0, 6, (2, 3)), torch.randn(2, 3, 3, dtype=torch.float64), torch.tensor([0, 1])
    router = GradientRouter(
        {"act": Target("layer"), "head": ParameterTarget("head.weight", dim=0)},
        [Route("forget", "act", {"0:2": 0.0}), Route("forget", "head", {"1:": 0.0})],
    )
    got = routed_grads(model, router, ids, y, labels)
    # Reference: the activation route by hand (delta form), the parameter route by one pass per label.
    reference = copy.deepcopy(model)
    act_mask = torch.ones(2, 5, dtype=torch.float64)
    act_mask[1, :2] = 0.0

    def delta(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        m = act_mask[labels][:, None, :]
        return out.detach() + m * (out - out.detach())

    handle = reference.layer.register_forward_hook(delta)
    head_table = torch.ones(2, 3, dtype=torch.float64)
    head_table[1, 1:] = 0.0
    expected = per_label_reference(reference, ids, y, labels, 2, {"head.weight": (0, head_table)})
    handle.remove()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_bf16_autocast_forward_is_bit_identical_and_gradients_follow() -> None:
    torch.manual_seed(3)
    model = TokenNet(7, 8, 16, 4, conv1d=False)
    ids, y, labels = torch.randint(0, 7, (4, 5)), torch.randn(4, 5, 4), torch.tensor([0, 1, 1, 0])
    table = torch.ones(2, 16)
    table[1, :8] = 0.0
    reference = per_label_reference(copy.deepcopy(model), ids, y, labels, 2, {"layer.weight": (0, table)})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(ids)
    router = GradientRouter({"w": ParameterTarget("layer.weight", dim=0)}, [Route("forget", "w", {":8": 0.0})])
    model.zero_grad()
    with router.attached(model), router.route(labels), torch.autocast("cpu", dtype=torch.bfloat16):
        routed = model(ids)
        assert routed.dtype == torch.bfloat16 and torch.equal(routed, plain)
        (routed.float() - y).pow(2).sum(-1).sum().backward()
    grad = model.layer.weight.grad
    assert grad.dtype == torch.float32
    assert (grad - reference["layer.weight"]).norm() < 0.02 * reference["layer.weight"].norm()  # bf16 rounding


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("targets", "routes", "message"),
    [
        ({"w": ParameterTarget("layr.weight")}, [Route("forget", "w", 0.0)],
         r"parameter target 'w': pattern 'layr.weight' matches no parameter of TokenNet; closest names: layer.weight"),
        ({"w": ParameterTarget("layer.bias", dim=1)}, [Route("forget", "w", 0.0)],
         r"'layer.bias' of shape \(6,\) has no dim 1"),
        ({"w": ParameterTarget("layer.weight"), "v": ParameterTarget("layer.*")},
         [Route("forget", "w", 0.0), Route("forget", "v", 0.0)], r"'layer.weight' is matched by two parameter"),
        ({"w": ParameterTarget("layer.weight")}, [Route("forget", "w", {"expanded": 0.0})],
         r"units 'expanded' need an expansion"),
        ({"w": ParameterTarget("*.weight", dim=1)}, [Route("forget", "w", {"5:": 0.0})],
         r"\('embed.weight', dim 1\): slice '5:' selects no feature out of 5"),
    ],
)
def test_bad_parameter_targets_fail_at_attach(targets: dict, routes: list, message: str) -> None:
    router = GradientRouter(targets, routes)
    with pytest.raises(ValueError, match=message):
        router.attach(TokenNet(7, 5, 6, 4, conv1d=False))


def test_expanded_and_original_units_select_new_and_old_parameters() -> None:
    from lightning_gradroute import expand
    from lightning_gradroute.expansion import Expansion

    torch.manual_seed(5)
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    record = expand(model, [Expansion("0", preset="linear_pair", add=2, up=("0",), down=("2",), between=("1",),
                                      output_init="match")])  # fmt: skip
    x, labels = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    router = GradientRouter({"up": ParameterTarget("0.0.**.weight")}, [Route("forget", "up", {"original": 0.0})])
    model.zero_grad()
    with router.attached(model, record), router.route(labels):
        model(x).pow(2).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (model(x).pow(2).sum(-1) * (labels == 0)).sum().backward()  # the retain items alone
    torch.testing.assert_close(got["0.0.weight"], model[0][0].weight.grad)  # original: retain only
    model.zero_grad()
    model(x).pow(2).sum().backward()
    torch.testing.assert_close(got["0.0.new_units.weight"], model[0][0].new_units.weight.grad)  # new: everything
    wrong = GradientRouter({"up": ParameterTarget("0.0.weight")}, [Route("forget", "up", {"expanded": 0.0})])
    with pytest.raises(ValueError, match=r"units 'expanded' do not intersect .* \(every matched parameter\)"):
        wrong.attach(model, record)


def test_a_frozen_parameter_is_refused() -> None:
    model = TokenNet(7, 5, 6, 4, conv1d=False)
    model.layer.weight.requires_grad_(False)
    router = GradientRouter({"w": ParameterTarget("layer.weight")}, [Route("forget", "w", 0.0)])
    with pytest.raises(ValueError, match=r"'layer.weight' does not require grad; nothing to route"):
        router.attach(model)


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.norm = nn.LayerNorm(3)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x @ self.weight.t())


@pytest.mark.parametrize(
    ("name", "message"),
    [("weight", r"parameter target 'w' \('weight', dim 0\): used by t, which parameter routing cannot route"),
     ("norm.weight", r"\('norm.weight', dim 0\): used by layer_norm, which parameter routing cannot route")],
)
def test_a_use_that_cannot_be_routed_per_item_is_an_error(name: str, message: str) -> None:
    model = Transposed()
    router = GradientRouter({"w": ParameterTarget(name)}, [Route("forget", "w", 0.0)])
    with router.attached(model), pytest.raises(ValueError, match=message), router.route(torch.tensor([0, 1])):
        model(torch.randn(2, 4)).sum().backward()


def test_labels_that_do_not_fit_the_items_are_an_error() -> None:
    model = TokenNet(7, 5, 6, 4, conv1d=True)
    router = GradientRouter({"w": ParameterTarget("layer.weight", dim="in")}, [Route("forget", "w", 0.0)])
    with router.attached(model), pytest.raises(
        ValueError, match=r"\('layer.weight', dim 0\): labels of shape \(2, 3\) do not fit the \(20,\) items"
    ), router.route(torch.zeros(2, 3, dtype=torch.long)):
        model(torch.randint(0, 7, (4, 5)))


def test_a_routed_parameter_the_step_never_uses_fails_coverage() -> None:
    model = TokenNet(7, 5, 6, 4, conv1d=False)
    model.spare = nn.Linear(2, 2)
    router = GradientRouter({"w": ParameterTarget("spare.weight")}, [Route("forget", "w", 0.0)])
    with router.attached(model), pytest.raises(
        ValueError, match=r"parameter target 'w' \('spare.weight', dim 0\) was never used in a routed forward"
    ), router.route(torch.tensor([0, 1])):
        model(torch.randint(0, 7, (2, 3))).sum().backward()


def test_routing_stops_outside_route_and_after_detach() -> None:
    torch.manual_seed(4)
    model = TokenNet(7, 5, 6, 4, conv1d=False)
    ids = torch.randint(0, 7, (2, 3))
    router = GradientRouter({"w": ParameterTarget("layer.weight")}, [Route("forget", "w", 0.0)])
    with router.attached(model):
        model(ids).sum().backward()  # attached, but no labels: plain autograd
        assert torch.count_nonzero(model.layer.weight.grad) > 0
        model.zero_grad()
        with router.route(torch.ones(2, dtype=torch.long)):
            model(ids).sum().backward()
        assert torch.count_nonzero(model.layer.weight.grad) == 0
    model.zero_grad()
    model(ids).sum().backward()
    assert torch.count_nonzero(model.layer.weight.grad) > 0
    assert not torch._C._is_torch_function_mode_enabled()


@pytest.mark.parametrize("soft", [False, True])
def test_parameter_telemetry_is_each_labels_gradient_norm_per_unit_group(soft: bool) -> None:
    torch.manual_seed(11)
    model = TokenNet(vocab=5, d_in=4, hidden=6, d_out=3, conv1d=False).double()
    ids, y = torch.randint(0, 5, (3, 4)), torch.randn(3, 4, 3, dtype=torch.float64)
    labels = torch.rand(3, 4, dtype=torch.float64) if soft else torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]])
    targets = {"up": ParameterTarget("layer.weight", dim=0), "rows": ParameterTarget("embed.weight", dim=0)}
    routes = [Route("forget", "up", {"0:2": 0.0, "4:": 0.5}), Route("retain", "up", {"2:": 0.0}),
              Route("forget", "rows", {"3": 0.0})]  # fmt: skip
    up_table = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0.5, 0.5]], dtype=torch.float64)
    rows_table = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 1]], dtype=torch.float64)
    router = GradientRouter(targets, routes, ["retain", "forget"], telemetry=True)

    reference = copy.deepcopy(model)
    member = membership(labels, 2, (3, 4))
    per_label = []
    for label in range(2):
        reference.zero_grad()
        (token_losses(reference, ids, y) * member[..., label]).sum().backward()
        per_label.append({"up": reference.layer.weight.grad * up_table[label][:, None],
                          "rows": reference.embed.weight.grad * rows_table[label][:, None]})  # fmt: skip
    with router.attached(model):
        with router.route(labels):
            token_losses(model, ids, y).sum().backward()
        norms = router.pop_grad_norms()
        assert all(v == 0 for v in router.pop_grad_norms().values())  # popped: reset
    for name, got in (("up", model.layer.weight.grad), ("rows", model.embed.weight.grad)):  # the same gradient
        torch.testing.assert_close(got, per_label[0][name] + per_label[1][name], rtol=1e-10, atol=1e-12)
    groups = {"up": {"all": slice(None), "0:2": slice(0, 2), "4:": slice(4, None), "2:": slice(2, None)},
              "rows": {"all": slice(None), "3": slice(3, 4)}}  # fmt: skip
    assert set(norms) == {(t, label, g) for t in groups for label in ("retain", "forget") for g in groups[t]}
    for target, by_group in groups.items():
        for label_index, label in enumerate(("retain", "forget")):
            for group, units in by_group.items():
                expected = per_label[label_index][target][units].pow(2).sum().float()
                torch.testing.assert_close(norms[(target, label, group)], expected, rtol=1e-5, atol=1e-12)
    assert norms[("up", "forget", "0:2")] == 0 and norms[("up", "retain", "2:")] == 0  # blocked: no leakage
    assert norms[("up", "forget", "4:")] > 0
