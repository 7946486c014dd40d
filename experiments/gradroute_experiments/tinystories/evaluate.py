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

Losses are measured on the held-out retain and forget stories of :class:`TinyStoriesDataModule` at each
stage (``pre_ablation`` right after training, ``post_ablation``, ``final`` after the coherence fine-tune):
``retain`` and ``forget`` are the paper's (mean of per-batch token-averaged losses); ``forget_tokens`` is a
diagnostic of ours, the loss on the forget stories' tokens weighted by how forget-characteristic each is
(``1 - w``, the routing weight), which isolates the concept from the ordinary English around it. The
attack fine-tunes the final model on ``attack_stories`` forget stories drawn (per seed) from the held-out
attack pool, as one batch (or cycled batches of ``attack_batch_size``), and records the seed-averaged losses
(``attack_metrics``) after every ``attack_eval_every``-th step; the "robust" forget loss is the lowest point of
that curve (step 0 included). Unlike the paper's script the attack never stops early, so its lowest loss is at
most the paper's for the same runs. With several learning rates (``attack_lr`` a list, an attacker's sweep) every
rate runs from the same weights and the robust forget loss is the lowest over all of them; the curves of each rate
are kept, so the steps the attack needs to reach a reference loss (SGTM's steps to recover) can be read off
afterwards.

With ``log_grad_norms=True`` on the routing callback, the mean over training steps of each logged gradient norm
(``gradroute/grad_norm/<target>/<label>/<units>``) is copied into ``results.json`` (``grad_norms``).
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_gradroute.callback import GradientRoutingCallback
from lightning_gradroute.evaluation import mean_loss, retraining_attack, steps_to_recover
from gradroute_experiments.causal_lm import (
    coherence_finetune_on_stories,
    token_mean_loss,
    weighted_token_losses,
)
from gradroute_experiments.tinystories.data import TinyStoriesDataModule
from gradroute_experiments.tinystories.demix import keep_retain_experts
from gradroute_experiments.tinystories.model import TinyStoriesLM
from gradroute_experiments.tinystories.rmu import RMU

__all__ = ["LOSSES", "METHODS", "UnlearningEvaluation", "recovery_steps"]

METHODS = ("era", "param_routing", "demix", "rmu", "data_filtering", "token_filtering", "base")
Method = Literal["era", "param_routing", "demix", "rmu", "data_filtering", "token_filtering", "base"]
#: The held-out losses the pipeline measures (``forget_tokens``: the forget stories' tokens weighted by ``1 - w``).
LOSSES = ("retain", "forget", "forget_tokens")
_GRAD_NORM_PREFIX = "gradroute/grad_norm/"


def recovery_steps(attack: dict[str, Any], target_loss: float) -> int | None:
    """Steps to recover (SGTM's metric) from the ``attack`` entry of a ``results.json``: the fewest attack steps
    after which some learning rate's seed-averaged forget loss is at or below ``target_loss`` (in practice plain
    training's forget loss); ``None`` if no rate gets there within the attack (the attack's length is the cap)."""
    found = [
        steps_to_recover(a["curves"]["forget"], target_loss, attack["eval_steps"]) for a in attack["by_lr"].values()
    ]
    return min((s for s in found if s is not None), default=None)


class UnlearningEvaluation(pl.Callback):
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
        for name, value in (("coherence_steps", coherence_steps), ("attack_steps", attack_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"UnlearningEvaluation: {name} must be an int >= 0, got {value!r}")
        for name, value in (
            ("attack_stories", attack_stories),
            ("attack_seeds", attack_seeds),
            ("attack_eval_every", attack_eval_every),
            ("attack_batch_size", attack_batch_size or 1),
            ("eval_batch_size", eval_batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UnlearningEvaluation: {name} must be a positive int, got {value!r}")
        lrs = list(attack_lr) if isinstance(attack_lr, (list, tuple)) else [attack_lr]
        if not lrs or len(set(lrs)) != len(lrs) or not all(isinstance(lr, (int, float)) and lr > 0 for lr in lrs):
            raise ValueError(
                f"UnlearningEvaluation: attack_lr must be a positive number or distinct ones, got {attack_lr}"
            )
        if "forget" not in attack_metrics or not set(attack_metrics) <= set(LOSSES):
            raise ValueError(
                f"UnlearningEvaluation: attack_metrics must include 'forget' and be among {LOSSES}, got "
                f"{attack_metrics}"
            )
        if rmu is not None and method != "rmu":
            raise ValueError(f"UnlearningEvaluation: rmu settings given for method {method!r}; they need method='rmu'")
        self.method = method
        self.coherence_steps = coherence_steps if method in ("era", "param_routing", "demix") else 0
        self.coherence_lr = coherence_lr
        self.attack_steps, self.attack_lrs = attack_steps, lrs
        self.attack_stories, self.attack_seeds, self.attack_batch_size = attack_stories, attack_seeds, attack_batch_size
        self.attack_eval_every, self.attack_metrics = attack_eval_every, tuple(attack_metrics)
        self.eval_batch_size = eval_batch_size
        self.rmu = (rmu or RMU()) if method == "rmu" else None
        self.results_file = results_file
        self.results: dict[str, Any] = {}
        self._routing: GradientRoutingCallback | None = None
        self._grad_norms: dict[str, list[float]] = {}
        self._started = 0.0
        self._out_dir = Path(".")

    # ------------------------------------------------------------------ checks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, TinyStoriesLM):
            raise ValueError(f"UnlearningEvaluation: the model must be a TinyStoriesLM, got {type(pl_module).__name__}")
        if not isinstance(trainer.datamodule, TinyStoriesDataModule):
            raise ValueError("UnlearningEvaluation: fit with a TinyStoriesDataModule (it provides the held-out sets)")
        routing = [i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, GradientRoutingCallback)]
        mine = trainer.callbacks.index(self)
        routed = self.method in ("era", "param_routing")
        if routed and not routing:
            raise ValueError(
                f"UnlearningEvaluation(method={self.method!r}): add a GradientRoutingCallback to the trainer"
            )
        if routing and routing[0] > mine:
            raise ValueError(
                "UnlearningEvaluation: list it after the GradientRoutingCallback, whose ablation comes first"
            )
        if routing and not routed:
            raise ValueError(
                f"UnlearningEvaluation(method={self.method!r}): the trainer routes gradients; use 'era' (with an "
                "expansion) or 'param_routing'"
            )
        self._routing = trainer.callbacks[routing[0]] if routing else None  # type: ignore[assignment]
        if self._routing is not None and (
            bool(self._routing.expansions) != (self.method == "era")
            or (self._routing.ablate == "dedicated") != (self.method == "param_routing")
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
        # trainer.log_dir is a collective under DDP: resolve it here, on every rank, not in rank-0-only code.
        self._out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self._started = time.perf_counter()

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _stories(trainer: pl.Trainer, stories: list[list[int]]) -> list[list[int]]:
        """Under ``fast_dev_run`` every evaluation uses one training batch worth of stories at most."""
        if not trainer.fast_dev_run:
            return stories
        return stories[: trainer.datamodule.hparams.batch_size]  # type: ignore[attr-defined]

    def _held_out(self, trainer: pl.Trainer) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
        dm: TinyStoriesDataModule = trainer.datamodule  # type: ignore[assignment]
        assert dm.splits is not None
        retain = list(dm.batches(self._stories(trainer, dm.splits.retain_val), self.eval_batch_size))
        forget = list(dm.batches(self._stories(trainer, dm.splits.forget_val), self.eval_batch_size, forget=True))
        return retain, forget

    def _losses(self, trainer: pl.Trainer, model: nn.Module, which: tuple[str, ...] = LOSSES) -> dict[str, float]:
        retain, forget = self._held_out(trainer)
        losses = {}
        if "retain" in which:
            losses["retain"] = mean_loss(model, retain, token_mean_loss)
        losses["forget"] = mean_loss(model, forget, token_mean_loss)
        if "forget_tokens" in which:
            token_weights = trainer.datamodule.token_weights  # type: ignore[attr-defined]
            losses |= weighted_token_losses(model, forget, {"forget_tokens": 1 - token_weights})
        return losses

    # ------------------------------------------------------------------ stages
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._collect_grad_norms(trainer)  # the previous step's

    def _collect_grad_norms(self, trainer: pl.Trainer) -> None:
        for key, value in trainer.callback_metrics.items():
            if key.startswith(_GRAD_NORM_PREFIX):
                self._grad_norms.setdefault(key.removeprefix(_GRAD_NORM_PREFIX), []).append(float(value))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collect_grad_norms(trainer)  # the last step's
        if trainer.is_global_zero:
            self.results = {"pre_ablation": self._losses(trainer, pl_module)}
            self.results["train_seconds"] = round(time.perf_counter() - self._started, 1)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        assert isinstance(pl_module, TinyStoriesLM)
        dm: TinyStoriesDataModule = trainer.datamodule  # type: ignore[assignment]
        assert dm.splits is not None
        quick = bool(trainer.fast_dev_run)
        started = time.perf_counter()
        results = self.results
        if self.method == "demix":
            results["experts_removed"] = keep_retain_experts(pl_module)
        if self.method == "param_routing":
            assert self._routing is not None
            results["units_zeroed"] = dict(self._routing.ablated_units)  # zeroed by its ablate="dedicated"
        if self.method == "rmu":
            assert self.rmu is not None
            labelled = [ids for ids, lab in zip(dm.splits.train, dm.splits.train_labelled) if lab]
            others = [ids for ids, lab in zip(dm.splits.train, dm.splits.train_labelled) if not lab]
            if not labelled:
                raise ValueError("UnlearningEvaluation(method='rmu'): no labelled forget stories (oversight 0?)")
            rmu = copy.copy(self.rmu)
            if quick:
                rmu.steps = 1
            results["rmu"] = rmu(
                pl_module.model,
                list(dm.batches(labelled, dm.hparams.batch_size, forget=True)),
                list(dm.batches(others, dm.hparams.batch_size)),
            )
        results["post_ablation"] = self._losses(trainer, pl_module)

        steps = min(self.coherence_steps, 1) if quick else self.coherence_steps
        if steps:
            limit = dm.hparams.batch_size if quick else None
            coherence = coherence_finetune_on_stories(
                pl_module, dm, steps, self.coherence_lr, self.eval_batch_size, limit
            )
            results["coherence"] = coherence.to_dict()
        results["final"] = self._losses(trainer, pl_module)

        pool = dm.splits.attack_pool
        size = min(self.attack_stories, len(self._stories(trainer, pool)))

        def attack_batches(seed: int) -> list[dict[str, Tensor]]:
            return list(dm.batches(random.Random(seed).sample(pool, size), self.attack_batch_size or size, forget=True))

        by_lr = {}
        for lr in self.attack_lrs:
            attack = retraining_attack(
                pl_module,
                token_mean_loss,
                attack_batches,
                eval_fn=lambda m: self._losses(trainer, m, self.attack_metrics),
                steps=1 if quick else self.attack_steps,
                lr=lr,
                seeds=range(1 if quick else self.attack_seeds),
                eval_every=1 if quick else self.attack_eval_every,
            )
            by_lr[lr] = attack
        best = min(self.attack_lrs, key=lambda lr: by_lr[lr].lowest_loss)
        results["attack"] = {
            "stories": size,
            "lowest_forget": by_lr[best].lowest_loss,
            "lowest_step": by_lr[best].lowest_step,
            "lowest_lr": best,
            "curves": by_lr[best].curves,
            "eval_steps": by_lr[best].eval_steps,
            "by_lr": {
                str(lr): {"lowest_forget": a.lowest_loss, "lowest_step": a.lowest_step, "curves": a.curves}
                for lr, a in by_lr.items()
            },
        }
        if self._grad_norms:
            results["grad_norms"] = {k: sum(v) / len(v) for k, v in sorted(self._grad_norms.items())}
        results.update(
            method=self.method,
            oversight=dm.hparams.oversight,
            precision=dm.hparams.precision,
            data=dm.summary(),
            model={k: pl_module.hparams[k] for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size")},
            parameters=sum(p.numel() for p in pl_module.parameters()),
            steps_trained=trainer.global_step,
            evaluation_seconds=round(time.perf_counter() - started, 1),
        )
        self._write(trainer, results)

    def _write(self, trainer: pl.Trainer, results: dict[str, Any]) -> None:
        self._out_dir.mkdir(parents=True, exist_ok=True)
        path = self._out_dir / self.results_file
        path.write_text(json.dumps(results, indent=2))
        summary = {k: results[k] for k in ("pre_ablation", "post_ablation", "final") if k in results}
        rank_zero_info(
            f"unlearning results ({self.method}): {path}\n{json.dumps(summary)}\n"
            f"lowest forget loss under the retraining attack: {results['attack']['lowest_forget']:.4f}"
        )
