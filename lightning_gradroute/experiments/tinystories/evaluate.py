"""The after-training pipeline of the TinyStories unlearning experiment, as a callback: measure, ablate,
coherence fine-tune, retraining attack, ``results.json``.

Per method (the paper's §3.2-3.4):

============== ===================================== ================ ==========================
method         "ablate" step                          coherence        retraining attack
============== ===================================== ================ ==========================
era            the routing callback contracts the     yes              yes
               expanded units (its ``on_fit_end``)
demix          keep the retain expert of every layer  yes              yes
rmu            RMU on the trained (plain) model        no               yes
data_filtering none (labelled forget data was          no               yes
               never trained on)
base           none                                    no               yes (reference)
============== ===================================== ================ ==========================

Losses are measured on the held-out retain and forget stories of :class:`TinyStoriesDataModule` at each
stage (``pre_ablation`` right after training, ``post_ablation``, ``final`` after the coherence fine-tune):
``retain`` and ``forget`` are the paper's (mean of per-batch token-averaged losses); ``forget_tokens`` is a
diagnostic of ours, the loss on the forget stories' tokens weighted by how forget-characteristic each is
(``1 - w``, the routing weight), which isolates the concept from the ordinary English around it. The
attack fine-tunes the final model on ``attack_stories`` forget stories drawn (per seed) from the held-out
attack pool, as one batch, and records the seed-averaged forget and retain loss after every step; the
"robust" forget loss is the lowest point of that curve (step 0 included). Unlike the paper's script the attack
never stops early, so its lowest loss is at most the paper's for the same runs.
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
from lightning_gradroute.evaluation import retain_forget_loss, retraining_attack
from lightning_gradroute.experiments.causal_lm import (
    coherence_finetune_on_stories,
    token_mean_loss,
    weighted_token_losses,
)
from lightning_gradroute.experiments.tinystories.data import TinyStoriesDataModule
from lightning_gradroute.experiments.tinystories.demix import keep_retain_experts
from lightning_gradroute.experiments.tinystories.model import TinyStoriesLM
from lightning_gradroute.experiments.tinystories.rmu import RMU

__all__ = ["METHODS", "UnlearningEvaluation"]

METHODS = ("era", "demix", "rmu", "data_filtering", "base")


class UnlearningEvaluation(pl.Callback):
    """Run the unlearning evaluation of ``method`` when ``fit`` ends and write ``results.json`` to the log dir.

    Put it *after* the ``GradientRoutingCallback`` in the callback list (its ablation must run first). Under
    ``fast_dev_run`` every stage runs one step on one batch (a smoke test of the whole pipeline).

    Example (what ``recipes/tinystories/era.yaml`` does)::

        trainer = pl.Trainer(callbacks=[routing, UnlearningEvaluation("era", coherence_steps=41)])
        trainer.fit(TinyStoriesLM(...), TinyStoriesDataModule(...))   # then read <log_dir>/results.json

    Args:
        method: one of ``era``, ``demix``, ``rmu``, ``data_filtering``, ``base`` (see the module docstring).
        coherence_steps: coherence fine-tune steps on the data module's ``coherence_train`` stories (one batch),
            keeping the best weights on ``coherence_val``; the paper runs 41 for ERA and DEMix. Ignored for the
            other methods.
        coherence_lr: its AdamW learning rate (the paper: 5e-5, betas (0.9, 0.95), weight decay 0.1).
        attack_steps: retraining-attack steps per seed (the paper: 40).
        attack_lr: its AdamW learning rate (the paper: 5e-5, weight decay 0.01).
        attack_stories: forget stories per attack, drawn from the attack pool for each seed (the paper: 64).
        attack_seeds: how many attacks to average (the paper: 5).
        eval_batch_size: batch size of the held-out evaluations.
        rmu: the RMU settings (``method="rmu"`` only; default :class:`RMU` ()).
        results_file: file name under the trainer's log dir.
    """

    def __init__(
        self,
        method: Literal["era", "demix", "rmu", "data_filtering", "base"] = "era",
        coherence_steps: int = 41,
        coherence_lr: float = 5e-5,
        attack_steps: int = 40,
        attack_lr: float = 5e-5,
        attack_stories: int = 64,
        attack_seeds: int = 5,
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
            ("eval_batch_size", eval_batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UnlearningEvaluation: {name} must be a positive int, got {value!r}")
        if rmu is not None and method != "rmu":
            raise ValueError(f"UnlearningEvaluation: rmu settings given for method {method!r}; they need method='rmu'")
        self.method = method
        self.coherence_steps = coherence_steps if method in ("era", "demix") else 0
        self.coherence_lr = coherence_lr
        self.attack_steps, self.attack_lr = attack_steps, attack_lr
        self.attack_stories, self.attack_seeds = attack_stories, attack_seeds
        self.eval_batch_size = eval_batch_size
        self.rmu = (rmu or RMU()) if method == "rmu" else None
        self.results_file = results_file
        self.results: dict[str, Any] = {}
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
        if self.method == "era" and not routing:
            raise ValueError("UnlearningEvaluation(method='era'): add a GradientRoutingCallback to the trainer")
        if routing and routing[0] > mine:
            raise ValueError(
                "UnlearningEvaluation: list it after the GradientRoutingCallback, whose ablation comes first"
            )
        if routing and self.method != "era":
            raise ValueError(f"UnlearningEvaluation(method={self.method!r}): the trainer routes gradients; use 'era'")
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

    def _losses(self, trainer: pl.Trainer, model: nn.Module) -> dict[str, float]:
        retain, forget = self._held_out(trainer)
        losses = retain_forget_loss(model, token_mean_loss, retain, forget)
        token_weights = trainer.datamodule.token_weights  # type: ignore[attr-defined]
        losses |= weighted_token_losses(model, forget, {"forget_tokens": 1 - token_weights})
        return losses

    # ------------------------------------------------------------------ stages
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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

        def attack_batch(seed: int) -> dict[str, Tensor]:
            return next(dm.batches(random.Random(seed).sample(pool, size), size, forget=True))

        attack = retraining_attack(
            pl_module,
            token_mean_loss,
            attack_batch,
            eval_fn=lambda m: self._losses(trainer, m),
            steps=1 if quick else self.attack_steps,
            lr=self.attack_lr,
            seeds=range(1 if quick else self.attack_seeds),
        )
        results["attack"] = {
            "stories": size,
            "lowest_forget": attack.lowest_loss,
            "lowest_step": attack.lowest_step,
            "curves": attack.curves,
        }
        results.update(
            method=self.method,
            oversight=dm.hparams.oversight,
            data=dm.summary(),
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
