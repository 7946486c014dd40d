"""Tiny HF models built from configs (no hub) and a picklable LightningModule around GPT-Neo for the ERA tests.

Every architecture with an expansion preset is here, with the pattern of its MLP and attention modules, so
tests can loop over all presets. Dropout is zero everywhere, so forward passes are deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from lightning_gradroute import Expansion, GradientRoutingMixin

VOCAB = 11
SEQ = 6
HIDDEN = 16  # model width
NEURONS = 32  # MLP width


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_embd=HIDDEN, n_layer=2, n_head=2, n_inner=NEURONS, vocab_size=VOCAB, n_positions=SEQ,
        embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def gpt_neo() -> nn.Module:
    config = transformers.GPTNeoConfig(
        hidden_size=HIDDEN, num_layers=2, num_heads=2, intermediate_size=NEURONS, vocab_size=VOCAB,
        max_position_embeddings=SEQ, attention_types=[[["global", "local"], 1]], window_size=4,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )
    return transformers.GPTNeoForCausalLM(config)


def _gated(config_class: type, model_class: type) -> nn.Module:
    config = config_class(
        hidden_size=HIDDEN, intermediate_size=NEURONS, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=0,
    )
    return model_class(config)


def llama() -> nn.Module:
    return _gated(transformers.LlamaConfig, transformers.LlamaForCausalLM)


def qwen2() -> nn.Module:
    return _gated(transformers.Qwen2Config, transformers.Qwen2ForCausalLM)


#: preset -> (model factory, module pattern); MLP presets add neurons, attention presets add heads.
PRESET_MODELS = {
    "gpt2_mlp": (gpt2, "transformer.h.*.mlp"),
    "gpt_neo_mlp": (gpt_neo, "transformer.h.*.mlp"),
    "llama_mlp": (llama, "model.layers.*.mlp"),
    "qwen2_mlp": (qwen2, "model.layers.*.mlp"),
    "gpt2_attn": (gpt2, "transformer.h.*.attn"),
    "gpt_neo_attn": (gpt_neo, "transformer.h.*.attn.attention"),
    "llama_attn": (llama, "model.layers.*.self_attn"),
    "qwen2_attn": (qwen2, "model.layers.*.self_attn"),
}


def token_batch(n: int, forget: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """``n`` sequences of ``SEQ`` token ids, next-token targets and per-token routing labels ``forget``."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randint(0, VOCAB, (n, SEQ), generator=gen),
        "y": torch.randint(0, VOCAB, (n, SEQ), generator=gen),
        "route_labels": forget,
    }


class NeoLM(GradientRoutingMixin, pl.LightningModule):
    """A tiny HF GPT-Neo held as ``self.model``; per-token CE through :meth:`routed_loss`; plain SGD.

    ``expansions`` (kept in hparams) makes the mixin expand in ``configure_model``.
    """

    def __init__(self, lr: float = 0.5, seed: int = 0, expansions: list[Mapping[str, Any]] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.model = gpt_neo()
        self.expansions = [Expansion.from_dict(e) for e in expansions or []]

    def item_losses(self, batch: Mapping[str, Tensor]) -> Tensor:
        logits = self.model(batch["x"]).logits
        return F.cross_entropy(logits.transpose(1, 2), batch["y"], reduction="none")

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self.routed_loss(self.item_losses(batch), batch["route_labels"])

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self.routed_loss(self.item_losses(batch), batch["route_labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
