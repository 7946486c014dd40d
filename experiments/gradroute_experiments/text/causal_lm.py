"""A causal language model of any Hugging Face architecture as a LightningModule, with per-label losses.

:class:`CausalLM` builds ``AutoModelForCausalLM.from_config`` from a plain config mapping (``model_type`` plus the
architecture's fields), so one YAML key chooses GPT-Neo, Llama, Qwen2 or any other causal LM that transformers
knows, trained from scratch. The step feeds ``input_ids[:, :-1]`` and scores ``input_ids[:, 1:]`` where both tokens
are real, and hands the per-token losses to :meth:`~lightning_gradroute.GradientRoutingMixin.routed_loss`, which
logs ``train/loss_<label>`` and ``val/loss_<label>`` for the module's ``routing_labels``.

Optional: an L1 penalty on MLP activations, ``l1_coeff * sum|a| / (B * T)`` summed over the modules that
``l1_modules`` matches (their output, or with ``l1_site="input"`` their first input: the hidden activation of a
gated MLP is the input of ``down_proj``), read *before* any routing hook so its gradient is not routed (the
paper's setting).

Two options for unlearning baselines and parameter routing:

* ``token_filter_threshold``: the token-filtering baseline (Rathi & Radford 2026, arXiv 2601.21571). In training,
  a predicted token whose label (``route_labels``: the hard label index, or the soft weight of the second label,
  e.g. the forget probability) is at least the threshold adds nothing to the loss; it still serves as context for
  the tokens after it.
* ``routed_optimizer=True``: :class:`~lightning_gradroute.RoutedAdamW` instead of ``torch.optim.AdamW``, for
  parameter routing (units a step's data may not change keep their value and optimizer state exactly).

:func:`token_mean_loss` and :func:`weighted_token_losses` are the evaluation losses of such a model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import transformers
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_gradroute.evaluation import EvaluationCallback
from lightning_gradroute.evaluation.losses import evaluation_mode, model_device, next_token_losses
from lightning_gradroute.mixin import GradientRoutingMixin
from lightning_gradroute.optim import RoutedAdamW
from lightning_gradroute.targets import Target, resolve_modules

__all__ = [
    "CausalLM",
    "CausalLMEvaluation",
    "next_token_losses",
    "token_mean_loss",
    "weighted_token_losses",
]


class CausalLM(GradientRoutingMixin, pl.LightningModule):
    """A Hugging Face causal LM (``self.model``), trained from scratch, with per-label losses and an optional L1.

    Example (a small Llama whose positions predicting one token are labelled ``"target"``)::

        lm = CausalLM(
            config={"model_type": "llama", "vocab_size": 2048, "hidden_size": 128, "num_hidden_layers": 6,
                    "num_attention_heads": 4, "intermediate_size": 384, "tie_word_embeddings": True},
            routing_labels=("other", "target"),
        )
        routing = GradientRoutingCallback(
            targets={"resid": Target("model.model.layers.[2-5]")},           # Llama blocks return a tensor
            routes=[Route("target", "resid", {"1:": 0.0})],                  # only residual dim 0 learns
            labels=["other", "target"],
        )

    Args:
        config: ``model_type`` (``"llama"``, ``"qwen2"``, ``"gpt_neo"``...) and the fields of that architecture's
            HF config (``transformers.AutoConfig.for_model``).
        routing_labels: the label names of the per-label losses; a ``GradientRoutingCallback`` on this module
            must use the same names in the same order.
        lr: peak AdamW learning rate, reached after ``warmup_steps`` linear steps from 0, then cosine-decayed to
            ``min_lr_ratio * lr`` at the trainer's last step.
        betas, weight_decay: AdamW.
        l1_coeff: weight of the L1 activation penalty; 0 disables it.
        l1_modules: the modules whose activations the L1 penalty reads (glob relative to this module); required
            when ``l1_coeff > 0``.
        l1_site: ``"output"`` reads the modules' outputs, ``"input"`` their first positional input.
        token_filter_threshold: token filtering: training tokens whose label is at least this get no loss, in
            (0, 1] (1 drops exactly the tokens labelled with the second label); None trains on every token. Needs
            exactly two ``routing_labels``.
        routed_optimizer: use :class:`~lightning_gradroute.RoutedAdamW` (same settings); pair it with parameter
            routes. Without any, it steps exactly as ``AdamW(foreach=False)``.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        routing_labels: Sequence[str] = ("retain", "forget"),
        lr: float = 5e-4,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        l1_coeff: float = 0.0,
        l1_modules: str | None = None,
        l1_site: Literal["output", "input"] = "output",
        token_filter_threshold: float | None = None,
        routed_optimizer: bool = False,
    ) -> None:
        labels = tuple(routing_labels)
        if len(labels) < 2 or len(set(labels)) != len(labels) or not all(isinstance(x, str) and x for x in labels):
            raise ValueError(f"CausalLM: routing_labels must be at least two unique names, got {list(labels)}")
        self.routing_labels = labels  # before the mixin builds its per-label metrics
        super().__init__()
        if l1_coeff < 0 or lr <= 0 or warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError(
                f"CausalLM: need l1_coeff >= 0, lr > 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1; got "
                f"{l1_coeff}, {lr}, {warmup_steps}, {min_lr_ratio}"
            )
        if l1_site not in ("output", "input"):
            raise ValueError(f"CausalLM: l1_site must be 'output' or 'input', got {l1_site!r}")
        if token_filter_threshold is not None and not 0 < token_filter_threshold <= 1:
            raise ValueError(
                f"CausalLM: token_filter_threshold must be in (0, 1] or None, got {token_filter_threshold}"
            )
        if token_filter_threshold is not None and len(labels) != 2:
            raise ValueError(
                f"CausalLM: token_filter_threshold filters the second of two routing_labels, got {list(labels)}"
            )
        if l1_coeff and not l1_modules:
            raise ValueError("CausalLM: l1_coeff > 0 needs l1_modules, the modules whose activations it penalises")
        fields = dict(config)
        model_type = fields.pop("model_type", None)
        if not isinstance(model_type, str):
            raise ValueError(f"CausalLM: config needs a 'model_type' ('llama', 'qwen2', 'gpt_neo'...), got {config!r}")
        self.save_hyperparameters()
        # Kept as attributes, not read back from hparams: LightningCLI sets a subclass's hparams to the subclass's
        # own arguments, which need not include these.
        self.lr, self.warmup_steps, self.min_lr_ratio = lr, warmup_steps, min_lr_ratio
        self.betas, self.weight_decay = tuple(betas), weight_decay
        self.l1_coeff = l1_coeff
        self.token_filter_threshold, self.routed_optimizer = token_filter_threshold, routed_optimizer
        self.l1_target = Target(l1_modules, site=l1_site) if l1_coeff else None
        hf_config = transformers.AutoConfig.for_model(model_type, **fields)
        self.model = transformers.AutoModelForCausalLM.from_config(hf_config)
        if self.l1_target is not None:
            resolve_modules(self, self.l1_target, "l1_modules")  # fail now on a pattern that matches nothing
        self._l1_handles: list[RemovableHandle] = []
        self._l1_terms: list[Tensor] = []

    @override
    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids).logits

    def token_losses(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(losses, valid)`` per predicted token, both ``(B, T - 1)`` (see :func:`next_token_losses`)."""
        return next_token_losses(self.model, batch)

    # ----------------------------------------------------------------- L1 hooks
    @override
    def on_fit_start(self) -> None:
        # After the routing callback's setup (which may have expanded the MLPs) and its hooks: prepend so the
        # penalty reads the activation before routing, as in the paper.
        if self.l1_target is not None and not self._l1_handles:
            for _, module in resolve_modules(self, self.l1_target, "l1_modules"):
                if self.l1_target.site == "output":
                    handle = module.register_forward_hook(self._record_output_l1, prepend=True)
                else:
                    handle = module.register_forward_pre_hook(self._record_input_l1, prepend=True)
                self._l1_handles.append(handle)

    def _record_output_l1(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self._record_l1(output)

    def _record_input_l1(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._record_l1(args[0])

    def _record_l1(self, activation: Tensor) -> None:
        if self.training and torch.is_grad_enabled():
            self._l1_terms.append(activation.abs().sum())

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
        if self.token_filter_threshold is not None:
            second = labels if labels.dim() == 2 else labels[:, None].expand_as(valid)
            valid = valid & (second < self.token_filter_threshold)
        loss = self.routed_loss(losses, labels, valid=valid)
        if self._l1_terms:
            l1 = torch.stack(self._l1_terms).sum() / losses.numel()
            self._l1_terms.clear()
            self.log("train/l1", l1, on_step=True, on_epoch=False)
            loss = loss + self.l1_coeff * l1
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
        model_vocab = self.model.config.vocab_size
        if data_vocab is not None and data_vocab > model_vocab:
            raise ValueError(
                f"{type(self).__name__}: the tokenizer has {data_vocab} tokens but the model's vocab_size is "
                f"{model_vocab}; set the model's vocab_size >= {data_vocab}"
            )

    @override
    def configure_optimizers(self) -> Any:
        adamw = RoutedAdamW if self.routed_optimizer else torch.optim.AdamW
        optimizer = adamw(self.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        warmup, floor = self.warmup_steps, self.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warmup:
                return step / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# --------------------------------------------------------------------------------------------- evaluation
class CausalLMEvaluation(EvaluationCallback):
    """Base of the evaluations that run on a :class:`CausalLM` when ``fit`` ends and write ``results.json``
    (:class:`~lightning_gradroute.evaluation.EvaluationCallback`: ``check``, the log dir, ``write_results``);
    ``setup("fit")`` first checks that the model is a :class:`CausalLM`."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not isinstance(pl_module, CausalLM):
            raise ValueError(f"{type(self).__name__}: the model must be a CausalLM, got {type(pl_module).__name__}")
        super().setup(trainer, pl_module, stage)


def token_mean_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Mean next-token loss over the real tokens of ``batch``, for a :class:`CausalLM`."""
    if not isinstance(model, CausalLM):
        raise TypeError(f"token_mean_loss: expected a CausalLM, got {type(model).__name__}")
    losses, valid = model.token_losses(batch)
    return (losses * valid).sum() / valid.sum().clamp_min(1)


def weighted_token_losses(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]], token_weights: Mapping[str, Tensor]
) -> dict[str, float]:
    """Weighted token-average losses of a :class:`CausalLM` over ``batches``, one per ``(vocab_size,)`` table.

    For each named table, every real target token of every batch counts with weight ``table[target]``: the
    result is ``sum(weight * loss) / sum(weight)`` over all of them (one forward pass serves every table). With
    the soft routing labels ``1 - w`` it is the loss on forget-characteristic tokens; with 1 everywhere but 0 on a
    token set it is the loss on every token *except* those, a proper masked mean (not a per-token loss multiplied
    by 0 and averaged over all tokens).

    Example::

        routed = torch.zeros(vocab_size); routed[token_ids] = 1
        weighted_token_losses(lm, forget_batches, {"routed": routed, "unrouted": 1 - routed})

    Raises:
        ValueError: no table, or a table that gives no target token a positive weight.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"weighted_token_losses: expected a CausalLM, got {type(model).__name__}")
    if not token_weights:
        raise ValueError("weighted_token_losses: no weight tables given")
    totals = dict.fromkeys(token_weights, 0.0)
    weights = dict.fromkeys(token_weights, 0.0)
    with evaluation_mode(model):
        for batch in batches:
            batch = move_data_to_device(batch, model_device(model))
            losses, valid = model.token_losses(batch)
            targets = batch["input_ids"][:, 1:]
            for name, table in token_weights.items():
                weight = table.to(losses.device)[targets] * valid
                totals[name] += float((losses * weight).sum())
                weights[name] += float(weight.sum())
    empty = [name for name, weight in weights.items() if weight == 0]
    if empty:
        raise ValueError(f"weighted_token_losses: table {empty[0]!r} gives no target token in the batches a weight")
    return {name: totals[name] / weights[name] for name in token_weights}
