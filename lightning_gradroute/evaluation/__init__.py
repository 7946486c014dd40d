"""Robustness evaluation for unlearning, model-agnostic: held-out retain/forget losses, the coherence fine-tune
after ablation, and the retraining attack (lowest forget loss reached, per-step curve, steps to recover).

Each function takes the model, ``loss_fn(model, batch) -> scalar`` and plain batches, so it serves raw
``nn.Module`` s, HF models and LightningModules alike.
"""

from lightning_gradroute.evaluation.finetune import (
    AttackResult,
    FinetuneResult,
    coherence_finetune,
    retraining_attack,
    steps_to_recover,
)
from lightning_gradroute.evaluation.losses import LossFn, evaluation_mode, mean_loss, retain_forget_loss

__all__ = [
    "AttackResult",
    "FinetuneResult",
    "LossFn",
    "coherence_finetune",
    "evaluation_mode",
    "mean_loss",
    "retain_forget_loss",
    "retraining_attack",
    "steps_to_recover",
]
