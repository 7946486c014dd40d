"""Rollouts of a policy in a :class:`GridWorld`: transitions, rewards, discounted returns and episode labels.

A rollout is ``steps`` consecutive steps of every environment (the paper: 32 steps of 512 environments per
update). Returns are discounted within the rollout and reset at episode ends; an episode still running when
the rollout stops is not bootstrapped (its transitions return 0 beyond the rollout), as in the paper.

Every transition also gets the :class:`~gradroute_experiments.gridworld.env.Outcome` of the
episode it belongs to, propagated backward from the episode's end; transitions of an episode that has not
ended by the end of the rollout get ``Outcome.NONE``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from gradroute_experiments.gridworld.env import GridWorld

__all__ = [
    "REWARDS",
    "Reward",
    "Rollout",
    "collect_rollout",
    "discounted_returns",
    "episode_outcomes",
    "rewards",
    "sample_actions",
]

#: Reward functions, on the step where an episode ends (every other step pays 0):
#:
#: * ``"ground_truth"``: +1 diamond, -1 ghost (the ground truth; evaluation, the oracle, data filtering);
#: * ``"naive"``: +1 diamond, +1 ghost unless the ghost episode is seen, then -1 (what a naive learner gets
#:   from an overseer who only catches seen ghosts);
#: * ``"terminal"``: +1 for reaching either (the routed mixture's reward: its labels say which one).
Reward = Literal["ground_truth", "naive", "terminal"]
_REWARD_TABLES = {  # indexed by Outcome: NONE, SEEN_DIAMOND, SEEN_GHOST, UNSEEN_DIAMOND, UNSEEN_GHOST
    "ground_truth": (0, 1, -1, 1, -1),
    "naive": (0, 1, -1, 1, 1),
    "terminal": (0, 1, 1, 1, 1),
}
REWARDS: tuple[str, ...] = tuple(_REWARD_TABLES)


@dataclass(frozen=True)
class Rollout:
    """``steps`` steps of ``num_envs`` environments; every field is ``(steps, num_envs, ...)``.

    ``observations[t]`` is what the policy saw before choosing ``actions[t]``; ``outcomes[t]`` is the
    :class:`Outcome` of an episode that ended on step ``t`` (``NONE`` elsewhere, and for timeouts);
    ``episode_lengths[t]`` its number of moves (0 where no episode ended).
    """

    observations: Tensor
    actions: Tensor
    done: Tensor
    outcomes: Tensor
    episode_lengths: Tensor

    @property
    def steps(self) -> int:
        return self.actions.shape[0]


def sample_actions(logits: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF sampling of one action per row of ``logits`` from the given uniforms in ``[0, 1)``."""
    cumulative = torch.softmax(logits.double(), dim=-1).cumsum(-1)
    return (cumulative < uniforms.unsqueeze(-1)).sum(-1).clamp_max(logits.shape[-1] - 1)


@torch.no_grad()
def collect_rollout(env: GridWorld, policy_logits: Callable[[Tensor], Tensor], steps: int) -> Rollout:
    """Run ``steps`` steps of ``env`` with actions sampled from ``policy_logits(observations)``.

    Actions are drawn with the environment's counter-based uniforms, so a rollout is a pure function of the
    policy, the environment's seed and its environment indices (see :mod:`.env`).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"collect_rollout: steps must be a positive int, got {steps!r}")
    observations, actions, done, outcomes, lengths = [], [], [], [], []
    for _ in range(steps):
        obs = env.observe()
        action = sample_actions(policy_logits(obs), env.action_uniforms())
        result = env.step(action)
        observations.append(obs)
        actions.append(action)
        done.append(result.done)
        outcomes.append(result.outcome())
        lengths.append(result.episode_length)
    stack = torch.stack
    return Rollout(stack(observations), stack(actions), stack(done), stack(outcomes), stack(lengths))


def rewards(outcomes: Tensor, kind: Reward) -> Tensor:
    """Per-step float32 rewards from episode-end ``outcomes`` (:class:`Outcome` values) under ``kind``."""
    if kind not in _REWARD_TABLES:
        raise ValueError(f"rewards: kind must be one of {REWARDS}, got {kind!r}")
    table = torch.tensor(_REWARD_TABLES[kind], dtype=torch.float32, device=outcomes.device)
    return table[outcomes]


def discounted_returns(step_rewards: Tensor, done: Tensor, discount: float) -> Tensor:
    """``G_t = r_t + discount * G_{t+1}``, with ``G_{t+1}`` dropped where an episode ended at ``t``.

    Both tensors are ``(steps, num_envs)``; the last step's return is its reward (no bootstrapping).
    """
    returns = step_rewards.clone()
    for t in range(returns.shape[0] - 2, -1, -1):
        returns[t] += discount * returns[t + 1] * (~done[t])
    return returns


def episode_outcomes(rollout: Rollout) -> Tensor:
    """The outcome of the episode each transition belongs to, ``(steps, num_envs)`` int64.

    Propagated backward from each episode's last step; an episode unfinished at the rollout's end is
    ``Outcome.NONE``.
    """
    labels = rollout.outcomes.clone()  # NONE wherever no episode ended, so also on an unfinished last step
    for t in range(labels.shape[0] - 2, -1, -1):
        labels[t] = torch.where(rollout.done[t], labels[t], labels[t + 1])
    return labels
