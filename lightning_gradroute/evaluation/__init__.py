"""Robustness evaluation for unlearning, model-agnostic: held-out retain/forget losses, the coherence fine-tune
after ablation, and the retraining attack (lowest forget loss reached, per-step curve, steps to recover); and
:class:`UnlearningEvaluation`, all of it as a Lightning callback for any causal LM.

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
from lightning_gradroute.evaluation.losses import (
    LossFn,
    evaluation_mode,
    mean_loss,
    next_token_loss,
    next_token_losses,
    retain_forget_loss,
)
from lightning_gradroute.evaluation.unlearning import (
    CoherenceData,
    EvaluationCallback,
    UnlearningData,
    UnlearningEvaluation,
    coherence_finetune_on,
    recovery_steps,
)

__all__ = [
    "AttackResult",
    "CoherenceData",
    "EvaluationCallback",
    "FinetuneResult",
    "LossFn",
    "UnlearningData",
    "UnlearningEvaluation",
    "coherence_finetune",
    "coherence_finetune_on",
    "evaluation_mode",
    "mean_loss",
    "next_token_loss",
    "next_token_losses",
    "recovery_steps",
    "retain_forget_loss",
    "retraining_attack",
    "steps_to_recover",
]
