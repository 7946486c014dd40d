"""The paper's gridworld networks: a two-expert mixture policy with a gate, a single-expert policy, a value net.

:class:`MixturePolicy` (the paper's ``RoutedPolicyNetwork``)::

    diamond_expert(obs) ─┐
                         ├─ p * diamond + (1 - p) * ghost ── head ── action logits
    ghost_expert(obs) ───┘        p = gate_prob(gate(obs))

The model routes nothing itself; a :class:`~lightning_gradroute.GradientRoutingCallback` routes the policy
gradient at three of its module outputs (``recipes/gridworld/routed_moe.yaml``):

* ``diamond_expert`` and ``ghost_expert`` (their 256-d outputs): an expert's parameters learn only through its
  output, so a zero weight there for a label means "this label's episodes do not train this expert";
* ``gate_prob`` (the gate's probability *as the mixture uses it*): zero for seen episodes, so their policy
  gradient does not train the gate. The gate's own loss reads the logit *before* ``gate_prob``, so seen
  episodes still train the gate through that supervised loss, as in the paper.

Steering: ``forward(obs, steer="diamond")`` sets the gate to 1 (the mixture is then exactly the diamond
expert, ``1 * d + 0 * g == d``), ``steer="ghost"`` to 0.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["STEERING", "MixturePolicy", "PolicyOutput", "SingleExpertPolicy", "ValueNetwork", "expert", "zero_biases"]

NUM_ACTIONS = 4
Steer = Literal["diamond", "ghost"]
#: Gate settings that steer a mixture to one expert.
STEERING: dict[str, float] = {"diamond": 1.0, "ghost": 0.0}


class PolicyOutput(NamedTuple):
    """Action logits ``(B, 4)`` and, for a mixture, the gate's logit ``(B, 1)`` (``None`` otherwise)."""

    logits: Tensor
    gate_logit: Tensor | None


def expert(observation_size: int, hidden_size: int) -> nn.Sequential:
    """Flatten, then a two-layer ReLU MLP with ReLU also on its output (the paper's expert)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(observation_size, hidden_size),
        nn.ReLU(),
        nn.Linear(hidden_size, hidden_size),
        nn.ReLU(),
    )


def zero_biases(module: nn.Module) -> None:
    """Zero every bias (the paper's ``reset_params``; weights keep PyTorch's default initialisation)."""
    for layer in module.modules():
        bias = getattr(layer, "bias", None)
        if isinstance(bias, nn.Parameter):
            nn.init.zeros_(bias)


def _check_sizes(owner: str, grid_size: int, hidden_size: int) -> None:
    for name, value, low in (("grid_size", grid_size, 2), ("hidden_size", hidden_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{owner}: {name} must be an int >= {low}, got {value!r}")


class MixturePolicy(nn.Module):
    """Diamond expert, ghost expert, gate, shared head; see the module docstring.

    Args:
        grid_size: side of the grid (observations are ``(B, 4, grid_size, grid_size)``).
        hidden_size: width of the experts and the gate (the paper: 256).
    """

    def __init__(self, grid_size: int = 5, hidden_size: int = 256) -> None:
        super().__init__()
        _check_sizes("MixturePolicy", grid_size, hidden_size)
        observation_size = 4 * grid_size * grid_size
        self.diamond_expert = expert(observation_size, hidden_size)
        self.ghost_expert = expert(observation_size, hidden_size)
        self.gate = nn.Sequential(
            nn.Conv2d(4, 4, kernel_size=1),
            nn.Flatten(),
            nn.Linear(observation_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, 1),
        )
        self.gate_prob = nn.Sigmoid()
        self.head = nn.Linear(hidden_size, NUM_ACTIONS)
        zero_biases(self)

    def forward(self, observations: Tensor, steer: Steer | None = None) -> PolicyOutput:
        """Action logits of the mixture, or of one expert alone with ``steer``."""
        diamond = self.diamond_expert(observations)
        ghost = self.ghost_expert(observations)
        gate_logit = self.gate(observations)
        if steer is None:
            p = self.gate_prob(gate_logit)
        elif steer in STEERING:
            p = torch.full_like(gate_logit, STEERING[steer])
        else:
            raise ValueError(f"MixturePolicy: steer must be one of {sorted(STEERING)} or None, got {steer!r}")
        return PolicyOutput(self.head(p * diamond + (1 - p) * ghost), gate_logit)


class SingleExpertPolicy(nn.Module):
    """One expert and the head: the paper's baseline policy (identity -> diamond expert -> head)."""

    def __init__(self, grid_size: int = 5, hidden_size: int = 256) -> None:
        super().__init__()
        _check_sizes("SingleExpertPolicy", grid_size, hidden_size)
        self.expert = expert(4 * grid_size * grid_size, hidden_size)
        self.head = nn.Linear(hidden_size, NUM_ACTIONS)
        zero_biases(self)

    def forward(self, observations: Tensor, steer: None = None) -> PolicyOutput:
        if steer is not None:
            raise ValueError(f"SingleExpertPolicy has no experts to steer to, got steer={steer!r}")
        return PolicyOutput(self.head(self.expert(observations)), None)


class ValueNetwork(nn.Module):
    """The paper's value baseline: 1x1 conv to 16 planes, then three linear layers with no nonlinearity."""

    def __init__(self, grid_size: int = 5, hidden_size: int = 256) -> None:
        super().__init__()
        _check_sizes("ValueNetwork", grid_size, hidden_size)
        self.net = nn.Sequential(
            nn.Conv2d(4, 16, kernel_size=1),
            nn.Flatten(),
            nn.Linear(16 * grid_size * grid_size, hidden_size),
            nn.Linear(hidden_size, 32),
            nn.Linear(32, 1),
        )
        zero_biases(self)

    def forward(self, observations: Tensor) -> Tensor:
        """State values ``(B,)``."""
        return self.net(observations).squeeze(-1)
