"""Property tests of the routing primitive: forward bit-exact, gradient exactly weight * upstream."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_gradroute import route_gradient, route_gradient_by_label
from lightning_gradroute.grad import label_mask

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WEIGHTS = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 0.5, -0.75, 1e-8, -5e-8, 2.0]),
    st.floats(min_value=-4.0, max_value=4.0, allow_nan=False, width=32),
)


@st.composite
def routed_case(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An activation, a broadcastable weight and an upstream gradient of a random shape and dtype."""
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 10).to(dtype)
    upstream = torch.randn(shape, generator=gen).to(dtype)
    # The weight keeps a random subset of x's dims (others broadcast from size 1) and random real values.
    wshape = [n if draw(st.booleans()) else 1 for n in shape][draw(st.integers(0, len(shape))) :]
    values = draw(st.lists(WEIGHTS, min_size=1, max_size=1))
    weight = torch.full(wshape, values[0]) + (torch.randn(wshape, generator=gen) if draw(st.booleans()) else 0)
    return x, weight, upstream


@settings(max_examples=300, deadline=None)
@given(routed_case())
def test_route_gradient_forward_bit_exact_and_gradient_exact(case: tuple[torch.Tensor, ...]) -> None:
    x, weight, upstream = case
    x = x.clone().requires_grad_(True)
    y = route_gradient(x, weight)
    assert y.dtype == x.dtype
    assert torch.equal(y, x)  # bit-exact for any weight and dtype
    (grad,) = torch.autograd.grad(y, x, upstream)
    assert grad.dtype == x.dtype
    expected = upstream * weight.to(x.dtype)  # weight is cast to x.dtype, then multiplied once
    assert torch.equal(grad, expected)


@settings(max_examples=200, deadline=None)
@given(
    batch=st.integers(1, 4),
    seq=st.one_of(st.none(), st.integers(1, 5)),
    features=st.integers(1, 6),
    num_labels=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    soft=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_route_by_label_matches_materialised_mask(
    batch: int, seq: int | None, features: int, num_labels: int, dtype: torch.dtype, soft: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    label_shape = (batch,) if seq is None else (batch, seq)
    x = (torch.randn(batch, seq or 3, features, generator=gen) * 10).to(dtype).requires_grad_(True)
    table = torch.randn(num_labels if not soft else 2, features, generator=gen)
    table[0, 0] = 0.0
    if soft:
        labels = torch.rand(label_shape, generator=gen)
        rows = (1 - labels)[..., None] * table[0] + labels[..., None] * table[1]
    else:
        labels = torch.randint(0, num_labels, label_shape, generator=gen)
        rows = table[labels]
    mask = rows if seq is not None else rows[:, None, :]
    upstream = torch.randn(x.shape, generator=gen).to(dtype)
    y = route_gradient_by_label(x, labels, table)
    assert torch.equal(y, x)
    (grad,) = torch.autograd.grad(y, x, upstream)
    expected = upstream * mask.to(dtype)
    if soft:  # interpolation is computed as t0 + s*(t1 - t0): equal to (1-s)*t0 + s*t1 up to rounding
        torch.testing.assert_close(grad, expected)
    else:
        assert torch.equal(grad, expected)


def test_label_mask_places_features_on_a_middle_dim() -> None:
    labels = torch.tensor([0, 1])
    table = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, -1.0]])
    mask = label_mask(labels, table, feature_dim=1, ndim=4)  # (B, C, H, W) conv activation
    assert mask.shape == (2, 3, 1, 1)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(route_gradient_by_label(x, labels, table, feature_dim=1), x, torch.ones_like(x))
    assert torch.equal(grad[1, :, 0, 0], torch.tensor([0.0, 2.0, -1.0]))
    assert torch.equal(grad[0], torch.ones(3, 4, 4))


def test_zero_weight_keeps_parameters_in_the_graph() -> None:
    layer = torch.nn.Linear(3, 3)
    y = route_gradient(layer(torch.randn(2, 3)), 0.0)
    y.sum().backward()
    # A zero weight gives zero gradients, not missing ones: DDP's reducer still sees every parameter.
    assert layer.weight.grad is not None and torch.count_nonzero(layer.weight.grad) == 0


def test_saved_tensors_are_labels_and_table_only() -> None:
    x = torch.randn(8, 32, 64, requires_grad=True)
    labels = torch.randint(0, 2, (8, 32))
    table = torch.ones(2, 64)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        route_gradient_by_label(x * 1, labels, table)
    # x * 1 saves nothing (multiplying by a Python scalar); the routing saves labels and the small table only.
    assert sorted(saved) == sorted([labels.shape, table.shape])


def test_bad_shapes_raise_clear_errors() -> None:
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"weight of shape \(5,\) does not broadcast"):
        route_gradient(x, torch.ones(5))
    with pytest.raises(ValueError, match=r"labels of shape \(3,\) must match the leading dims"):
        route_gradient_by_label(x, torch.zeros(3, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"table of shape \(2, 5\) does not fit 4 features"):
        route_gradient_by_label(x, torch.zeros(2, dtype=torch.long), torch.ones(2, 5))
