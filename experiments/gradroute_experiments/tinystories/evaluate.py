"""The after-training pipeline of the TinyStories unlearning experiment, as a callback: measure, ablate,
coherence fine-tune, retraining attack, ``results.json``.

Per method (the paper's §3.2-3.4):

=============== ===================================== ================ ==========================
method          "ablate" step                          coherence        retraining attack
=============== ===================================== ================ ==========================
era             the routing callback contracts the     yes              yes
                expanded units (its ``on_fit_end``)
param_routing   the routing callback zeroes the units  yes              yes
                only forget data may change (its
                ``ablate="dedicated"``, SGTM-style)
demix           keep the retain expert of every layer  yes              yes
rmu             RMU on the trained (plain) model        no               yes
data_filtering  none (labelled forget data was          no               yes
                never trained on)
token_filtering none (labelled forget tokens never      no               yes
                added to the loss; the model's
                ``token_filter_threshold``)
base            none                                    no               yes (reference)
=============== ===================================== ================ ==========================

The pipeline is the core's :class:`~lightning_gradroute.evaluation.UnlearningEvaluation` (stages, attack,
``results.json``; see its docstring), reading the held-out retain and forget stories, the attack pool and the
coherence stories of :class:`TinyStoriesDataModule` through its
:class:`~lightning_gradroute.evaluation.UnlearningData` methods. This subclass adds the methods' ablations
(demix, param_routing, rmu, through the :meth:`~lightning_gradroute.evaluation.UnlearningEvaluation.ablate`
hook), checks the method against the trainer's setup, and records the method, oversight and data counts.
``retain`` and ``forget`` are the paper's losses (mean of per-batch token-averaged losses); ``forget_tokens`` is
a diagnostic of ours, the loss on the forget stories' tokens weighted by how forget-characteristic each is
(``1 - w``, the routing weight), which isolates the concept from the ordinary English around it. Unlike the
paper's script the attack never stops early, so its lowest loss is at most the paper's for the same runs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from torch import nn
from typing_extensions import override

from lightning_gradroute.evaluation import UnlearningEvaluation as CausalLMUnlearningEvaluation
from gradroute_experiments.text.causal_lm import token_mean_loss, weighted_token_losses
from gradroute_experiments.text.story_module import StoryDataModule
from gradroute_experiments.tinystories.demix import keep_retain_experts
from gradroute_experiments.tinystories.model import TinyStoriesLM
from gradroute_experiments.tinystories.rmu import RMU

__all__ = ["LOSSES", "METHODS", "UnlearningEvaluation", "rmu_sets"]

METHODS = ("era", "param_routing", "demix", "rmu", "data_filtering", "token_filtering", "base")
Method = Literal["era", "param_routing", "demix", "rmu", "data_filtering", "token_filtering", "base"]
#: The held-out losses the pipeline measures (``forget_tokens``: the forget stories' tokens weighted by ``1 - w``).
LOSSES = ("retain", "forget", "forget_tokens")


def rmu_sets(dm: StoryDataModule, who: str) -> tuple[list[Any], list[Any]]:
    """RMU's forget and retain batches: the labelled forget training stories, and every other training story
    (unlabelled forget stories count as retain, as in the paper's partial-oversight RMU)."""
    assert dm.splits is not None
    labelled = [ids for ids, lab in zip(dm.splits.train, dm.splits.train_labelled) if lab]
    others = [ids for ids, lab in zip(dm.splits.train, dm.splits.train_labelled) if not lab]
    if not labelled:
        raise ValueError(f"{who}: no labelled forget stories (oversight 0?)")
    return list(dm.batches(labelled, forget=True)), list(dm.batches(others))


class UnlearningEvaluation(CausalLMUnlearningEvaluation):
    """Run the unlearning evaluation of ``method`` when ``fit`` ends and write ``results.json`` to the log dir.

    Put it *after* the ``GradientRoutingCallback`` in the callback list (its ablation must run first). Under
    ``fast_dev_run`` every stage runs one step on one batch (a smoke test of the whole pipeline).

    Example (what ``recipes/tinystories/era.yaml`` does)::

        trainer = pl.Trainer(callbacks=[routing, UnlearningEvaluation("era", coherence_steps=41)])
        trainer.fit(TinyStoriesLM(...), TinyStoriesDataModule(...))   # then read <log_dir>/results.json

    Args:
        method: one of :data:`METHODS` (see the module docstring).
        coherence_steps: coherence fine-tune steps on the data module's ``coherence_train`` stories (one batch),
            keeping the best weights on ``coherence_val``; the paper runs 41 for ERA and DEMix. Ignored for the
            methods without an ablation step.
        coherence_lr: its AdamW learning rate (the paper: 5e-5, betas (0.9, 0.95), weight decay 0.1).
        attack_steps: retraining-attack steps per seed (the paper: 40).
        attack_lr: its AdamW learning rate (the paper: 5e-5, weight decay 0.01), or a list of rates to sweep.
        attack_stories: forget stories per attack, drawn from the attack pool for each seed (the paper: 64).
        attack_batch_size: split them into batches of this many, one per step, cycled; None: one batch (the
            paper's).
        attack_seeds: how many attacks to average (the paper: 5).
        attack_eval_every: evaluate the attacked model after every this many steps (and the last).
        attack_metrics: the held-out losses evaluated during the attack (a subset of :data:`LOSSES` with
            ``"forget"``; fewer is faster).
        eval_batch_size: batch size of the held-out evaluations.
        rmu: the RMU settings (``method="rmu"`` only; default :class:`RMU` ()).
        results_file: file name under the trainer's log dir.
    """

    LOSSES = LOSSES

    def __init__(
        self,
        method: Method = "era",
        coherence_steps: int = 41,
        coherence_lr: float = 5e-5,
        attack_steps: int = 40,
        attack_lr: float | list[float] = 5e-5,
        attack_stories: int = 64,
        attack_batch_size: int | None = None,
        attack_seeds: int = 5,
        attack_eval_every: int = 1,
        attack_metrics: list[str] | tuple[str, ...] = LOSSES,
        eval_batch_size: int = 128,
        rmu: RMU | None = None,
        results_file: str = "results.json",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"UnlearningEvaluation: method must be one of {METHODS}, got {method!r}")
        if rmu is not None and method != "rmu":
            raise ValueError(f"UnlearningEvaluation: rmu settings given for method {method!r}; they need method='rmu'")
        super().__init__(
            loss_fn=token_mean_loss,
            coherence_steps=coherence_steps,
            coherence_lr=coherence_lr,
            attack_steps=attack_steps,
            attack_lr=attack_lr,
            attack_examples=attack_stories,
            attack_batch_size=attack_batch_size,
            attack_seeds=attack_seeds,
            attack_eval_every=attack_eval_every,
            attack_metrics=attack_metrics,
            eval_batch_size=eval_batch_size,
            results_file=results_file,
        )
        self.method = method
        self.coherence_steps = coherence_steps if method in ("era", "param_routing", "demix") else 0
        self.rmu = (rmu or RMU()) if method == "rmu" else None
        self._dm: StoryDataModule | None = None

    @override
    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, TinyStoriesLM):
            raise ValueError(f"UnlearningEvaluation: the model must be a TinyStoriesLM, got {type(pl_module).__name__}")
        if not isinstance(trainer.datamodule, StoryDataModule):
            raise ValueError(
                "UnlearningEvaluation: fit with a StoryDataModule such as TinyStoriesDataModule (it provides the "
                "held-out sets)"
            )
        self._dm = trainer.datamodule
        routed = self.method in ("era", "param_routing")
        if routed and self.routing is None:
            raise ValueError(
                f"UnlearningEvaluation(method={self.method!r}): add a GradientRoutingCallback to the trainer"
            )
        if self.routing is not None and not routed:
            raise ValueError(
                f"UnlearningEvaluation(method={self.method!r}): the trainer routes gradients; use 'era' (with an "
                "expansion) or 'param_routing'"
            )
        if self.routing is not None and (
            bool(self.routing.expansions) != (self.method == "era")
            or (self.routing.ablate == "dedicated") != (self.method == "param_routing")
        ):
            raise ValueError(
                f"UnlearningEvaluation(method={self.method!r}): 'era' needs the routing callback's expansions (it "
                "contracts them), 'param_routing' routes without one and needs its ablate='dedicated' (it zeroes "
                "the units only forget data trains)"
            )
        if (self.method == "token_filtering") != (pl_module.token_filter_threshold is not None):
            raise ValueError(
                f"UnlearningEvaluation(method={self.method!r}) needs a model with token_filter_threshold "
                f"{'set' if self.method == 'token_filtering' else 'None'}"
            )
        if (self.method == "demix") != pl_module.is_demix:
            raise ValueError(
                f"UnlearningEvaluation(method={self.method!r}) needs a model with demix={self.method == 'demix'}"
            )

    @override
    def held_out_losses(self, model: nn.Module, metrics: Sequence[str] | None = None) -> dict[str, float]:
        metrics = LOSSES if metrics is None else metrics
        losses = super().held_out_losses(model, metrics)
        if "forget_tokens" in metrics:
            assert self._dm is not None and self._dm.token_weights is not None
            tables = {"forget_tokens": 1 - self._dm.token_weights}
            losses |= weighted_token_losses(model, self.eval_batches("forget_eval"), tables)
        return losses

    @override
    def ablate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        if self.method == "demix":
            pl_module.hparams["demix"] = False  # the plain architecture from now on: a saved checkpoint loads as one
            return {"experts_removed": keep_retain_experts(pl_module)}
        if self.method == "param_routing":
            assert self.routing is not None
            return {"units_zeroed": dict(self.routing.ablated_units)}  # zeroed by its ablate="dedicated"
        if self.method != "rmu":
            return {}
        dm, rmu = self._dm, copy.copy(self.rmu)
        assert dm is not None and rmu is not None and isinstance(pl_module, TinyStoriesLM)
        if trainer.fast_dev_run:
            rmu.steps = 1
        return {"rmu": rmu(pl_module.model, *rmu_sets(dm, "UnlearningEvaluation(method='rmu')"))}

    @override
    def metadata(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        dm = self._dm
        assert dm is not None
        return {
            "method": self.method,
            "oversight": dm.settings.recall,  # the data module's own argument may be named recall
            "precision": dm.settings.precision,
            "data": dm.summary(),
            "model": {k: pl_module.hparams[k] for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size")},
        }
