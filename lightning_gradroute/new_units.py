"""New units as a branch beside an existing layer: the layer's own computation stays exactly as it was.

An expansion never resizes a layer's weight. It gives the layer a child ``new_units`` (a :class:`NewUnits`)
and an instance ``forward`` that runs the layer's own ``forward`` on exactly the tensor it saw before, plus the
new units on the side:

* ``"reads"`` (a layer producing units: an MLP's up projection): ``interleave(layer(x), x @ W_new.T + b_new)``;
* ``"writes"`` (a layer consuming units: the down projection): ``layer(x_old) + x_new @ W_new.T``, where
  ``x_old`` is the original units, contiguous, i.e. the very tensor the unexpanded layer read;
* ``"elementwise"`` (an activation between them): ``interleave(layer(x_old), layer(x_new))``.

So every original layer runs with the shapes, memory layout and kernels of the unexpanded model, and with zero
writing weights the new units add an exact ``+ 0``: the expanded model's output is bit-identical to the
original's on any CPU, BLAS and thread count (no wider matmul that another kernel would round differently).
The original parameters keep their names, shapes and identities (optimizer state, checkpoints and sharding
see the same tensors); the new ones are ``<layer>.new_units.weight`` / ``.bias``. Removing the branch
(:func:`remove_new_units`) gives back the original layer, untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NewUnits", "Role", "Segments", "add_new_units", "remove_new_units", "split_segments"]

Role = Literal["reads", "writes", "elementwise"]
#: ``(position, count)`` pairs: insert ``count`` new features before old feature ``position``.
Segments = list[tuple[int, int]]


def split_segments(size: int, inserts: Segments) -> tuple[Segments, Segments]:
    """Kept (old) and new ``[start, stop)`` ranges in the expanded space, for ``inserts`` into ``size`` features."""
    keep, new, old_pos, shift = [], [], 0, 0
    for pos, count in sorted(inserts):
        keep.append((old_pos + shift, pos + shift))
        new.append((pos + shift, pos + shift + count))
        old_pos, shift = pos, shift + count
    keep.append((old_pos + shift, size + shift))
    return [(a, b) for a, b in keep if b > a], new


class NewUnits(nn.Module):
    """The units an expansion added at one layer (see the module docstring for the three roles).

    Args:
        role: ``"reads"``, ``"writes"`` or ``"elementwise"``.
        size: the layer's original number of features on the expanded side (outputs for ``reads``, inputs
            otherwise).
        inserts: where the new features go, in original feature positions.
        weight: ``(added, in_features)`` for ``reads``, ``(out_features, added)`` for ``writes``; ``None`` for
            ``elementwise``.
        bias: ``(added,)`` for ``reads`` layers that have a bias; ``None`` otherwise.
    """

    def __init__(
        self, role: Role, size: int, inserts: Segments, weight: Tensor | None = None, bias: Tensor | None = None
    ) -> None:
        super().__init__()
        self.role = role
        self.size = size
        self.inserts = [(int(p), int(c)) for p, c in sorted(inserts)]
        self.added = sum(c for _, c in self.inserts)
        self.keep, self.new = split_segments(size, self.inserts)
        self.weight = None if weight is None else nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def extra_repr(self) -> str:
        return f"role={self.role}, size={self.size}, added={self.added}"

    def forward(self, x: Tensor) -> Tensor:
        """The new units' own matmul: ``x @ W.T (+ b)`` (called as a module, so hooks on it see it run)."""
        if self.weight is None:
            raise ValueError("NewUnits: an elementwise branch has no weights to apply")
        return F.linear(x, self.weight, self.bias)

    def split(self, x: Tensor, where: str) -> tuple[Tensor, Tensor]:
        """The original features of ``x`` (contiguous, as the unexpanded layer saw them) and the new ones."""
        if x.shape[-1] != self.size + self.added:
            raise ValueError(
                f"{where}: expanded to {self.size + self.added} input features ({self.size} + {self.added} new) "
                f"but called with {x.shape[-1]}"
            )
        return _Split.apply(x, self)

    def interleave(self, old: Tensor, new: Tensor) -> Tensor:
        """Old and new features in the expanded order."""
        pieces, start, taken = [], 0, 0
        for pos, count in self.inserts:
            pieces += [old[..., start:pos], new[..., taken : taken + count]]
            start, taken = pos, taken + count
        pieces.append(old[..., start:])
        return torch.cat([p for p in pieces if p.shape[-1]], dim=-1)


class _Split(torch.autograd.Function):
    """``x`` -> (its original features, its new features), both contiguous. The backward is one concatenation;
    autograd's own slicing would allocate a zero tensor of the full width per part and add them up."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, units: NewUnits) -> tuple[Tensor, Tensor]:
        ctx.units = units
        return _gather(x, units.keep), _gather(x, units.new)

    @staticmethod
    def backward(ctx: Any, grad_old: Tensor | None, grad_new: Tensor | None) -> tuple[Tensor, None]:
        units: NewUnits = ctx.units
        if grad_old is None or grad_new is None:  # one part unused downstream
            like = grad_new if grad_old is None else grad_old
            shape = (*like.shape[:-1], units.size if grad_old is None else units.added)
            zeros = like.new_zeros(shape)
            grad_old, grad_new = (zeros, grad_new) if grad_old is None else (grad_old, zeros)
        return units.interleave(grad_old, grad_new), None


def _gather(x: Tensor, segments: Sequence[tuple[int, int]]) -> Tensor:
    """A new contiguous tensor of the features in ``segments`` (a copy even where a view would be contiguous, so
    an in-place activation on it never writes into ``x``)."""
    if len(segments) == 1:
        a, b = segments[0]
        return x[..., a:b].clone(memory_format=torch.contiguous_format)
    return torch.cat([x[..., a:b] for a, b in segments], dim=-1)


def _reading_forward(layer: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    units: NewUnits = layer.new_units  # type: ignore[assignment]
    old = type(layer).forward(layer, x, *args, **kwargs)
    return units.interleave(old, units(x))


def _writing_forward(layer: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    units: NewUnits = layer.new_units  # type: ignore[assignment]
    old, new = units.split(x, type(layer).__name__)
    return type(layer).forward(layer, old, *args, **kwargs) + units(new)


def _elementwise_forward(layer: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    units: NewUnits = layer.new_units  # type: ignore[assignment]
    old, new = units.split(x, type(layer).__name__)
    forward = type(layer).forward
    return units.interleave(forward(layer, old, *args, **kwargs), forward(layer, new, *args, **kwargs))


_FORWARDS: dict[str, Callable[..., Tensor]] = {
    "reads": _reading_forward,
    "writes": _writing_forward,
    "elementwise": _elementwise_forward,
}


def add_new_units(layer: nn.Module, units: NewUnits) -> None:
    """Give ``layer`` the branch ``units``: a child ``new_units`` and an instance ``forward`` that uses it.

    Raises:
        ValueError: the layer already has new units, a child called ``new_units``, or an instance ``forward``
            set by another tool.
    """
    if hasattr(layer, "new_units") or "forward" in vars(layer):
        raise ValueError(
            f"a {type(layer).__name__} that already has new units or a patched forward cannot take new units"
        )
    layer.new_units = units
    layer.forward = functools.partial(_FORWARDS[units.role], layer)


def remove_new_units(layer: nn.Module) -> None:
    """Remove the branch: the layer computes exactly what it did before :func:`add_new_units`."""
    del layer.forward
    del layer.new_units
