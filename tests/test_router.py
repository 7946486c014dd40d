"""The router in plain PyTorch: exact gradients against a hand-chained computation, target resolution, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from lightning_gradroute import GradientRouter, Route, Target
from lightning_gradroute.targets import unit_indices


class TupleBlock(nn.Module):
    """Returns ``(hidden, aux)`` like an HF transformer block."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.proj(x)
        return h, h.detach().sum()


class Net(nn.Module):
    def __init__(self, d_in: int = 5, hidden: int = 6, d_out: int = 3) -> None:
        super().__init__()
        self.block = TupleBlock(d_in, hidden)
        self.act = nn.Tanh()
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.block(x)
        return self.head(self.act(h))


def hand_routed_grads(model: Net, x: Tensor, upstream: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Gradients with ``mask`` applied to d(loss)/d(hidden), computed by chaining autograd.grad by hand."""
    h, _ = model.block(x)
    h_leaf = h.detach().requires_grad_(True)
    out = model.head(model.act(h_leaf))
    head_params = list(model.head.parameters())
    grads = torch.autograd.grad(out, [h_leaf, *head_params], upstream)
    block_params = list(model.block.parameters())
    block_grads = torch.autograd.grad(h, block_params, grads[0] * mask)
    names = [f"block.{n}" for n, _ in model.block.named_parameters()] + [
        f"head.{n}" for n, _ in model.head.named_parameters()
    ]
    return dict(zip(names, [*block_grads, *grads[1:]]))


def routed_grads(model: Net, router: GradientRouter, x: Tensor, upstream: Tensor, labels: Tensor) -> dict[str, Tensor]:
    model.zero_grad()
    with router.attached(model), router.route(labels):
        model(x).backward(upstream)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


TABLE = torch.tensor(
    [
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # retain: no route
        [0.0, 0.0, 0.0, -0.75, -0.75, 1.0],  # forget: "0:3" -> 0, "3:5" -> -0.75
        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],  # other: 0.5 everywhere
    ]
)
ROUTES = [
    Route("forget", "hidden", {"0:3": 0.0, "3:5": -0.75}),
    Route("other", "hidden", 0.5),
]
LABELS = ("retain", "forget", "other")


@pytest.mark.parametrize(
    "target",
    [
        Target("block", output_index=0),  # tuple output
        Target("block.proj"),  # plain output
        Target("act", site="input"),  # pre-hook on the consumer
        Target("re:bl.ck\\.pr.j"),  # regex
    ],
)
def test_per_example_gradients_equal_hand_masked(target: Target) -> None:
    torch.manual_seed(0)
    model = Net()
    x, upstream = torch.randn(7, 5), torch.randn(7, 3)
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 1])
    router = GradientRouter({"hidden": target}, ROUTES, LABELS)
    expected = hand_routed_grads(copy.deepcopy(model), x, upstream, TABLE[labels])
    got = routed_grads(model, router, x, upstream, labels)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("labels", "mask_of"),
    [
        (torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1], [1, 0, 0, 2]]), lambda lab: TABLE[lab]),  # per token (B, T)
        (torch.tensor([1, 0, 2]), lambda lab: TABLE[lab][:, None, :]),  # per example, broadcast over tokens
    ],
    ids=["per_token", "per_example_over_tokens"],
)
def test_sequence_gradients_equal_hand_masked(labels: Tensor, mask_of) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    model = Net()
    x, upstream = torch.randn(3, 4, 5), torch.randn(3, 4, 3)
    router = GradientRouter({"hidden": Target("block.proj")}, ROUTES, LABELS)
    expected = hand_routed_grads(copy.deepcopy(model), x, upstream, mask_of(labels))
    got = routed_grads(model, router, x, upstream, labels)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_soft_labels_give_the_papers_frequency_weighted_mask() -> None:
    """Forget weight -0.75 on 'original' units with soft label s = 1 - w gives the paper's 1.75*w - 0.75."""
    torch.manual_seed(3)
    model = Net()
    x, upstream = torch.randn(2, 4, 5), torch.randn(2, 4, 3)
    w = torch.rand(2, 4)  # paper: per-token retain weight from token frequencies
    router = GradientRouter({"hidden": Target("block.proj")}, [Route("forget", "hidden", {"0:5": -0.75})])
    paper_mask = torch.ones(2, 4, 6)
    paper_mask[..., :5] = (1.75 * w - 0.75)[..., None]
    expected = hand_routed_grads(copy.deepcopy(model), x, upstream, paper_mask)
    got = routed_grads(model, router, x, upstream, 1 - w)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_forward_is_bit_identical_and_no_routing_outside_the_context() -> None:
    torch.manual_seed(4)
    model = Net()
    x = torch.randn(4, 5)
    plain = model(x)
    router = GradientRouter({"hidden": Target("block.proj")}, [Route("forget", "hidden", -0.75)])
    with router.attached(model):
        with router.route(torch.tensor([1, 1, 0, 1])):
            routed = model(x)
            assert torch.equal(routed, plain)
            routed.sum().backward()
        model.zero_grad()
        model(x).sum().backward()  # attached but outside route(): unrouted
        routed_off = model.block.proj.weight.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    assert torch.equal(routed_off, model.block.proj.weight.grad)
    assert not model.block.proj._forward_hooks  # detached on exit


def test_glob_matches_layers_and_units_resolve() -> None:
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 8), nn.ReLU()) for _ in range(6)])
    router = GradientRouter({"mlp": Target("[0-4].1")}, [Route("forget", "mlp", {"expanded": 0.0})])
    groups = {(f"{i}.1", "output"): {"expanded": [6, 7], "original": list(range(6))} for i in range(6)}
    router.attach(model, groups)
    assert [s.module_name for s in router.sites] == ["0.1", "1.1", "2.1", "3.1", "4.1"]
    assert unit_indices("-2:", 8) == [6, 7]
    assert unit_indices([0, -1], 8) == [0, 7]
    assert unit_indices("1,3", 8) == [1, 3]
    assert router.sites[0].build_table(8)[1].tolist() == [1.0] * 6 + [0.0] * 2  # "expanded" routed to weight 0
    router.detach()


# ------------------------------------------------------------------------------------------------ bad input
def test_pattern_matching_nothing_lists_close_names() -> None:
    router = GradientRouter({"mlp": Target("blok.proj")}, [Route("forget", "mlp", 0.0)])
    with pytest.raises(
        ValueError, match=r"target 'mlp': pattern 'blok.proj' matches no module of Net; closest names: block.proj"
    ):
        router.attach(Net())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Target("x", units="0-16"), r"units '0-16' are not 'all', 'expanded', 'original', a slice"),
        (lambda: Target("x", site="grad"), r"site must be 'output' or 'input'"),
        (lambda: Target("re:(unclosed"), r"regex 're:\(unclosed' does not compile"),
        (lambda: Route("forget", "t", float("nan")), r"weight nan is not a finite number"),
        (lambda: Route("forget", "t", {}), r"weights mapping is empty"),
        (lambda: GradientRouter({"t": Target("x")}, [Route("forgt", "t")]), r"Route 'forgt' -> 't': unknown label"),
        (lambda: GradientRouter({"t": Target("x")}, [Route("forget", "u")]), r"Route 'forget' -> 'u': unknown target"),
        (lambda: GradientRouter({}, []), r"no targets given"),
        (lambda: GradientRouter({"t": Target("x")}, [], labels=["a", "a"]), r"label names must be unique"),
    ],
)
def test_constructor_errors(make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        make()


def test_units_out_of_range_fail_at_attach() -> None:
    router = GradientRouter({"h": Target("block.proj")}, [Route("forget", "h", {"0:9": 0.0})])
    with pytest.raises(
        ValueError, match=r"target 'h' \(module 'block.proj', output\): slice '0:9' is out of range for 6"
    ):
        router.attach(Net())


def test_expanded_units_without_expansion_fail_at_attach() -> None:
    router = GradientRouter({"h": Target("block.proj")}, [Route("forget", "h", {"expanded": 0.0})])
    with pytest.raises(ValueError, match=r"units 'expanded' need an expansion of this module"):
        router.attach(Net())


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([0, 3]), r"routing labels \[3\] are unknown: valid indices are 0..1"),
        (torch.tensor([0.2, 1.5]), r"soft routing labels must lie in \[0, 1\]"),
        (torch.zeros(2, 2, 2, dtype=torch.long), r"must have shape \(B,\) per example or \(B, T\) per token"),
        (torch.zeros(2, dtype=torch.complex64), r"must be integer, bool or float"),
        ([0, 1], r"routing labels must be a tensor, got list"),
    ],
)
def test_bad_labels(labels: Tensor, message: str) -> None:
    router = GradientRouter({"h": Target("block.proj")}, [Route("forget", "h", 0.0)])
    with router.attached(Net()), pytest.raises(ValueError, match=message):
        router.set_labels(labels)  # type: ignore[arg-type]


def test_soft_labels_need_two_label_names() -> None:
    router = GradientRouter({"h": Target("block.proj")}, [Route("b", "h", 0.0)], labels=("a", "b", "c"))
    with router.attached(Net()), pytest.raises(ValueError, match=r"interpolate between two labels; this router has 3"):
        router.set_labels(torch.tensor([0.5]))


def test_label_shape_mismatch_names_target_and_shapes() -> None:
    router = GradientRouter({"h": Target("block.proj")}, [Route("forget", "h", 0.0)])
    model = Net()
    with router.attached(model), pytest.raises(
        ValueError,
        match=r"target 'h' \(module 'block.proj', output\): labels of shape \(3,\) do not match the activation "
        r"of shape \(4, 6\)",
    ), router.route(torch.tensor([0, 1, 1])):
        model(torch.randn(4, 5, requires_grad=True))


def test_tuple_output_without_index_is_an_error() -> None:
    router = GradientRouter({"h": Target("block")}, [Route("forget", "h", 0.0)])
    model = Net()
    with router.attached(model), pytest.raises(
        ValueError, match=r"output is a tuple of 2; set output_index to the position to route \(got None\)"
    ), router.route(torch.tensor([0, 1])):
        model(torch.randn(2, 5))


def test_nested_route_is_refused() -> None:
    router = GradientRouter({"h": Target("block.proj")}, [Route("forget", "h", 0.0)])
    with router.attached(Net()), pytest.raises(RuntimeError, match="nested route"):
        with router.route(torch.tensor([0])), router.route(torch.tensor([1])):
            pass
