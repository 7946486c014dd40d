"""Tune the RMU baseline on a held-out split, so that the comparison has an RMU that does something.

At the recipes' scale RMU with the paper's coefficients scaled to the model changes no loss by more than 0.003
nats (``benchmarks/results/tinystories_sweep.md``): there is no working RMU to compare with. :class:`RMUTuning`
runs a grid of :class:`~gradroute_experiments.tinystories.rmu.RMU` settings on copies of the trained (plain) model
and measures each on stories the final comparison never scores: the forget stories of the attack pool and the
retain stories held out for the coherence fine-tune's validation (both held out from training). The test sets of
:class:`~gradroute_experiments.tinystories.evaluate.UnlearningEvaluation` are not read.

The chosen setting (:func:`choose`) is the most *selective* one: the largest forget-loss increase minus retain-loss
increase, among those whose retain-loss increase is at most ``retain_budget`` nats. (A first rule, the largest
forget increase within 0.1 nats of retain cost, picked a setting that raised both losses alike, +0.111 and +0.097:
RMU as damage, not unlearning; the selective settings cost 0.24 nats or more. The rule was changed after that grid,
which only the tuning split had scored.) ``rmu_tuning.json`` in the log dir holds every
setting's numbers, the base losses and the choice; ``benchmarks/rmu_tuning.py`` runs it
(``recipes/tinystories/rmu_tuning.yaml`` on top of ``base.yaml``).
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lightning_gradroute.evaluation import mean_loss
from gradroute_experiments.text.causal_lm import token_mean_loss
from gradroute_experiments.text.story_module import StoryDataModule
from gradroute_experiments.tinystories.evaluate import rmu_sets
from gradroute_experiments.tinystories.rmu import RMU

__all__ = ["RMUTuning", "choose"]

#: How :func:`choose` picks, in words (for the report).
RULE = "largest forget increase minus retain increase, among settings whose retain increase is at most {budget} nats"


def choose(rows: list[dict[str, Any]], retain_budget: float) -> dict[str, Any] | None:
    """The most selective setting of a tuning grid within the retain budget (None: none within it)."""
    allowed = [row for row in rows if row["retain_increase"] <= retain_budget]
    if not allowed:
        return None
    return max(allowed, key=lambda row: (row["forget_increase"] - row["retain_increase"], row["forget_increase"]))


class RMUTuning(pl.Callback):
    """At the end of ``fit``, run RMU for every combination of the grid on a copy of the model; write the results.

    Example (what ``benchmarks/rmu_tuning.py`` runs)::

        gradroute fit --config recipes/tinystories/base.yaml --config recipes/tinystories/rmu_tuning.yaml

    Under ``fast_dev_run`` only the grid's first setting runs, for one step.

    Args:
        layers / steps / steering_coefs / alphas / lrs: the grid (every combination runs). A steering
            coefficient of None is the default scaled to the model (``100 * sqrt(d_model / 512)``).
        retain_budget: the largest retain-loss increase (nats, on the tuning split) a chosen setting may cost.
        results_file: file name under the trainer's log dir.
    """

    def __init__(
        self,
        layers: list[int] = [0, 1, 2],  # noqa: B006 (jsonargparse reads the defaults; never mutated)
        steps: list[int] = [80, 320],  # noqa: B006
        steering_coefs: list[float | None] = [None, 400.0],  # noqa: B006
        alphas: list[float] = [200.0, 20.0, 2.0],  # noqa: B006
        lrs: list[float] = [5e-3, 2e-2],  # noqa: B006
        retain_budget: float = 0.5,
        results_file: str = "rmu_tuning.json",
    ) -> None:
        grid = {"layers": layers, "steps": steps, "steering_coefs": steering_coefs, "alphas": alphas, "lrs": lrs}
        empty = [name for name, values in grid.items() if not values]
        if empty:
            raise ValueError(f"RMUTuning: every grid axis needs at least one value; empty: {empty}")
        if retain_budget < 0:
            raise ValueError(f"RMUTuning: retain_budget must be >= 0 nats, got {retain_budget}")
        # Construct each setting now, so that a bad value fails before training, with RMU's own message.
        self.settings = [
            RMU(layer=layer, steps=n, steering_coef=coef, alpha=alpha, lr=lr)
            for layer, n, coef, alpha, lr in itertools.product(layers, steps, steering_coefs, alphas, lrs)
        ]
        self.retain_budget = retain_budget
        self.results_file = results_file

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, StoryDataModule) or dm.splits is None:
            raise ValueError("RMUTuning: fit with a StoryDataModule such as TinyStoriesDataModule")
        splits = dm.splits
        tuning = {
            "forget": list(dm.batches(splits.attack_pool, forget=True)),
            "retain": list(dm.batches(splits.coherence_val)),
        }
        forget_batches, retain_batches = rmu_sets(dm, "RMUTuning")

        def losses(module: pl.LightningModule) -> dict[str, float]:
            return {name: mean_loss(module, batches, token_mean_loss) for name, batches in tuning.items()}

        base = losses(pl_module)
        settings = self.settings
        if trainer.fast_dev_run:  # a smoke test of the whole path: one setting, one step
            settings = [copy.copy(settings[0])]
            settings[0].steps = 1
        rows = []
        for rmu in settings:
            candidate = copy.deepcopy(pl_module)
            log = rmu(candidate.model, forget_batches, retain_batches)
            after = losses(candidate)
            rows.append(
                {
                    **log,
                    "forget": after["forget"],
                    "retain": after["retain"],
                    "forget_increase": after["forget"] - base["forget"],
                    "retain_increase": after["retain"] - base["retain"],
                }
            )
            del candidate
        chosen = choose(rows, self.retain_budget)
        results = {
            "tuning_split": {
                "forget": f"attack pool ({len(splits.attack_pool)} forget stories held out from training)",
                "retain": f"coherence validation ({len(splits.coherence_val)} retain stories held out from training)",
            },
            "retain_budget": self.retain_budget,
            "rule": RULE.format(budget=self.retain_budget),
            "base": base,
            "settings": rows,
            "chosen": chosen,
        }
        path = Path(trainer.log_dir or trainer.default_root_dir) / self.results_file  # log_dir: on every rank
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2))
