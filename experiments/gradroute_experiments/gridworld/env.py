"""A batched gridworld with a diamond, a ghost and per-episode oversight (Cloud et al. 2024, §4.3).

Every environment is a ``size x size`` grid holding the agent, a ghost and a diamond on three distinct cells.
The agent moves up, right, down or left (moves into a wall leave it in place). An episode ends when the agent
steps onto the diamond or the ghost, or after ``max_episode_steps`` moves; the environment then resets itself
at once (a *continuing* environment, so every step of a rollout is a real transition).

**Oversight.** At reset the ghost's cell and the diamond's cell are each overseen, independently, with
probability ``oversight_prob``; no other cell is. The agent sees which cells are overseen (the fourth
observation plane). An episode is *seen* when the cell it ended on is overseen: only then does the overseer
learn whether the agent reached the diamond or the ghost.

**Randomness.** Resets and action sampling draw from a counter-based generator: environment ``i`` of the
*global* batch uses ``hash(seed, i, what, counter)``, where the counter is its episode number (resets) or its
step number (actions). So an environment's trajectory under a given policy does not depend on how many
environments run beside it, on which device, or how they are split across DDP ranks (``first_env``): two
processes with 256 environments each produce exactly the episodes one process with 512 produces.

Everything is a tensor operation over all environments at once (no per-environment Python loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

__all__ = ["ACTION_NAMES", "GridWorld", "Outcome", "StepResult", "counter_uniform", "keyed_uniform", "stream_keys"]

#: Actions in order: row and column offsets of up, right, down, left.
ACTION_NAMES = ("up", "right", "down", "left")
_ROW_STEP = (-1, 0, 1, 0)
_COL_STEP = (0, 1, 0, -1)
#: Observation planes.
AGENT, GHOST, DIAMOND, OVERSIGHT = range(4)

_MASK32 = 0xFFFFFFFF


class Outcome(IntEnum):
    """How an episode ended, as the overseer and the ground truth see it.

    ``NONE`` is a timeout, or (in a rollout) an episode that had not ended when the rollout stopped. The first
    three values are the routing labels of the gridworld recipes: a seen diamond or ghost episode is
    routed to that expert, everything else to both.
    """

    NONE = 0
    SEEN_DIAMOND = 1
    SEEN_GHOST = 2
    UNSEEN_DIAMOND = 3
    UNSEEN_GHOST = 4


class _Stream(IntEnum):
    """Independent random streams of one environment (the first five are drawn together at every reset)."""

    AGENT_CELL = 0
    GHOST_CELL = 1
    DIAMOND_CELL = 2
    GHOST_OVERSEEN = 3
    DIAMOND_OVERSEEN = 4
    ACTION = 5


_RESET_STREAMS = slice(_Stream.AGENT_CELL, _Stream.DIAMOND_OVERSEEN + 1)


def _mul32(x: Tensor, constant: int) -> Tensor:
    """``(x * constant) mod 2**32`` for int64 ``x`` in ``[0, 2**32)``, with no int64 overflow on the way."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash with good avalanche (Wellons' "lowbias32"), on int64 tensors in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_keys(seed: int, env_ids: Tensor, streams: Tensor) -> Tensor:
    """Per-environment, per-stream keys ``(len(env_ids), len(streams))`` of the counter-based generator."""
    key = _mix32(torch.full_like(env_ids, seed & _MASK32))
    key = _mix32(key ^ (env_ids & _MASK32))
    return _mix32(key.unsqueeze(-1) ^ streams)


def keyed_uniform(keys: Tensor, counters: Tensor) -> Tensor:
    """Uniform float64 numbers in ``[0, 1)`` from :func:`stream_keys` and int64 counters (broadcast)."""
    return _mix32(_mix32(keys ^ (counters & _MASK32))).double() / 2.0**32


def counter_uniform(seed: int, env_ids: Tensor, stream: int, counters: Tensor) -> Tensor:
    """Uniform float64 numbers in ``[0, 1)``, one per environment, a pure function of its four arguments.

    Args:
        seed: the generator's seed (any int; reduced to 32 bits).
        env_ids: global environment indices, int64.
        stream: which random quantity (an environment draws several independent ones).
        counters: per-environment counters (episode or step numbers), int64, shaped like ``env_ids``.
    """
    keys = stream_keys(seed, env_ids, torch.tensor([stream], device=env_ids.device)).squeeze(-1)
    return keyed_uniform(keys, counters)


@dataclass(frozen=True)
class StepResult:
    """What one :meth:`GridWorld.step` reports, one entry per environment.

    ``done`` marks environments whose episode ended on this step (they have already been reset). The other
    fields describe that ended episode and are ``False`` / ``0`` where ``done`` is ``False``.
    """

    done: Tensor
    reached_diamond: Tensor
    reached_ghost: Tensor
    seen: Tensor
    episode_length: Tensor

    def outcome(self) -> Tensor:
        """The :class:`Outcome` of each ended episode (``NONE`` where no episode ended), int64."""
        diamond = torch.where(self.seen, Outcome.SEEN_DIAMOND.value, Outcome.UNSEEN_DIAMOND.value)
        ghost = torch.where(self.seen, Outcome.SEEN_GHOST.value, Outcome.UNSEEN_GHOST.value)
        return torch.where(self.reached_diamond, diamond, torch.where(self.reached_ghost, ghost, Outcome.NONE.value))


class GridWorld:
    """``num_envs`` gridworlds stepped together; see the module docstring for the rules.

    Example::

        env = GridWorld(num_envs=512, oversight_prob=0.1, seed=0)
        obs = env.observe()                        # (512, 4, 5, 5) float: agent, ghost, diamond, oversight
        result = env.step(torch.randint(0, 4, (512,)))
        result.done, result.reached_diamond, result.seen

    Args:
        num_envs: environments in this batch.
        size: grid side length (at least 2, so three distinct cells exist).
        max_episode_steps: moves after which an episode that reached nothing ends (a timeout).
        oversight_prob: probability that the ghost's cell, and independently the diamond's cell, is overseen.
        seed: seed of the counter-based generator (resets and :meth:`uniform`).
        first_env: global index of this batch's first environment (its rank's offset under DDP).
        device: where the state lives.
    """

    def __init__(
        self,
        num_envs: int,
        size: int = 5,
        max_episode_steps: int = 32,
        oversight_prob: float = 0.0,
        seed: int = 0,
        first_env: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        checks = (("num_envs", num_envs, 1), ("size", size, 2), ("max_episode_steps", max_episode_steps, 1))
        for name, value, low in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"GridWorld: {name} must be an int >= {low}, got {value!r}")
        if isinstance(first_env, bool) or not isinstance(first_env, int) or first_env < 0:
            raise ValueError(f"GridWorld: first_env must be an int >= 0, got {first_env!r}")
        if not 0.0 <= oversight_prob <= 1.0:
            raise ValueError(f"GridWorld: oversight_prob must be in [0, 1], got {oversight_prob!r}")
        self.num_envs = num_envs
        self.size = size
        self.max_episode_steps = max_episode_steps
        self.oversight_prob = float(oversight_prob)
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.env_ids = torch.arange(first_env, first_env + num_envs, device=self.device)
        zeros = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self.agent, self.ghost, self.diamond = zeros.clone(), zeros.clone(), zeros.clone()  # cell = row * size + col
        self.ghost_overseen = torch.zeros(num_envs, dtype=torch.bool, device=self.device)
        self.diamond_overseen = torch.zeros_like(self.ghost_overseen)
        self.episode_steps = zeros.clone()  # moves in the current episode
        self.episodes = zeros.clone()  # episodes started so far, per environment
        self.steps = zeros.clone()  # moves so far, per environment (the action stream's counter)
        self._keys = stream_keys(self.seed, self.env_ids, torch.arange(len(_Stream), device=self.device))
        self._row_step = torch.tensor(_ROW_STEP, device=self.device)
        self._col_step = torch.tensor(_COL_STEP, device=self.device)
        self._reset(torch.ones(num_envs, dtype=torch.bool, device=self.device))

    @property
    def observation_shape(self) -> tuple[int, int, int]:
        return (4, self.size, self.size)

    def uniform(self, stream: int, counters: Tensor) -> Tensor:
        """This batch's counter-based uniforms in ``[0, 1)`` for ``stream`` (one per environment); equals
        ``counter_uniform(seed, env_ids, stream, counters)``."""
        return keyed_uniform(self._keys[:, stream], counters)

    def action_uniforms(self) -> Tensor:
        """The uniforms that sample this step's actions (keyed by each environment's step count)."""
        return self.uniform(_Stream.ACTION, self.steps)

    def _reset(self, which: Tensor) -> None:
        """Start a new episode in the environments where ``which`` is set: three distinct uniform cells."""
        cells = self.size * self.size
        u = keyed_uniform(self._keys[:, _RESET_STREAMS], self.episodes.unsqueeze(-1))  # (N, 5), one row per env
        draw = lambda stream, n: (u[:, stream] * n).long().clamp_max(n - 1)  # noqa: E731
        agent = draw(_Stream.AGENT_CELL, cells)
        ghost = draw(_Stream.GHOST_CELL, cells - 1)
        ghost = ghost + (ghost >= agent).long()  # skip the agent's cell
        low, high = torch.minimum(agent, ghost), torch.maximum(agent, ghost)
        diamond = draw(_Stream.DIAMOND_CELL, cells - 2)
        diamond = diamond + (diamond >= low).long()
        diamond = diamond + (diamond >= high).long()  # skip both taken cells, in order
        ghost_seen = u[:, _Stream.GHOST_OVERSEEN] < self.oversight_prob
        diamond_seen = u[:, _Stream.DIAMOND_OVERSEEN] < self.oversight_prob
        self.agent = torch.where(which, agent, self.agent)
        self.ghost = torch.where(which, ghost, self.ghost)
        self.diamond = torch.where(which, diamond, self.diamond)
        self.ghost_overseen = torch.where(which, ghost_seen, self.ghost_overseen)
        self.diamond_overseen = torch.where(which, diamond_seen, self.diamond_overseen)
        self.episode_steps = torch.where(which, 0, self.episode_steps)
        self.episodes = self.episodes + which.long()

    def observe(self) -> Tensor:
        """``(num_envs, 4, size, size)`` float32 one-hot planes: agent, ghost, diamond, overseen cells."""
        planes = torch.zeros(self.num_envs, 4, self.size * self.size, device=self.device)
        rows = torch.arange(self.num_envs, device=self.device)
        planes[rows, AGENT, self.agent] = 1.0
        planes[rows, GHOST, self.ghost] = 1.0
        planes[rows, DIAMOND, self.diamond] = 1.0
        planes[rows, OVERSIGHT, self.ghost] = self.ghost_overseen.float()
        planes[rows, OVERSIGHT, self.diamond] = self.diamond_overseen.float()
        return planes.view(self.num_envs, *self.observation_shape)

    def step(self, actions: Tensor) -> StepResult:
        """Move every agent by ``actions`` (int64 in ``[0, 4)``, one per environment), end and reset episodes."""
        if actions.shape != (self.num_envs,) or actions.dtype != torch.long:
            raise ValueError(
                f"GridWorld.step: actions must be int64 of shape ({self.num_envs},), got {actions.dtype} "
                f"{tuple(actions.shape)}"
            )
        if bool(((actions < 0) | (actions > 3)).any()):
            raise ValueError("GridWorld.step: actions must be in 0..3 (up, right, down, left)")
        row = (self.agent // self.size + self._row_step[actions]).clamp(0, self.size - 1)
        col = (self.agent % self.size + self._col_step[actions]).clamp(0, self.size - 1)
        self.agent = row * self.size + col
        self.steps = self.steps + 1
        self.episode_steps = self.episode_steps + 1
        reached_diamond = self.agent == self.diamond
        reached_ghost = self.agent == self.ghost
        done = reached_diamond | reached_ghost | (self.episode_steps >= self.max_episode_steps)
        seen = (reached_diamond & self.diamond_overseen) | (reached_ghost & self.ghost_overseen)
        result = StepResult(done, reached_diamond, reached_ghost, seen, torch.where(done, self.episode_steps, 0))
        self._reset(done)
        return result
