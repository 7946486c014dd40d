"""A GPT-Neo language model (Hugging Face ``GPTNeoForCausalLM``) trained on TinyStories, with per-label losses.

The defaults are the paper's architecture (the ``roneneldan/TinyStories-28M`` config, trained from scratch):
8 layers, d_model 512, 16 heads, d_mlp 2048, alternating global / local (window 256) attention, ``gelu_new``,
untied embeddings, weights drawn from ``N(0, 0.8 / sqrt(d_model))``. The quick recipes shrink it.

The step feeds ``input_ids[:, :-1]`` and scores ``input_ids[:, 1:]`` where both tokens are real, as the paper
does, and hands the per-token losses to :meth:`~lightning_gradroute.GradientRoutingMixin.routed_loss`, which
logs ``train/loss_retain`` / ``train/loss_forget`` (soft labels count fractionally) and, on the validation
sets, ``val/loss_retain`` / ``val/loss_forget``.

Optional pieces, each from the paper:

* ``l1_coeff`` / ``l1_modules``: an L1 penalty on MLP activations, ``coeff * sum|a| / (B * T)`` summed over the
  matched modules, taken *before* any routing hook (so its gradient is not routed);
* ``demix=True``: every MLP becomes a retain / forget expert pair (the DEMix baseline, see ``demix.py``); each
  story's expert is chosen by its per-story ``route_labels``.

And two that are not:

* ``token_filter_threshold``: the token-filtering baseline (Rathi & Radford 2026, arXiv 2601.21571): in training,
  a predicted token whose forget label (``route_labels``, hard or soft) is at least the threshold adds nothing to
  the loss; it still serves as context for the tokens after it;
* ``routed_optimizer=True``: :class:`~lightning_gradroute.RoutedAdamW` instead of ``torch.optim.AdamW``, for
  parameter routing (units a step's data may not change keep their value and optimizer state exactly).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import GPTNeoConfig, GPTNeoForCausalLM
from typing_extensions import override

from lightning_gradroute.experiments.tinystories.demix import DEMixMLP, add_demix_experts, demix_experts
from lightning_gradroute.mixin import GradientRoutingMixin
from lightning_gradroute.optim import RoutedAdamW
from lightning_gradroute.targets import Target, resolve_modules

__all__ = ["TinyStoriesLM", "gpt_neo_config", "next_token_losses"]


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


def next_token_losses(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per-token CE of a causal LM on ``batch``: ``(losses, valid)``, both ``(B, T - 1)``.

    Feeds ``input_ids[:, :-1]``, scores ``input_ids[:, 1:]``; a position counts where both tokens are real.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids[:, :-1]).logits
    losses = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none").view_as(ids[:, 1:])
    return losses, (mask[:, :-1] * mask[:, 1:]).bool()


class TinyStoriesLM(GradientRoutingMixin, pl.LightningModule):
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
        lr: peak AdamW learning rate, reached after ``warmup_steps`` linear steps from 0, then cosine-decayed to
            ``min_lr_ratio * lr`` at the trainer's last step (the paper: 5e-4, 100, 0.1).
        betas, weight_decay: AdamW (the paper: (0.9, 0.95), 0.1).
        l1_coeff: weight of the L1 activation penalty (the paper: 1e-4); 0 disables it.
        l1_modules: the modules whose outputs the L1 penalty reads (glob relative to this module).
        demix: make every MLP a DEMix retain / forget expert pair.
        token_filter_threshold: token filtering: training tokens whose forget label is at least this get no loss
            (in (0, 1]; 1 drops exactly the tokens labelled forget); None trains on every token.
        routed_optimizer: use :class:`~lightning_gradroute.RoutedAdamW` (same settings); pair it with parameter
            routes. Without any, it steps exactly as AdamW.
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
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"TinyStoriesLM: hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if l1_coeff < 0 or lr <= 0 or warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError(
                f"TinyStoriesLM: need l1_coeff >= 0, lr > 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1; got "
                f"{l1_coeff}, {lr}, {warmup_steps}, {min_lr_ratio}"
            )
        if token_filter_threshold is not None and not 0 < token_filter_threshold <= 1:
            raise ValueError(
                f"TinyStoriesLM: token_filter_threshold must be in (0, 1] or None, got {token_filter_threshold}"
            )
        self.save_hyperparameters()
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
        self.model = GPTNeoForCausalLM(config)
        if demix:
            add_demix_experts(self, "model.transformer.h.*.mlp", init_std=config.initializer_range)
        if l1_coeff:
            resolve_modules(self, Target(l1_modules), "l1_modules")  # fail now on a pattern that matches nothing
        self._l1_handles: list[RemovableHandle] = []
        self._l1_terms: list[Tensor] = []

    @property
    def is_demix(self) -> bool:
        return any(isinstance(m, DEMixMLP) for m in self.modules())

    @override
    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids).logits

    def token_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(losses, valid)`` per predicted token; DEMix experts are chosen by the per-story ``route_labels``."""
        if not self.is_demix:
            return next_token_losses(self.model, batch)
        labels = batch["route_labels"]
        if labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(
                f"TinyStoriesLM(demix=True) needs one integer label per story (data labels='document'), got "
                f"route_labels of shape {tuple(labels.shape)} and dtype {labels.dtype}"
            )
        with demix_experts(self, labels == 1):
            return next_token_losses(self.model, batch)

    # ----------------------------------------------------------------- L1 hooks
    @override
    def on_fit_start(self) -> None:
        # After the routing callback's setup (which may have expanded the MLPs) and its hooks: prepend so the
        # penalty reads the activation before routing, as in the paper.
        if self.hparams.l1_coeff and not self._l1_handles:
            for _, module in resolve_modules(self, Target(self.hparams.l1_modules), "l1_modules"):
                self._l1_handles.append(module.register_forward_hook(self._record_l1, prepend=True))

    def _record_l1(self, module: nn.Module, args: Any, output: Tensor) -> None:
        if self.training and torch.is_grad_enabled():
            self._l1_terms.append(output.abs().sum())

    @override
    def on_train_end(self) -> None:
        # Before any callback's on_fit_end (ablation, evaluation fine-tunes), so those run without the penalty.
        for handle in self._l1_handles:
            handle.remove()
        self._l1_handles.clear()
        self._l1_terms.clear()

    # -------------------------------------------------------------------- steps
    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self._l1_terms.clear()
        losses, valid = self.token_losses(batch)
        labels = batch["route_labels"]
        if self.hparams.token_filter_threshold is not None:
            forget = labels if labels.dim() == 2 else labels[:, None].expand_as(valid)
            valid = valid & (forget < self.hparams.token_filter_threshold)
        loss = self.routed_loss(losses, labels, valid=valid)
        if self._l1_terms:
            l1 = torch.stack(self._l1_terms).sum() / losses.numel()
            self._l1_terms.clear()
            self.log("train/l1", l1, on_step=True, on_epoch=False)
            loss = loss + self.hparams.l1_coeff * l1
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        losses, valid = self.token_losses(batch)
        self.routed_loss(losses, batch["route_labels"], valid=valid)

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_vocab = getattr(datamodule, "vocab_size", None) if datamodule is not None else None
        if data_vocab is not None and data_vocab > self.hparams.vocab_size:
            raise ValueError(
                f"TinyStoriesLM: the tokenizer has {data_vocab} tokens but model.vocab_size is "
                f"{self.hparams.vocab_size}; set model vocab_size >= {data_vocab}"
            )

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        adamw = RoutedAdamW if hp.routed_optimizer else torch.optim.AdamW
        optimizer = adamw(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return step / hp.warmup_steps
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
