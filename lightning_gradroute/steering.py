"""Steering: add a constant to one feature of a module's output while a ``with`` block runs, on any model.

Gradient routing can put a concept in a place you choose, such as dimension 0 of the residual stream (the paper's
steering scalar). :func:`steer` then reads or writes that place at inference: it adds ``value`` to feature ``dim``
of the output of one module (a transformer block's output is the residual stream after it) at every position
and every forward inside the block, and removes its hook on exit, also when the block raises (hook lifetime as
in TransformerLens' ``hooks()`` context manager). It works on Hugging Face models and on plain ``nn.Module`` s,
during ``generate`` (KV cache included: every new position is steered) and during training.

Example (the paper's steering: −30 on dimension 0 after block 10 of a 16-layer model)::

    from lightning_gradroute.steering import steer

    with steer(model, "model.layers.10", dim=0, value=-30.0):          # HF Llama: blocks return a tensor
        steered = model.generate(prompt, do_sample=True, max_new_tokens=150)
    with steer(gpt_neo, "transformer.h.3", dim=0, value=8.0, output_index=0):   # GPT-Neo blocks return a tuple
        ...

The module is named as in ``model.named_modules()`` (or by a glob that matches exactly one module, see
:class:`~lightning_gradroute.Target`). Structured outputs need ``output_index``: an int for a tuple or list
(GPT-2 and GPT-Neo blocks return ``(hidden_states, ...)``), a key for a dict-like output. Mistakes are one-line
errors: a name that matches nothing (with the closest names) or several modules, a container that is never
called, a tuple output without ``output_index``, a ``dim`` outside the feature size, and a block in which the
module never ran (nothing was steered).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradroute.targets import Target, pick_value, resolve_modules

__all__ = ["SteeringHook", "steer"]


class SteeringHook:
    """The forward hook :func:`steer` installs: adds ``value`` to feature ``dim`` of ``module_name``'s output.

    Attributes:
        calls: how many forwards it has steered so far.
    """

    def __init__(self, module_name: str, dim: int, value: float, output_index: int | str | None) -> None:
        self.module_name = module_name
        self.dim = dim
        self.value = value
        self.output_index = output_index
        self.calls = 0

    def _where(self) -> str:
        return f"steer: the output of {self.module_name!r}"

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        value, put = pick_value(output, self.output_index, self._where(), "steer")
        return put(self._add(value))

    def _add(self, x: Any) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise ValueError(f"{self._where()} (output_index={self.output_index!r}) is not a tensor with features")
        size = x.shape[-1]
        if not -size <= self.dim < size:
            raise ValueError(f"{self._where()} has {size} features (shape {tuple(x.shape)}); dim {self.dim} is outside")
        shift = torch.zeros(size, dtype=x.dtype, device=x.device)
        shift[self.dim] = self.value
        self.calls += 1
        return x + shift


@contextlib.contextmanager
def steer(
    model: nn.Module, module: str, dim: int, value: float, output_index: int | str | None = None
) -> Iterator[SteeringHook]:
    """Add ``value`` to feature ``dim`` (last axis) of ``module``'s output in every forward inside the block.

    Args:
        model: any ``nn.Module`` (an HF model, a LightningModule, a plain module).
        module: the name of the steered module in ``model.named_modules()``, or a glob matching exactly one.
        dim: the feature index (the residual dimension), negative counts from the end.
        value: the constant to add (any finite number; its sign matters, see the paper's README: the concept may
            have landed on ``+e_dim`` or ``-e_dim``).
        output_index: for a module returning a tuple or list, the position of the tensor to steer; for a
            dict-like output, its key. ``None`` for a module returning a tensor.

    Yields:
        The :class:`SteeringHook` (its ``calls`` counts steered forwards).

    Raises:
        ValueError: see the module docstring; raised before the block runs where possible, otherwise at the first
            steered forward, or at exit when the module never ran.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"steer: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"steer: dim must be an int, got {dim!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"steer: value must be a finite number, got {value!r}")
    if output_index is not None and (isinstance(output_index, bool) or not isinstance(output_index, (int, str))):
        raise ValueError(f"steer: output_index must be an int, a str key or None, got {output_index!r}")
    matches = resolve_modules(model, Target(module), "steer")
    if len(matches) > 1:
        names = ", ".join(name for name, _ in matches[:4]) + (" ..." if len(matches) > 4 else "")
        raise ValueError(f"steer: {module!r} matches {len(matches)} modules ({names}); name exactly one")
    name, target = matches[0]
    if type(target).forward is nn.Module.forward:
        raise ValueError(f"steer: {name!r} is a {type(target).__name__}, a container that is never called")
    hook = SteeringHook(name, dim, float(value), output_index)
    handle = target.register_forward_hook(hook)
    try:
        yield hook
    finally:
        handle.remove()
    if hook.calls == 0:
        raise ValueError(f"steer: {name!r} never ran inside the block, so nothing was steered")
