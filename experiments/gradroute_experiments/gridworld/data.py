"""The gridworld as a LightningDataModule: every training batch is a fresh rollout of the policy being trained.

The train dataloader only ticks; :meth:`GridworldEnvironment.on_after_batch_transfer` replaces each tick by a
rollout of ``rollout_steps`` steps of this rank's environments, collected with the LightningModule's current
``policy`` on its device right before the training step (so every batch is exactly on-policy; a prefetching
dataset would lag one update behind). The batch carries one routing label per transition under
``"route_labels"``: the outcome of its episode as the overseer saw it (:data:`ROUTING_LABELS`). A
:class:`~lightning_gradroute.GradientRoutingCallback` reads them in ``on_train_batch_start`` and routes that
step's backward pass.

The data module also owns what defines the data: the oversight level, the training reward, data filtering,
the discount, and the held-out and test environments the module and the report evaluate on.

DDP: each rank runs ``num_envs / world_size`` of the environments with their global indices, so (see
:mod:`.env`) the ranks together play exactly the episodes one process with ``num_envs`` environments plays.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from gradroute_experiments.gridworld.env import GridWorld, Outcome
from gradroute_experiments.gridworld.rollout import (
    REWARDS,
    Reward,
    collect_rollout,
    discounted_returns,
    episode_outcomes,
    rewards,
)

__all__ = ["ROUTING_LABELS", "GridworldEnvironment"]

#: Names of the routing labels in ``batch["route_labels"]``: the first three :class:`Outcome` values. ``unseen``
#: covers episodes nobody saw end, timeouts and episodes still running when the rollout stopped.
ROUTING_LABELS = ("unseen", "seen_diamond", "seen_ghost")
#: Seeds of the held-out (validation) and test environments, relative to the training ``env_seed``.
_HOLDOUT_SEED_OFFSET = 1
_TEST_SEED_OFFSET = 2


class _Ticks(IterableDataset):
    """``count`` placeholder items (forever when ``None``); iterable, so DDP injects no sampler."""

    def __init__(self, count: int | None = None) -> None:
        self.count = count

    def __iter__(self) -> Iterator[int]:
        tick = 0
        while self.count is None or tick < self.count:
            yield tick
            tick += 1


class GridworldEnvironment(pl.LightningDataModule):
    """Rollouts of the trained module's ``policy`` in batched gridworlds, one per training step.

    Example::

        data = GridworldEnvironment(oversight_prob=0.05, reward="terminal")
        pl.Trainer(max_steps=20_000, callbacks=[routing]).fit(GridworldPolicyGradient(), datamodule=data)

    Args:
        oversight_prob: probability that each terminal cell of an episode is overseen.
        reward: the training reward (see :data:`~gradroute_experiments.gridworld.rollout.Reward`).
        filter_unseen: data filtering: transitions of episodes that ended unseen at the diamond or the ghost get
            ``keep = 0`` (the module drops them from every loss term).
        num_envs: environments per update, over all ranks (the paper: 512).
        rollout_steps: steps per environment per update (the paper: 32).
        grid_size: side of the grid (the paper: 5).
        max_episode_steps: moves after which an episode times out.
        discount: return discount (the paper: 0.97).
        eval_envs: environments of each validation rollout, over all ranks: held-out episodes at the training
            oversight level, scored with the true reward (what early stopping monitors).
        test_envs: environments of each final evaluation rollout (:class:`GridworldReport`, rank 0).
        env_seed: seed of the environments' counter-based generator; ``None`` draws one from torch's global
            generator (so ``seed_everything`` fixes it) and records it in ``hparams``.
    """

    def __init__(
        self,
        oversight_prob: float = 0.1,
        reward: Reward = "terminal",
        filter_unseen: bool = False,
        num_envs: int = 512,
        rollout_steps: int = 32,
        grid_size: int = 5,
        max_episode_steps: int = 32,
        discount: float = 0.97,
        eval_envs: int = 512,
        test_envs: int = 2048,
        env_seed: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= oversight_prob <= 1.0:
            raise ValueError(f"GridworldEnvironment: oversight_prob must be in [0, 1], got {oversight_prob!r}")
        if reward not in REWARDS:
            raise ValueError(f"GridworldEnvironment: reward must be one of {REWARDS}, got {reward!r}")
        for name, value, low in (
            ("num_envs", num_envs, 1),
            ("rollout_steps", rollout_steps, 1),
            ("grid_size", grid_size, 2),
            ("max_episode_steps", max_episode_steps, 1),
            ("eval_envs", eval_envs, 1),
            ("test_envs", test_envs, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"GridworldEnvironment: {name} must be an int >= {low}, got {value!r}")
        if not 0.0 <= discount <= 1.0:
            raise ValueError(f"GridworldEnvironment: discount must be in [0, 1], got {discount!r}")
        self.save_hyperparameters()
        if env_seed is None:  # recorded, so a checkpoint's hparams say which episodes it trained on
            self.hparams.env_seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self.train_env: GridWorld | None = None

    # ------------------------------------------------------------------------------------------ environments
    def make_env(self, num_envs: int, seed: int, oversight_prob: float, device: torch.device) -> GridWorld:
        """This rank's share of ``num_envs`` environments (with their global indices)."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if num_envs % world:
            raise ValueError(
                f"GridworldEnvironment: {num_envs} environments cannot be split evenly over {world} processes"
            )
        local = num_envs // world
        hp = self.hparams
        return GridWorld(local, hp.grid_size, hp.max_episode_steps, oversight_prob, seed, rank * local, device)

    def holdout_env(self, device: torch.device) -> GridWorld:
        """Fresh held-out environments (this rank's share of ``eval_envs``) at the training oversight level.

        Always the same seed: successive validations score the same episode starts.
        """
        hp = self.hparams
        return self.make_env(hp.eval_envs, hp.env_seed + _HOLDOUT_SEED_OFFSET, hp.oversight_prob, device)

    def test_env(self, oversight_prob: float, repeat: int, device: torch.device) -> GridWorld:
        """``test_envs`` fresh environments for a final evaluation, all in this process; ``repeat`` varies the seed."""
        hp = self.hparams
        seed = hp.env_seed + _TEST_SEED_OFFSET + 1000 * repeat
        return GridWorld(hp.test_envs, hp.grid_size, hp.max_episode_steps, oversight_prob, seed, device=device)

    @override
    def setup(self, stage: str) -> None:
        hp = self.hparams
        for name in ("num_envs", "eval_envs"):
            if hp[name] % self.trainer.world_size:
                raise ValueError(
                    f"GridworldEnvironment: {name}={hp[name]} is not divisible by the {self.trainer.world_size} "
                    "processes"
                )

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Ticks(), batch_size=None)

    @override
    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Ticks(1), batch_size=None)

    # ------------------------------------------------------------------------------------------------ rollouts
    def rollout_batch(self, policy: nn.Module, env: GridWorld) -> dict[str, Tensor]:
        """A rollout of ``policy`` in ``env`` (stepped in place), flattened to transitions.

        Keys, one row per transition: ``observations`` ``(N, 4, S, S)``, ``actions``, ``returns`` (training
        reward), ``true_returns``, ``route_labels`` (index into :data:`ROUTING_LABELS`), ``keep`` (0 for
        transitions data filtering drops), ``episode_outcomes`` (the :class:`Outcome` of each transition's
        episode); and ``ended``: counts by outcome of the episodes that ended during the rollout, ``(5,)``.
        """
        hp = self.hparams
        rollout = collect_rollout(env, lambda obs: policy(obs).logits, hp.rollout_steps)
        outcomes = episode_outcomes(rollout)
        unseen_end = (outcomes == Outcome.UNSEEN_DIAMOND) | (outcomes == Outcome.UNSEEN_GHOST)
        keep = ~unseen_end if hp.filter_unseen else torch.ones_like(unseen_end)
        batch = {
            "observations": rollout.observations,
            "actions": rollout.actions,
            "returns": discounted_returns(rewards(rollout.outcomes, hp.reward), rollout.done, hp.discount),
            "true_returns": discounted_returns(rewards(rollout.outcomes, "ground_truth"), rollout.done, hp.discount),
            "route_labels": torch.where(unseen_end, Outcome.NONE.value, outcomes),
            "keep": keep.float(),
            "episode_outcomes": outcomes,
        }
        flat = {key: value.flatten(0, 1) for key, value in batch.items()}
        flat["ended"] = torch.bincount(rollout.outcomes[rollout.done], minlength=len(Outcome)).double()
        return flat

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return batch  # validation ticks: the module evaluates on holdout_env()
        module = trainer.lightning_module
        if self.train_env is None:
            hp = self.hparams
            self.train_env = self.make_env(hp.num_envs, hp.env_seed, hp.oversight_prob, module.device)
        return self.rollout_batch(module.policy, self.train_env)

    @override
    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self.train_env = None  # a later fit starts from fresh environments
