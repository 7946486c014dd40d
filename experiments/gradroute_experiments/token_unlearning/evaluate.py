"""Evaluate token-routing unlearning (the paper's virology method): ablate, repair, retrain, measure absorption.

The model was trained with a concept's *tokens* routed to a block of MLP neurons (on positions that predict one
of them, the gradient reaches the other neurons of the routed layers only with a tiny negative weight). When
``fit`` ends, :class:`TokenUnlearningEvaluation`:

1. measures the held-out losses (``base``);
2. ablates the neurons (:func:`~gradroute_experiments.token_unlearning.ablation.ablate_neurons`: the
   whole range, every weight computing or reading them) and measures again (``post_ablation``);
3. runs a coherence fine-tune on retain stories, keeping its best step (``final``); the ablated neurons stay at 0;
4. for each :class:`RetrainingProtocol`, retrains the final model on each side separately, from the same weights:
   on ``retain_examples`` held-out retain stories (measuring the retain losses) and on ``forget_examples``
   held-out forget stories (measuring the forget losses), each as one batch, ``steps`` AdamW steps, several
   seeds (each draws its own examples); the lowest seed-averaged loss reached is what remains. A **symmetric**
   protocol gives both sides the same number of unique examples and steps; the paper's Table 1 compared retain
   recovered from 32 unique examples with forget retrained on 2 repeated ones, which favours unlearning.

Losses are token averages over the held-out sets: ``retain`` / ``forget`` over every real token of the retain /
forget stories, ``*_unrouted`` over every token except the routed ones (a proper masked mean; the reference code
multiplied the routed tokens' losses by 0 and still divided by all tokens), ``forget_routed`` over the routed
tokens in forget stories. When the data module holds concept tokens out of the routing
(``TinyStoriesDataModule(route_held_out=...)``), ``forget_held_out`` is over those tokens in forget stories and
``forget_other`` over the forget stories' tokens that are neither routed nor held out.

**Absorption** (the paper's question): did removing the neurons take more than the routed tokens? It is
``forget_unrouted`` minus its base value against ``retain_unrouted`` minus its base value, at every stage and
after retraining; a forget-side increase above the retain-side one means the neurons had absorbed the concept's
context, not only its tokens. With held-out concept tokens the question is sharper: ``held_out_minus_other``
is ``forget_held_out``'s increase minus ``forget_other``'s, so a positive value means removing the neurons took
concept tokens the routing never saw more than the text around them. The same recipe without routing is the
control: there the neurons hold whatever training put in them.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_gradroute.callback import GradientRoutingCallback, routing_callback_before
from lightning_gradroute.evaluation import coherence_finetune_on, retraining_attack
from gradroute_experiments.text.causal_lm import CausalLM, CausalLMEvaluation, token_mean_loss, weighted_token_losses
from gradroute_experiments.token_unlearning.ablation import ablate_neurons, ablated_weight_norm
from lightning_gradroute.targets import Target, Units, resolve_modules

__all__ = ["RetrainingProtocol", "TokenUnlearningEvaluation"]


@dataclass(frozen=True)
class RetrainingProtocol:
    """One retraining evaluation: both sides retrained from the same weights, each on its own examples.

    Args:
        name: the key in ``results.json``.
        retain_examples: held-out retain stories the retain side trains on (one batch).
        forget_examples: held-out forget stories the forget side trains on (one batch).
        steps: AdamW steps per side and seed.
    """

    name: str
    retain_examples: int
    forget_examples: int
    steps: int

    def __post_init__(self) -> None:
        for field in ("retain_examples", "forget_examples", "steps"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RetrainingProtocol {self.name!r}: {field} must be a positive int, got {value!r}")

    @property
    def symmetric(self) -> bool:
        return self.retain_examples == self.forget_examples


class TokenUnlearningEvaluation(CausalLMEvaluation):
    """Ablate routed neurons, coherence fine-tune, retrain symmetrically, measure absorption (module docstring).

    Needs a :class:`~gradroute_experiments.text.causal_lm.CausalLM` and a data module with ``splits``
    (``retain_val``, ``forget_val``, ``attack_pool``, ``retain_pool``, ``coherence_train``, ``coherence_val``),
    ``batches`` and ``route_token_ids``, such as a ``TinyStoriesDataModule(labels="tokens")``. Put it after the
    ``GradientRoutingCallback``.

    Example (what ``recipes/token_unlearning/food.yaml`` does)::

        TokenUnlearningEvaluation(
            ablate_modules="model.model.layers.[0-2].mlp", ablate_neurons="0:32", preset="qwen2_mlp",
            protocols=[RetrainingProtocol("symmetric", 16, 16, 20), RetrainingProtocol("paper", 32, 2, 20)],
        )

    Args:
        ablate_modules: the MLP modules whose neurons were routed (glob relative to the LightningModule).
        ablate_neurons: the routed neurons, as in the route (``"0:80"`` is neurons 0 to 79).
        preset: the MLP architecture (a key of ``MLP_LAYERS``: ``qwen2_mlp``, ``llama_mlp``, ``gpt_neo_mlp``...).
        coherence_steps: coherence fine-tune steps on the data module's ``coherence_train`` stories (one batch),
            keeping the best step on ``coherence_val`` (0: none).
        coherence_lr: its AdamW learning rate (betas (0.9, 0.95), weight decay 0.1).
        protocols: the retraining protocols to run.
        retrain_lr: AdamW learning rate of the retraining (weight decay 0.01).
        retrain_seeds: seeds per side and protocol; each draws its own examples from the pool.
        eval_batch_size: batch size of the held-out evaluations.
    """

    def __init__(
        self,
        ablate_modules: str,
        ablate_neurons: Units,
        preset: str,
        coherence_steps: int = 21,
        coherence_lr: float = 5e-4,
        protocols: Sequence[RetrainingProtocol] = (RetrainingProtocol("symmetric", 16, 16, 20),),
        retrain_lr: float = 5e-4,
        retrain_seeds: int = 3,
        eval_batch_size: int = 50,
    ) -> None:
        super().__init__()
        Target(ablate_modules)  # the pattern rules and errors of targets
        for name, value, minimum in (
            ("coherence_steps", coherence_steps, 0),
            ("retrain_seeds", retrain_seeds, 1),
            ("eval_batch_size", eval_batch_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"TokenUnlearningEvaluation: {name} must be an int >= {minimum}, got {value!r}")
        names = [p.name for p in protocols]
        if not protocols or len(set(names)) != len(names):
            raise ValueError(f"TokenUnlearningEvaluation: protocols need distinct names, got {names}")
        self.ablate_modules, self.ablate_neurons, self.preset = ablate_modules, ablate_neurons, preset
        self.coherence_steps, self.coherence_lr = coherence_steps, coherence_lr
        self.protocols = list(protocols)
        self.retrain_lr, self.retrain_seeds = retrain_lr, retrain_seeds
        self.eval_batch_size = eval_batch_size

    @override
    def check(self, trainer: pl.Trainer, pl_module: CausalLM) -> None:
        dm = trainer.datamodule
        if not getattr(dm, "route_token_ids", None) or not hasattr(dm, "batches"):
            raise ValueError("TokenUnlearningEvaluation: the data module must route a token set (labels='tokens')")
        routing_callback_before(trainer, self, "TokenUnlearningEvaluation")
        resolve_modules(pl_module, Target(self.ablate_modules), "ablate_modules")  # fail now on a bad pattern
        splits = dm.splits
        for protocol in self.protocols:
            for pool, need, what in (
                (splits.retain_pool, protocol.retain_examples, "retain_pool (num_retain_pool_stories)"),
                (splits.attack_pool, protocol.forget_examples, "attack_pool (num_attack_stories)"),
            ):
                if len(pool) < need and not trainer.fast_dev_run:
                    raise ValueError(
                        f"TokenUnlearningEvaluation: protocol {protocol.name!r} needs {need} stories of the data "
                        f"module's {what}, which has {len(pool)}"
                    )

    # ------------------------------------------------------------------ helpers
    def _stories(self, trainer: pl.Trainer, stories: list[list[int]]) -> list[list[int]]:
        """Under ``fast_dev_run`` every evaluation uses a few stories."""
        return stories[:4] if trainer.fast_dev_run else stories

    def _side_losses(self, trainer: pl.Trainer, model: nn.Module, side: str) -> dict[str, float]:
        dm = trainer.datamodule
        routed = torch.zeros(model.model.config.vocab_size)
        routed[dm.route_token_ids] = 1.0
        stories = self._stories(trainer, dm.splits.retain_val if side == "retain" else dm.splits.forget_val)
        tables = {side: torch.ones_like(routed), f"{side}_unrouted": 1 - routed}
        if side == "forget":
            tables["forget_routed"] = routed
            held_out_ids = getattr(dm, "held_out_token_ids", [])  # TinyStories' route_held_out; none elsewhere
            if held_out_ids:
                held_out = torch.zeros_like(routed)
                held_out[held_out_ids] = 1.0
                tables |= {"forget_held_out": held_out, "forget_other": 1 - routed - held_out}
        return weighted_token_losses(model, dm.batches(stories, self.eval_batch_size), tables)

    def _losses(self, trainer: pl.Trainer, model: nn.Module) -> dict[str, float]:
        return self._side_losses(trainer, model, "retain") | self._side_losses(trainer, model, "forget")

    def _retrain(self, trainer: pl.Trainer, model: nn.Module, protocol: RetrainingProtocol) -> dict[str, Any]:
        dm = trainer.datamodule
        out: dict[str, Any] = {"symmetric": protocol.symmetric, "steps": protocol.steps}
        for side, pool, examples in (
            ("retain", dm.splits.retain_pool, protocol.retain_examples),
            ("forget", dm.splits.attack_pool, protocol.forget_examples),
        ):
            pool = self._stories(trainer, pool)
            size = min(examples, len(pool))

            def batch(seed: int, pool: list[list[int]] = pool, size: int = size) -> dict[str, Tensor]:
                return next(dm.batches(random.Random(seed).sample(pool, size), size, forget=side == "forget"))

            attack = retraining_attack(
                model,
                token_mean_loss,
                batch,
                eval_fn=lambda m, side=side: self._side_losses(trainer, m, side),
                steps=1 if trainer.fast_dev_run else protocol.steps,
                lr=self.retrain_lr,
                seeds=range(1 if trainer.fast_dev_run else self.retrain_seeds),
                metric=side,
            )
            out[side] = {
                "examples": size,
                "lowest": {key: min(curve) for key, curve in attack.curves.items()},
                "curves": attack.curves,
            }
        return out

    # -------------------------------------------------------------------- stage
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        assert isinstance(pl_module, CausalLM)
        dm = trainer.datamodule
        started = time.perf_counter()
        results: dict[str, Any] = {"base": self._losses(trainer, pl_module)}
        ablation = (pl_module, self.ablate_modules, self.ablate_neurons, self.preset)
        results["ablated_neurons"] = ablate_neurons(*ablation)
        results["post_ablation"] = self._losses(trainer, pl_module)
        quick = bool(trainer.fast_dev_run)
        steps = min(self.coherence_steps, 1) if quick else self.coherence_steps
        if steps:
            coherence = coherence_finetune_on(
                pl_module, dm, token_mean_loss, steps, self.coherence_lr, self.eval_batch_size, 4 if quick else None
            )
            results["coherence"] = coherence.to_dict()
        results["final"] = self._losses(trainer, pl_module)
        results["ablated_weights_max_after_coherence"] = ablated_weight_norm(*ablation)
        results["retraining"] = {p.name: self._retrain(trainer, pl_module, p) for p in self.protocols}
        results["absorption"] = self._absorption(results)
        results.update(
            routed=any(isinstance(cb, GradientRoutingCallback) for cb in trainer.callbacks),
            protocols=[asdict(p) for p in self.protocols],
            data=dm.summary(),
            parameters=sum(p.numel() for p in pl_module.parameters()),
            steps_trained=trainer.global_step,
            evaluation_seconds=round(time.perf_counter() - started, 1),
        )
        path = self.write_results(results)
        rank_zero_info(f"token-routing unlearning results: {path}\n{json.dumps(results['absorption'], indent=1)}")

    @staticmethod
    def _absorption(results: dict[str, Any]) -> dict[str, Any]:
        """Increase over ``base`` of each loss, per stage and after each protocol's retraining (lowest reached)."""
        base = results["base"]

        def increase(losses: dict[str, float]) -> dict[str, float]:
            rise = {f"{key}_increase": round(value - base[key], 4) for key, value in losses.items()}
            for difference, (a, b) in {
                "forget_minus_retain_unrouted": ("forget_unrouted", "retain_unrouted"),
                "held_out_minus_other": ("forget_held_out", "forget_other"),
            }.items():
                if f"{a}_increase" in rise and f"{b}_increase" in rise:
                    rise[difference] = round(rise[f"{a}_increase"] - rise[f"{b}_increase"], 4)
            return rise

        out = {stage: increase(results[stage]) for stage in ("post_ablation", "final")}
        for name, retrained in results["retraining"].items():
            out[f"retrained_{name}"] = increase(retrained["retain"]["lowest"] | retrained["forget"]["lowest"])
        return out
