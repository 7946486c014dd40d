"""A GPT-Neo language model (Hugging Face ``GPTNeoForCausalLM``) trained on TinyStories, with per-label losses.

The defaults are the paper's architecture (the ``roneneldan/TinyStories-28M`` config, trained from scratch):
8 layers, d_model 512, 16 heads, d_mlp 2048, alternating global / local (window 256) attention, ``gelu_new``,
untied embeddings, weights drawn from ``N(0, 0.8 / sqrt(d_model))``. The quick recipes shrink it.

It is a :class:`~gradroute_experiments.text.causal_lm.CausalLM` (steps, per-label losses, optimiser and
schedule, the optional L1 penalty on MLP activations) with the GPT-Neo architecture given by arguments, and
``demix=True``: every MLP becomes a retain / forget expert pair (the DEMix baseline, see ``demix.py``); each
story's expert is chosen by its per-story ``route_labels``. The CausalLM options ``token_filter_threshold`` (the
token-filtering baseline) and ``routed_optimizer`` (parameter routing) pass through.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor
from transformers import GPTNeoConfig

from gradroute_experiments.text.causal_lm import CausalLM
from gradroute_experiments.tinystories.demix import DEMixMLP, add_demix_experts, demix_experts

__all__ = ["TinyStoriesLM", "gpt_neo_config"]


def gpt_neo_config(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int | None,
    max_position_embeddings: int,
    window_size: int,
    initializer_range: float | None,
) -> GPTNeoConfig:
    """A GPT-Neo config with the TinyStories models' conventions (global / local layers alternate, untied)."""
    pattern: list[Any] = [[["global", "local"], num_layers // 2]]
    if num_layers % 2:
        pattern.append([["global"], 1])
    return GPTNeoConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        attention_types=pattern,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        window_size=window_size,
        activation_function="gelu_new",
        initializer_range=initializer_range if initializer_range is not None else 0.8 / math.sqrt(hidden_size),
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
    )


class TinyStoriesLM(CausalLM):
    """GPT-Neo on TinyStories with retain / forget losses; route it with a ``GradientRoutingCallback``.

    Example (ERA, as in ``recipes/tinystories/era.yaml``)::

        lm = TinyStoriesLM(vocab_size=2048, hidden_size=64, num_layers=2, num_heads=4, l1_coeff=1e-4,
                           l1_modules="model.transformer.h.*.mlp.act")
        routing = GradientRoutingCallback(
            targets={"mlp": Target("model.transformer.h.0.mlp.act")},
            routes=[Route("forget", "mlp", {"original": -0.75, "expanded": 1.0})],
            expansions=[Expansion("model.transformer.h.*.mlp", preset="gpt_neo_mlp", add=16)],
        )
        pl.Trainer(max_steps=300, callbacks=[routing]).fit(lm, TinyStoriesDataModule(tokenizer="bpe"))

    Args:
        vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_position_embeddings, window_size:
            the GPT-Neo architecture (``intermediate_size`` None means ``4 * hidden_size``).
        initializer_range: std of the normal weight init; None means the paper's ``0.8 / sqrt(hidden_size)``.
        lr, warmup_steps, min_lr_ratio, betas, weight_decay: the optimiser and schedule of
            :class:`~gradroute_experiments.text.causal_lm.CausalLM` (the paper: 5e-4, 100, 0.1,
            (0.9, 0.95), 0.1).
        l1_coeff: weight of the L1 activation penalty (the paper: 1e-4); 0 disables it.
        l1_modules: the modules whose outputs the L1 penalty reads (glob relative to this module).
        demix: make every MLP a DEMix retain / forget expert pair.
        token_filter_threshold, routed_optimizer: see :class:`~gradroute_experiments.text.causal_lm.CausalLM`.
    """

    def __init__(
        self,
        vocab_size: int = 50257,
        hidden_size: int = 512,
        num_layers: int = 8,
        num_heads: int = 16,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 2048,
        window_size: int = 256,
        initializer_range: float | None = None,
        lr: float = 5e-4,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        l1_coeff: float = 0.0,
        l1_modules: str = "model.transformer.h.*.mlp.act",
        demix: bool = False,
        token_filter_threshold: float | None = None,
        routed_optimizer: bool = False,
    ) -> None:
        if hidden_size % num_heads:
            raise ValueError(f"TinyStoriesLM: hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        config = gpt_neo_config(
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            intermediate_size,
            max_position_embeddings,
            window_size,
            initializer_range,
        )
        super().__init__(
            config=config.to_diff_dict(),
            lr=lr,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            betas=betas,
            weight_decay=weight_decay,
            l1_coeff=l1_coeff,
            l1_modules=l1_modules,
            token_filter_threshold=token_filter_threshold,
            routed_optimizer=routed_optimizer,
        )
        if demix:
            add_demix_experts(self, "model.transformer.h.*.mlp", init_std=config.initializer_range)

    @property
    def is_demix(self) -> bool:
        return any(isinstance(m, DEMixMLP) for m in self.modules())

    def token_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(losses, valid)`` per predicted token; DEMix experts are chosen by the per-story ``route_labels``."""
        if not self.is_demix:
            return super().token_losses(batch)
        labels = batch["route_labels"]
        if labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(
                f"TinyStoriesLM(demix=True) needs one integer label per story (data labels='document'), got "
                f"route_labels of shape {tuple(labels.shape)} and dtype {labels.dtype}"
            )
        with demix_experts(self, labels == 1):
            return super().token_losses(batch)
