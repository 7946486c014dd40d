"""End-of-training report for the gridworld: every policy under every oversight condition, figures, results.json.

:class:`GridworldReport` runs when training ends and writes into the run's log dir (rank 0):

* ``results.json``: the method, the scale, which weights were evaluated (last, or best by the held-out true
  return), the oversight the run consumed (seen training episodes, held-out episodes scored with the ground
  truth), the validation results at every validation (the learning curve), and for each evaluated policy
  (the policy as trained; for a mixture also the diamond and ghost experts alone, by setting the gate) and each
  condition of
  :data:`~gradroute_experiments.gridworld.evaluate.CONDITIONS` the true return, diamond rate and
  ghost rate (also split into seen / unseen), episodes and mean episode length;
* ``gridworld_policy_map.png`` (action probabilities on a fixed layout; the gate for a mixture) and
  ``gridworld_outcomes.png`` (where episodes end, per policy and condition), also sent to TensorBoard
  (``test/policy_map``, ``test/outcomes``), with every number as a ``test/<policy>/<condition>/<metric>``
  scalar to every logger.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from matplotlib.figure import Figure
from typing_extensions import override

from lightning_gradroute.callback import GradientRoutingCallback
from gradroute_experiments.gridworld.evaluate import (
    CONDITIONS,
    evaluate_policy,
    evaluated_policies,
    outcome_figure,
    policy_map_figure,
    summarize,
)
from gradroute_experiments.gridworld.model import GridworldPolicyGradient

__all__ = ["GridworldReport", "HEADLINE_CONDITION"]

#: The condition the headline number (and the sweep's plot) uses: nobody watches.
HEADLINE_CONDITION = "no_oversight"


class GridworldReport(Callback):
    """At the end of training: evaluate every policy under every oversight condition; write results and figures.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: gradroute_experiments.gridworld.GridworldReport
              init_args: {weights: best, repeats: 2}

    Args:
        weights: ``"last"`` evaluates the weights training ended with; ``"best"`` first loads the best
            checkpoint of the trainer's ``ModelCheckpoint`` (the early-stopping baselines: best held-out true
            return). Without a saved best checkpoint (e.g. ``fast_dev_run``) it warns and evaluates the last.
        repeats: independent rollouts per policy and condition (each of the data module's ``test_envs`` fresh
            environments for ``rollout_steps`` steps, a new seed each), added up. Evaluation runs on rank 0.
    """

    def __init__(self, weights: Literal["last", "best"] = "last", repeats: int = 1) -> None:
        if weights not in ("last", "best"):
            raise ValueError(f"GridworldReport: weights must be 'last' or 'best', got {weights!r}")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"GridworldReport: repeats must be a positive int, got {repeats!r}")
        self.weights = weights
        self.repeats = repeats
        self.results: dict[str, Any] | None = None
        self._fit_started = 0.0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_started = time.perf_counter()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, GridworldPolicyGradient):
            raise TypeError(f"GridworldReport needs a GridworldPolicyGradient, got {type(pl_module).__name__}")
        train_seconds = time.perf_counter() - self._fit_started
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # collectives under DDP: every rank asks
        episode_counts = pl_module.training_episode_counts()
        if not trainer.is_global_zero:
            return
        evaluated = self._load_weights(trainer, pl_module)
        started = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        try:
            evaluation = self.evaluate(pl_module)
        finally:
            pl_module.train(was_training)
        hp, data = pl_module.hparams, pl_module.environment.hparams
        policies = evaluated_policies(pl_module.policy)
        headline_policy = "diamond_expert" if "diamond_expert" in policies else "policy"
        seen = episode_counts["seen_diamond"] + episode_counts["seen_ghost"]
        results = {
            "method": {
                "policy": hp.policy,
                "reward": data.reward,
                "filter_unseen": data.filter_unseen,
                "routed": any(isinstance(cb, GradientRoutingCallback) for cb in trainer.callbacks),
                "oversight_prob": data.oversight_prob,
            },
            "headline": {
                "policy": headline_policy,
                "condition": HEADLINE_CONDITION,
                "true_return": evaluation[headline_policy][HEADLINE_CONDITION]["true_return"],
            },
            "weights": evaluated,
            "scale": {
                "updates": trainer.global_step,
                "num_envs": data.num_envs,
                "rollout_steps": data.rollout_steps,
                "transitions": trainer.global_step * data.num_envs * data.rollout_steps,
                "hidden_size": hp.hidden_size,
                "lr": hp.lr,
                "eval_transitions_per_condition": data.test_envs * data.rollout_steps * self.repeats,
                "world_size": trainer.world_size,
            },
            "oversight_used": {
                "training_episodes": sum(episode_counts.values()),
                "seen_training_episodes": seen,
                "training_episodes_by_outcome": episode_counts,
                "holdout_episodes_scored": pl_module.holdout_episodes,
            },
            "evaluation": evaluation,
            "validation_curve": pl_module.validation_curve,
            "train_seconds": train_seconds,
            "evaluation_seconds": time.perf_counter() - started,
        }
        figures = {
            "policy_map": policy_map_figure(pl_module.policy, data.grid_size, policies),
            "outcomes": outcome_figure(evaluation, list(CONDITIONS)),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        results["figures"] = {name: str(out_dir / f"gridworld_{name}.png") for name in figures}
        for name, figure in figures.items():
            figure.savefig(results["figures"][name], dpi=120)
        (out_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True))
        self._log(trainer, figures, evaluation)
        self.results = results
        lines = [f"gridworld report ({'routed' if results['method']['routed'] else 'not routed'}, {evaluated}):"]
        for name, conditions in evaluation.items():
            cells = ", ".join(
                f"{condition} {s['true_return']:+.3f} (diamond {s['diamond_rate']:.2f}, ghost {s['ghost_rate']:.2f})"
                for condition, s in conditions.items()
            )
            lines.append(f"  {name}: true return {cells}")
        lines.append(f"  seen training episodes {seen:.0f}, held-out episodes scored {pl_module.holdout_episodes:.0f}")
        lines.append(f"  results: {out_dir / 'results.json'}")
        rank_zero_info("\n".join(lines))

    def evaluate(self, model: GridworldPolicyGradient) -> dict[str, dict[str, dict[str, float]]]:
        """``{policy: {condition: summary}}`` for every evaluated policy and condition, on fresh test episodes."""
        data = model.environment
        steps, discount = data.hparams.rollout_steps, data.hparams.discount
        results: dict[str, dict[str, dict[str, float]]] = {}
        for name, steer in evaluated_policies(model.policy).items():
            results[name] = {}
            for condition, oversight in CONDITIONS.items():
                prob = data.hparams.oversight_prob if oversight is None else oversight
                envs = [data.test_env(prob, r, model.device) for r in range(self.repeats)]
                sums = sum(evaluate_policy(model.policy, env, steps, discount, steer) for env in envs)
                results[name][condition] = summarize(sums)
        return results

    def _load_weights(self, trainer: pl.Trainer, model: GridworldPolicyGradient) -> str:
        """Load the best checkpoint's weights when asked to; say which weights are evaluated."""
        if self.weights == "last":
            return f"last (update {trainer.global_step})"
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        if not best:
            rank_zero_warn("GridworldReport(weights='best'): no best checkpoint was saved; evaluating the last weights")
            return f"last (update {trainer.global_step}; no best checkpoint was saved)"
        state = torch.load(best, map_location=model.device, weights_only=True)
        model.load_state_dict(state["state_dict"])
        monitor, score = checkpoint.monitor, float(checkpoint.best_model_score)  # type: ignore[union-attr]
        return f"best by {monitor} = {score:.4f} (update {state['global_step']}, {Path(best).name})"

    @staticmethod
    def _log(trainer: pl.Trainer, figures: dict[str, Figure], evaluation: dict[str, Any]) -> None:
        metrics = {
            f"test/{name}/{condition}/{key}": value
            for name, conditions in evaluation.items()
            for condition, stats in conditions.items()
            for key, value in stats.items()
            if not math.isnan(value)
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                for name, figure in figures.items():
                    logger.experiment.add_figure(f"test/{name}", figure, trainer.global_step, close=False)
