"""Gridworld scalable oversight: environment dynamics, rollouts, routing exactness, steering, recipes, DDP."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import SaveRankState, rank_states, trainer_kwargs
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor

from lightning_gradroute import GradientRouter, GradientRoutingCallback
from lightning_gradroute.cli import GradrouteCLI
from gradroute_experiments.gridworld import (
    GridWorld,
    GridworldEnvironment,
    GridworldPolicyGradient,
    GridworldReport,
    MixturePolicy,
    Outcome,
    SingleExpertPolicy,
    counter_uniform,
    discounted_returns,
    episode_outcomes,
    rewards,
)
from gradroute_experiments.gridworld.rollout import Rollout

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "gridworld"
UP, RIGHT, DOWN, LEFT = range(4)


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch) -> None:
    """LightningCLI warns when given args while sys.argv holds pytest's own."""
    monkeypatch.setattr(sys, "argv", ["gradroute"])


def cell(row: int, col: int, size: int = 5) -> int:
    return row * size + col


def place(env: GridWorld, agent: list[int], ghost: list[int], diamond: list[int], seen: list[tuple[bool, bool]]):
    """Overwrite every environment's layout: cells as ``row * size + col``, ``seen`` as (ghost, diamond)."""
    env.agent, env.ghost, env.diamond = (torch.tensor(v) for v in (agent, ghost, diamond))
    env.ghost_overseen = torch.tensor([g for g, _ in seen])
    env.diamond_overseen = torch.tensor([d for _, d in seen])


# ------------------------------------------------------------------------------------------------ environment
def test_moves_clamp_at_walls_and_observations_show_the_layout() -> None:
    env = GridWorld(4, oversight_prob=0.0)
    place(env, [cell(0, 0)] * 4, [cell(4, 4)] * 4, [cell(3, 3)] * 4, [(True, False)] * 4)
    obs = env.observe()
    assert obs.shape == (4, 4, 5, 5)
    assert obs[0, 0, 0, 0] == 1 and obs[0, 1, 4, 4] == 1 and obs[0, 2, 3, 3] == 1
    assert obs[:, :3].sum().item() == 12  # one agent, one ghost, one diamond per environment
    assert obs[0, 3].nonzero().tolist() == [[4, 4]]  # only the (overseen) ghost cell is marked
    result = env.step(torch.tensor([UP, RIGHT, DOWN, LEFT]))
    assert env.agent.tolist() == [cell(0, 0), cell(0, 1), cell(1, 0), cell(0, 0)]
    assert not result.done.any() and env.episode_steps.tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="actions must be int64 of shape"):
        env.step(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="actions must be in 0..3"):
        env.step(torch.tensor([0, 1, 2, 4]))


def test_terminal_squares_end_the_episode_with_its_oversight_and_reset() -> None:
    # Env 0 steps onto an unseen diamond, 1 onto a seen diamond, 2 onto a seen ghost, 3 onto an unseen ghost.
    env = GridWorld(4, oversight_prob=0.5, seed=3)
    episodes_before = env.episodes.clone()
    place(
        env,
        agent=[cell(2, 2)] * 4,
        ghost=[cell(4, 4), cell(4, 4), cell(2, 3), cell(1, 2)],
        diamond=[cell(2, 3), cell(1, 2), cell(0, 0), cell(0, 0)],
        seen=[(True, False), (False, True), (True, False), (False, True)],
    )
    result = env.step(torch.tensor([RIGHT, UP, RIGHT, UP]))
    assert result.done.all()
    assert result.reached_diamond.tolist() == [True, True, False, False]
    assert result.reached_ghost.tolist() == [False, False, True, True]
    assert result.seen.tolist() == [False, True, True, False]
    expected = [Outcome.UNSEEN_DIAMOND, Outcome.SEEN_DIAMOND, Outcome.SEEN_GHOST, Outcome.UNSEEN_GHOST]
    assert result.outcome().tolist() == [int(o) for o in expected]
    assert result.episode_length.tolist() == [1, 1, 1, 1]
    # Reset happened: a new episode with three distinct cells and no moves yet.
    assert (env.episodes == episodes_before + 1).all() and (env.episode_steps == 0).all()
    assert ((env.agent != env.ghost) & (env.agent != env.diamond) & (env.ghost != env.diamond)).all()


def test_timeout_ends_an_episode_with_no_outcome() -> None:
    env = GridWorld(1, max_episode_steps=3)
    place(env, [cell(0, 0)], [cell(4, 4)], [cell(3, 3)], [(False, False)])
    done = [env.step(torch.tensor([UP])) for _ in range(3)]
    assert [bool(r.done) for r in done] == [False, False, True]
    assert done[-1].outcome().tolist() == [Outcome.NONE] and done[-1].episode_length.tolist() == [3]


def test_resets_are_uniform_distinct_and_overseen_at_the_given_rate() -> None:
    env = GridWorld(50_000, oversight_prob=0.2, seed=11)
    cells = torch.stack([env.agent, env.ghost, env.diamond])
    assert ((cells[0] != cells[1]) & (cells[0] != cells[2]) & (cells[1] != cells[2])).all()
    for what in cells:  # each of the 25 cells about 1/25 of the time (binomial sd ~ 0.0009)
        frequency = torch.bincount(what, minlength=25).double() / len(what)
        assert (frequency - 1 / 25).abs().max() < 0.005
    for overseen in (env.ghost_overseen, env.diamond_overseen):
        assert abs(overseen.double().mean().item() - 0.2) < 0.01
    assert abs((env.ghost_overseen & env.diamond_overseen).double().mean().item() - 0.04) < 0.005  # independent
    assert not GridWorld(1000, oversight_prob=0.0).observe()[:, 3].any()


def test_split_environments_play_the_same_episodes_as_one_batch() -> None:
    # What DDP relies on: environments 0-3 and 4-7 run as two batches equal the 8 run as one.
    whole = GridWorld(8, oversight_prob=0.3, seed=5)
    parts = [GridWorld(4, oversight_prob=0.3, seed=5, first_env=first) for first in (0, 4)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        actions = torch.randint(0, 4, (8,), generator=generator)
        assert torch.equal(whole.observe(), torch.cat([p.observe() for p in parts]))
        assert torch.equal(whole.action_uniforms(), torch.cat([p.action_uniforms() for p in parts]))
        one = whole.step(actions)
        split = [p.step(a) for p, a in zip(parts, actions.chunk(2))]
        assert torch.equal(one.outcome(), torch.cat([s.outcome() for s in split]))
    assert whole.episodes.sum() > 8  # episodes ended and reset along the way
    reference = counter_uniform(5, whole.env_ids, 5, whole.steps)  # the public pure function, action stream
    assert torch.equal(whole.action_uniforms(), reference)


def test_environment_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="num_envs must be an int >= 1"):
        GridWorld(0)
    with pytest.raises(ValueError, match="oversight_prob must be in"):
        GridWorld(2, oversight_prob=1.5)
    with pytest.raises(ValueError, match="size must be an int >= 2"):
        GridWorld(2, size=1)


# ------------------------------------------------------------------------------------------------ rollouts
def test_returns_labels_and_rewards_by_hand() -> None:
    # One environment, 6 steps: an episode ends at step 1 (seen diamond), one at step 3 (unseen ghost), the last
    # is still running at the rollout's end.
    done = torch.tensor([[False], [True], [False], [True], [False], [False]])
    ends = torch.tensor([[0], [Outcome.SEEN_DIAMOND], [0], [Outcome.UNSEEN_GHOST], [0], [0]])
    rollout = Rollout(torch.zeros(6, 1, 4, 5, 5), torch.zeros(6, 1, dtype=torch.long), done, ends, done.long())
    labels = episode_outcomes(rollout).flatten().tolist()
    assert labels == [Outcome.SEEN_DIAMOND] * 2 + [Outcome.UNSEEN_GHOST] * 2 + [Outcome.NONE] * 2
    assert rewards(ends, "ground_truth").flatten().tolist() == [0, 1, 0, -1, 0, 0]
    assert rewards(ends, "naive").flatten().tolist() == [0, 1, 0, 1, 0, 0]  # the unseen ghost pays
    assert rewards(ends, "terminal").flatten().tolist() == [0, 1, 0, 1, 0, 0]
    seen_ghost = torch.full((1, 1), int(Outcome.SEEN_GHOST))
    assert rewards(seen_ghost, "naive").item() == -1 and rewards(seen_ghost, "terminal").item() == 1
    returns = discounted_returns(rewards(ends, "ground_truth"), done, 0.5).flatten().tolist()
    assert returns == [0.5, 1.0, -0.5, -1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="kind must be one of"):
        rewards(ends, "oracle")  # type: ignore[arg-type]


def test_rollout_batch_labels_keep_mask_and_counts() -> None:
    data = GridworldEnvironment(oversight_prob=0.5, num_envs=16, rollout_steps=20, filter_unseen=True, env_seed=1)
    env = data.make_env(16, 1, 0.5, torch.device("cpu"))
    batch = data.rollout_batch(MixturePolicy(5, 8), env)
    outcomes, labels, keep = batch["episode_outcomes"], batch["route_labels"], batch["keep"]
    assert batch["observations"].shape == (320, 4, 5, 5) and labels.shape == (320,)
    assert set(labels.unique().tolist()) == {0, 1, 2}  # every label occurs at this oversight level
    assert torch.equal(labels, torch.where(outcomes <= Outcome.SEEN_GHOST, outcomes, 0))
    assert torch.equal(keep.bool(), outcomes <= Outcome.SEEN_GHOST)  # unseen diamond / ghost episodes dropped
    assert batch["ended"].sum() == env.episodes.sum() - 16  # every ended episode counted once


# ------------------------------------------------------------------------------------------------ routing
def recipe_callbacks(recipe: str) -> list[Callback]:
    cli = GradrouteCLI(args=["--config", str(RECIPES / recipe), "--trainer.logger", "false"], run=False)
    return cli.trainer.callbacks


def recipe_router(recipe: str = "routed_moe.yaml") -> GradientRouter:
    (routing,) = [cb for cb in recipe_callbacks(recipe) if isinstance(cb, GradientRoutingCallback)]
    assert routing.router.label_names == list(GridworldPolicyGradient.routing_labels)
    return routing.router


def small_batch(seed: int = 0, oversight: float = 0.6) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    data = GridworldEnvironment(oversight_prob=oversight, num_envs=24, rollout_steps=16, env_seed=seed)
    return data.rollout_batch(MixturePolicy(5, 16), data.make_env(24, seed, oversight, torch.device("cpu")))


def paper_routed_loss(model: GridworldPolicyGradient, batch: dict[str, Tensor]) -> Tensor:
    """Independent computation: the paper's ``get_routed_reinforce_loss`` (detach trick, one forward per route)."""
    policy, hp = model.policy, model.hparams
    obs, actions, returns, labels = batch["observations"], batch["actions"], batch["returns"], batch["route_labels"]
    diamond, ghost, gate = policy.diamond_expert(obs), policy.ghost_expert(obs), policy.gate(obs)
    mix = lambda d, g, logit: torch.sigmoid(logit) * d + (1 - torch.sigmoid(logit)) * g  # noqa: E731
    routes = {  # label -> the mixture as that route sees it
        0: mix(diamond, ghost, gate),
        1: mix(diamond, ghost.detach(), gate.detach()),
        2: mix(diamond.detach(), ghost, gate.detach()),
    }
    values = model.value(obs)
    n = len(labels)
    loss = hp.value_coef * (values - returns).pow(2).mean()
    for label, mixture in routes.items():
        rows = labels == label
        distribution = torch.distributions.Categorical(logits=policy.head(mixture[rows]))
        weight = rows.sum() / n  # the paper's loss_wt: fraction of the batch in the route
        loss = loss - weight * (distribution.log_prob(actions[rows]) * (returns - values.detach())[rows]).mean()
        loss = loss - hp.entropy_coef * weight * distribution.entropy().mean()
    seen = labels != 0
    bce = F.binary_cross_entropy_with_logits(gate[seen].squeeze(-1), (labels[seen] == 1).float())
    return loss + hp.gate_coef * bce


def routed_grads(model: GridworldPolicyGradient, router: GradientRouter, batch: dict[str, Tensor]) -> list[Tensor]:
    with router.attached(model), router.route(batch["route_labels"]):
        return list(torch.autograd.grad(model.compute_losses(batch)["loss"], list(model.parameters())))


def test_recipe_routing_equals_the_papers_detach_trick() -> None:
    batch = small_batch()
    assert set(batch["route_labels"].unique().tolist()) == {0, 1, 2}
    torch.manual_seed(1)
    model = GridworldPolicyGradient(hidden_size=16)
    got = routed_grads(model, recipe_router(), batch)
    expected = torch.autograd.grad(paper_routed_loss(model, batch), list(model.parameters()))
    for (name, _), g, e in zip(model.named_parameters(), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
        assert g.abs().sum() > 0, f"{name} got no gradient"
    # Routing leaves the forward pass alone: the routed loss value equals the unrouted one, bit for bit.
    router = recipe_router()
    with router.attached(model), router.route(batch["route_labels"]):
        routed_loss = model.compute_losses(batch)["loss"]
        routed_loss.backward()  # inside route(): the router proves on exit that every site was routed
    with torch.no_grad():
        assert torch.equal(routed_loss.detach(), model.compute_losses(batch)["loss"])


@pytest.mark.parametrize(("label", "untouched"), [(1, "ghost_expert"), (2, "diamond_expert")])
def test_a_seen_episode_changes_no_parameter_of_the_other_expert_and_trains_the_gate_only_by_its_loss(
    label: int, untouched: str
) -> None:
    batch = small_batch(seed=2)
    rows = batch["route_labels"] == label
    batch = {k: v[rows] if v.shape[:1] == rows.shape else v for k, v in batch.items()}  # only that label's episodes
    torch.manual_seed(3)
    model = GridworldPolicyGradient(hidden_size=16)
    names = [n for n, _ in model.named_parameters()]
    grads = dict(zip(names, routed_grads(model, recipe_router(), batch)))
    trained = "diamond_expert" if untouched == "ghost_expert" else "ghost_expert"
    assert all(torch.count_nonzero(g) == 0 for n, g in grads.items() if n.startswith(f"policy.{untouched}."))
    assert all(torch.count_nonzero(g) > 0 for n, g in grads.items() if n.startswith(f"policy.{trained}."))
    # The gate's gradient is exactly that of gate_coef * BCE: no policy gradient reaches it.
    bce = F.binary_cross_entropy_with_logits(
        model.policy.gate(batch["observations"]).squeeze(-1), torch.full((int(rows.sum()),), float(label == 1))
    )
    gate_params = list(model.policy.gate.parameters())
    expected = torch.autograd.grad(model.hparams.gate_coef * bce, gate_params)
    for name, e in zip([n for n in names if n.startswith("policy.gate.")], expected):
        torch.testing.assert_close(grads[name], e, rtol=1e-5, atol=1e-8)
    # Unrouted, the same batch does train the other expert: the zeros above are the routing's doing.
    loss = model.compute_losses(batch)["loss"]
    other = torch.autograd.grad(loss, list(model.policy.get_submodule(untouched).parameters()))
    assert any(torch.count_nonzero(g) > 0 for g in other)


def test_data_filtering_loss_is_the_papers_kept_fraction_times_the_kept_mean() -> None:
    batch = small_batch(seed=4, oversight=0.3)
    kept = batch["episode_outcomes"] <= Outcome.SEEN_GHOST
    batch["keep"] = kept.float()
    batch["returns"] = batch["true_returns"]  # data filtering trains on the ground-truth reward
    torch.manual_seed(5)
    model = GridworldPolicyGradient(policy="single", hidden_size=16)
    obs, actions, returns = batch["observations"][kept], batch["actions"][kept], batch["returns"][kept]
    distribution = torch.distributions.Categorical(logits=model.policy(obs).logits)
    values = model.value(obs)
    paper = (
        -(distribution.log_prob(actions) * (returns - values.detach())).mean()
        + 0.5 * (values - returns).pow(2).mean()
        - 0.1 * distribution.entropy().mean()
    ) * kept.float().mean()
    torch.testing.assert_close(model.compute_losses(batch)["loss"], paper, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ steering
def test_steering_sets_the_gate_to_one_expert_exactly() -> None:
    torch.manual_seed(6)
    policy = MixturePolicy(5, 16)
    obs = small_batch(seed=6)["observations"][:50]
    with torch.no_grad():
        diamond_alone = policy.head(policy.diamond_expert(obs))
        assert torch.equal(policy(obs, steer="diamond").logits, diamond_alone)
        assert torch.equal(policy(obs, steer="ghost").logits, policy.head(policy.ghost_expert(obs)))
        mixed = policy(obs).logits
        assert not torch.allclose(mixed, diamond_alone)
        for p in [*policy.ghost_expert.parameters(), *policy.gate.parameters()]:
            p.add_(torch.randn_like(p))  # the steered diamond policy does not depend on them at all
        assert torch.equal(policy(obs, steer="diamond").logits, diamond_alone)
        assert not torch.equal(policy(obs).logits, mixed)
    with pytest.raises(ValueError, match="steer must be one of"):
        policy(obs, steer="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no experts to steer"):
        SingleExpertPolicy(5, 8)(obs, steer="diamond")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ module
def test_module_and_data_validate_their_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="policy must be 'mixture' or 'single'"):
        GridworldPolicyGradient(policy="moe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gate_coef must be >= 0"):
        GridworldPolicyGradient(gate_coef=-1.0)
    with pytest.raises(ValueError, match="reward must be one of"):
        GridworldEnvironment(reward="oracle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_envs must be an int >= 1"):
        GridworldEnvironment(num_envs=0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match="grid_size=5 but the data module's is 4"):
        trainer.fit(GridworldPolicyGradient(hidden_size=8), GridworldEnvironment(grid_size=4, num_envs=4))
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        endless = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=None))
        endless.fit(GridworldPolicyGradient(hidden_size=8), GridworldEnvironment())


# ------------------------------------------------------------------------------------------------ recipes
def run_recipe(tmp_path: Path, recipe: str, *extra: str) -> Path:
    """``gradroute fit`` on a recipe for a few updates, shrunk; returns the run's log dir."""
    GradrouteCLI(
        args=[
            "fit",
            "--config",
            str(RECIPES / recipe),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "2",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--data.init_args.num_envs",
            "16",
            "--data.init_args.eval_envs",
            "16",
            "--data.init_args.test_envs",
            "64",
            *extra,
        ]
    )
    (log_dir,) = tmp_path.glob("*/version_0")
    return log_dir


@pytest.mark.timeout(120)
def test_routed_recipe_writes_results_figures_and_tensorboard(tmp_path: Path) -> None:
    log_dir = run_recipe(tmp_path, "routed_moe.yaml")
    results = json.loads((log_dir / "results.json").read_text())
    assert results["method"]["routed"] is True and results["method"]["oversight_prob"] == 0.1
    assert results["headline"]["policy"] == "diamond_expert"
    assert results["scale"]["updates"] == 4 and results["scale"]["transitions"] == 4 * 16 * 32
    assert set(results["evaluation"]) == {"policy", "diamond_expert", "ghost_expert"}
    for conditions in results["evaluation"].values():
        assert set(conditions) == {"training_oversight", "no_oversight", "full_oversight"}
        assert conditions["no_oversight"]["seen_diamond_rate"] == 0 == conditions["no_oversight"]["seen_ghost_rate"]
        full = conditions["full_oversight"]
        assert full["unseen_diamond_rate"] == 0 == full["unseen_ghost_rate"]  # every terminal cell watched
        for stats in conditions.values():
            assert -1 <= stats["true_return"] <= 1 and stats["episodes"] > 0
    curve = results["validation_curve"]  # validations after updates 2 and 4, every policy
    assert [entry["update"] for entry in curve] == [2, 4]
    assert set(curve[-1]) == {"update", "policy", "diamond_expert", "ghost_expert"}
    used = results["oversight_used"]
    assert used["training_episodes"] == sum(used["training_episodes_by_outcome"].values()) > 0
    assert used["holdout_episodes_scored"] > 0  # two validations ran
    for name in ("policy_map", "outcomes"):
        assert (log_dir / f"gridworld_{name}.png").stat().st_size > 1000
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"test/policy_map", "test/outcomes"}
    scalars = set(events.Tags()["scalars"])
    expected = {"train/gate_loss", "val/diamond_expert/true_return", "test/diamond_expert/no_oversight/true_return"}
    assert expected <= scalars


@pytest.mark.timeout(120)
def test_early_stopping_recipe_evaluates_the_best_checkpoint(tmp_path: Path) -> None:
    log_dir = run_recipe(tmp_path, "naive_early_stopping.yaml")
    results = json.loads((log_dir / "results.json").read_text())
    assert results["weights"].startswith("best by val/policy/true_return")
    assert results["method"] == {
        "policy": "single", "reward": "naive", "filter_unseen": False, "routed": False, "oversight_prob": 0.1
    }


# ------------------------------------------------------------------------------------------------ DDP
def fit_routed(directory: Path, devices: int) -> tuple[GridworldPolicyGradient, dict[str, Any]]:
    directory.mkdir()
    router = recipe_router()
    routing = GradientRoutingCallback(router.targets, router.routes, router.label_names)
    torch.manual_seed(0)
    model = GridworldPolicyGradient(hidden_size=16, lr=1e-2)
    data = GridworldEnvironment(
        oversight_prob=0.5, num_envs=16, rollout_steps=12, eval_envs=16, test_envs=16, env_seed=7
    )
    distributed = dict(strategy="ddp_spawn", devices=2) if devices == 2 else {}
    callbacks = [routing, GridworldReport(), SaveRankState(directory)]
    trainer = pl.Trainer(**trainer_kwargs(str(directory), max_steps=3, callbacks=callbacks, **distributed))
    trainer.fit(model, datamodule=data)
    return model, json.loads((directory / "results.json").read_text())


@pytest.mark.timeout(180)
def test_ddp_spawn_splits_the_environments_and_equals_one_process(tmp_path: Path) -> None:
    single, single_results = fit_routed(tmp_path / "one", devices=1)
    _, ddp_results = fit_routed(tmp_path / "two", devices=2)
    ranks = rank_states(tmp_path / "two")
    one = torch.load(tmp_path / "one" / "rank0.pt")
    # Each rank routed its own half of the environments; together exactly the single process's transitions.
    assert ranks[0]["label_totals"] != ranks[1]["label_totals"]
    assert [a + b for a, b in zip(ranks[0]["label_totals"], ranks[1]["label_totals"])] == one["label_totals"]
    assert all(t > 0 for t in one["label_totals"])
    for name, param in single.named_parameters():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), f"{name} differs across ranks"
        torch.testing.assert_close(ranks[0]["params"][name], param.detach(), rtol=1e-4, atol=1e-6)
    assert ddp_results["scale"]["world_size"] == 2
    assert ddp_results["oversight_used"] == single_results["oversight_used"]
