"""Scalable oversight in a gridworld with a gradient-routed mixture-of-experts policy (Cloud et al. 2024, §4.3).

``recipes/gridworld`` has the commands; the pieces are: :class:`GridWorld` (the batched environment),
:func:`collect_rollout` and friends (rollouts, returns, episode labels), :class:`MixturePolicy` /
:class:`SingleExpertPolicy` / :class:`ValueNetwork` (the networks), :class:`GridworldEnvironment` (rollouts
as a LightningDataModule), :class:`GridworldPolicyGradient` (REINFORCE with a value baseline as a
LightningModule) and :class:`GridworldReport` (the evaluation).
"""

from gradroute_experiments.gridworld.data import ROUTING_LABELS, GridworldEnvironment
from gradroute_experiments.gridworld.env import GridWorld, Outcome, StepResult, counter_uniform
from gradroute_experiments.gridworld.evaluate import (
    CONDITIONS,
    evaluate_policy,
    evaluated_policies,
    summarize,
)
from gradroute_experiments.gridworld.model import GridworldPolicyGradient
from gradroute_experiments.gridworld.policy import (
    MixturePolicy,
    PolicyOutput,
    SingleExpertPolicy,
    ValueNetwork,
)
from gradroute_experiments.gridworld.report import GridworldReport
from gradroute_experiments.gridworld.rollout import (
    Rollout,
    collect_rollout,
    discounted_returns,
    episode_outcomes,
    rewards,
)

__all__ = [
    "CONDITIONS",
    "GridWorld",
    "GridworldEnvironment",
    "GridworldPolicyGradient",
    "GridworldReport",
    "MixturePolicy",
    "Outcome",
    "PolicyOutput",
    "ROUTING_LABELS",
    "Rollout",
    "SingleExpertPolicy",
    "StepResult",
    "ValueNetwork",
    "collect_rollout",
    "counter_uniform",
    "discounted_returns",
    "episode_outcomes",
    "evaluate_policy",
    "evaluated_policies",
    "rewards",
    "summarize",
]
