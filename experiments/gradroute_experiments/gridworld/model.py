"""REINFORCE with a learned value baseline for the gridworld policies, as a LightningModule (Cloud et al., §4.3).

The data are rollouts from :class:`~gradroute_experiments.gridworld.data.GridworldEnvironment`
(one per step, on-policy). Loss per update, with ``N`` transitions, return ``G`` (training reward), advantage
``A = G - V.detach()`` and ``k`` the batch's ``keep`` (1 except for transitions data filtering drops)::

    - sum(k log pi(a|s) A) / N  +  value_coef sum(k (V - G)^2) / N  -  entropy_coef sum(k H(pi(.|s))) / N
    +  gate_coef * mean over seen transitions of BCE(gate logit, 1 if the episode reached the diamond)

the paper's REINFORCE loss (its filtered variant is "loss on the kept transitions times the kept fraction",
the same thing). The gate term exists only for a
:class:`~gradroute_experiments.gridworld.policy.MixturePolicy`.

Routing is not in here: with a :class:`~lightning_gradroute.GradientRoutingCallback` (see
``recipes/gridworld/routed_moe.yaml``) the same loss trains a routed mixture; without one, the baselines.

DDP: every rank's means are over the same number of transitions, and the gate loss divides by the global
count of seen transitions, so the DDP gradient equals one process's on all environments.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from gradroute_experiments.gridworld.data import ROUTING_LABELS, GridworldEnvironment
from gradroute_experiments.gridworld.env import Outcome
from gradroute_experiments.gridworld.evaluate import evaluate_policy, evaluated_policies, summarize
from gradroute_experiments.gridworld.policy import MixturePolicy, SingleExpertPolicy, ValueNetwork

__all__ = ["VAL_METRICS", "GridworldPolicyGradient"]

#: Logged validation metrics, per evaluated policy: ``val/<policy>/<metric>``.
VAL_METRICS = ("true_return", "diamond_rate", "ghost_rate")


class GridworldPolicyGradient(pl.LightningModule):
    """A gridworld policy and value baseline trained with REINFORCE on :class:`GridworldEnvironment` rollouts.

    The paper's methods differ in the policy, the data module's reward and filtering, and the routing:

    =================  ==========  ==========  =================  ==========================================
    method (recipe)    ``policy``  ``reward``  ``filter_unseen``  other
    =================  ==========  ==========  =================  ==========================================
    routed MoE         mixture     terminal    false              GradientRoutingCallback; report the diamond
                                                                  expert (gate set to 1)
    naive              single      naive       false
    data filtering     single      true        true
    oracle             single      true        false              oversight 1, ``p x`` as many updates
    naive + early      single      naive       false              EarlyStopping / best checkpoint on the
    stopping                                                      held-out true return
    =================  ==========  ==========  =================  ==========================================

    Args:
        policy: ``"mixture"`` (two experts, gate, shared head) or ``"single"`` (one expert and the head).
        grid_size: side of the grid; must equal the data module's.
        hidden_size: width of the experts, gate and value net (the paper: 256).
        lr: Adam learning rate (the paper: 5e-5, no weight decay).
        value_coef: weight of the value MSE (the paper: 0.5).
        entropy_coef: weight of the entropy bonus (the paper: 0.1).
        gate_coef: weight of the gate's BCE loss on seen transitions (the paper: 0.01); mixture only.
    """

    routing_labels = ROUTING_LABELS

    def __init__(
        self,
        policy: Literal["mixture", "single"] = "mixture",
        grid_size: int = 5,
        hidden_size: int = 256,
        lr: float = 5e-5,
        value_coef: float = 0.5,
        entropy_coef: float = 0.1,
        gate_coef: float = 0.01,
    ) -> None:
        super().__init__()
        if policy not in ("mixture", "single"):
            raise ValueError(f"GridworldPolicyGradient: policy must be 'mixture' or 'single', got {policy!r}")
        if lr <= 0:
            raise ValueError(f"GridworldPolicyGradient: lr must be > 0, got {lr!r}")
        for name, value in (("value_coef", value_coef), ("entropy_coef", entropy_coef), ("gate_coef", gate_coef)):
            if value < 0:
                raise ValueError(f"GridworldPolicyGradient: {name} must be >= 0, got {value!r}")
        self.save_hyperparameters()
        self.policy = (MixturePolicy if policy == "mixture" else SingleExpertPolicy)(grid_size, hidden_size)
        self.value = ValueNetwork(grid_size, hidden_size)
        # Per-rank counts of ended training episodes by Outcome, held-out episodes scored by validation, and the
        # validation results so far. Plain attributes, not buffers: DDP would overwrite buffers with rank 0's.
        self.episode_counts = torch.zeros(len(Outcome), dtype=torch.float64)
        self.holdout_episodes = 0.0
        #: One entry per validation: ``{"update": n, "<policy>": {metric: value}}`` (the learning curve).
        self.validation_curve: list[dict[str, Any]] = []

    @property
    def environment(self) -> GridworldEnvironment:
        """The trainer's :class:`GridworldEnvironment` data module."""
        data = self.trainer.datamodule
        if not isinstance(data, GridworldEnvironment):
            raise TypeError(
                f"GridworldPolicyGradient needs a GridworldEnvironment data module, got {type(data).__name__}"
            )
        return data

    @override
    def setup(self, stage: str) -> None:
        data = self.environment
        if data.hparams.grid_size != self.hparams.grid_size:
            raise ValueError(
                f"GridworldPolicyGradient: grid_size={self.hparams.grid_size} but the data module's is "
                f"{data.hparams.grid_size}; set both to the same"
            )
        if stage == "fit" and self.trainer.max_steps < 1:
            raise ValueError(
                "GridworldPolicyGradient: set trainer.max_steps, the number of policy updates (the training data "
                "is an endless stream of rollouts, so epochs never end)"
            )

    # ---------------------------------------------------------------------------------------------- training
    def global_count(self, mask: Tensor) -> Tensor:
        """``mask.sum()`` over all ranks divided by the world size (DDP's gradient averaging undoes the division)."""
        count = mask.sum().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="sum") / self.trainer.world_size
        return count

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The update's ``"loss"`` and its terms (module docstring), plus gate diagnostics, for a rollout batch."""
        hp = self.hparams
        out = self.policy(batch["observations"])
        distribution = torch.distributions.Categorical(logits=out.logits)
        log_probs = distribution.log_prob(batch["actions"])
        values = self.value(batch["observations"])
        returns, keep = batch["returns"], batch["keep"]
        n = len(returns)
        terms = {
            "policy_loss": -(keep * log_probs * (returns - values.detach())).sum() / n,
            "value_loss": (keep * (values - returns).pow(2)).sum() / n,
            "entropy": (keep * distribution.entropy()).sum() / n,
        }
        loss = terms["policy_loss"] + hp.value_coef * terms["value_loss"] - hp.entropy_coef * terms["entropy"]
        if out.gate_logit is not None:
            labels = batch["route_labels"]
            seen = labels != Outcome.NONE
            target = (labels == Outcome.SEEN_DIAMOND).float()
            bce = F.binary_cross_entropy_with_logits(out.gate_logit.squeeze(-1), target, reduction="none")
            terms["gate_loss"] = (bce * seen).sum() / self.global_count(seen).clamp_min(1.0)
            loss = loss + hp.gate_coef * terms["gate_loss"]
            gate = torch.sigmoid(out.gate_logit.detach().squeeze(-1))
            for value, name in enumerate(self.routing_labels):
                rows = labels == value
                terms[f"gate_p_{name}"] = (gate * rows).sum() / rows.sum().clamp_min(1)
        terms["loss"] = loss
        return terms

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        terms = self.compute_losses(batch)
        self.episode_counts = self.episode_counts.to(batch["ended"].device) + batch["ended"]
        labels = batch["route_labels"]
        metrics = {f"train/{name}": value.detach() for name, value in terms.items()}
        metrics["train/observed_return"] = batch["returns"].mean()
        metrics["train/true_return"] = batch["true_returns"].mean()
        metrics["train/kept_fraction"] = batch["keep"].mean()
        for value, name in enumerate(self.routing_labels):
            metrics[f"train/fraction_{name}"] = (labels == value).float().mean()
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(labels))
        return terms["loss"]

    def training_episode_counts(self) -> dict[str, float]:
        """Training episodes ended so far, by :class:`Outcome` name, summed over ranks (a collective under DDP)."""
        counts = self.episode_counts
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts.to(self.device), reduce_op="sum")
        return {outcome.name.lower(): float(c) for outcome, c in zip(Outcome, counts.tolist())}

    # -------------------------------------------------------------------------------------------- validation
    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """True return and diamond / ghost rates of every evaluated policy on the data module's held-out episodes."""
        data = self.environment
        entry: dict[str, Any] = {"update": self.global_step}
        for name, steer in evaluated_policies(self.policy).items():
            sums = evaluate_policy(
                self.policy, data.holdout_env(self.device), data.hparams.rollout_steps, data.hparams.discount, steer
            )
            if self.trainer.world_size > 1:
                sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            stats = summarize(sums)
            if name == "policy" and not self.trainer.sanity_checking:
                self.holdout_episodes += stats["episodes"]
            entry[name] = {key: stats[key] for key in VAL_METRICS}
            metrics = {f"val/{name}/{key}": stats[key] for key in VAL_METRICS}
            self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.validation_curve.append(entry)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
