"""Fine-tuning evaluations: the coherence fine-tune after ablation and the retraining attack.

Both train ``model`` in place with AdamW on a few batches (cycled, one per step) and evaluate after every
step with ``eval_fn(model)``, which returns a loss (lower is better) or a mapping of named losses; they use
``loss_fn(model, batch) -> scalar`` like :mod:`lightning_gradroute.evaluation.losses`.

* :func:`coherence_finetune` (paper, TinyStories ERA phase 2): AdamW lr 5e-5, betas (0.9, 0.95), weight decay
  0.1 on retain data; keeps the best weights on ``eval_fn`` (the pre-fine-tune weights are a candidate).
* :func:`retraining_attack` (paper's "robust unlearning" metric): fine-tune on a few forget examples for
  ``steps`` steps at ``lr`` from several seeds, each from the same starting weights; report the curve
  averaged over seeds (every step, or every ``eval_every`` steps), the lowest forget loss it reaches and the
  steps needed to recover a given loss (the SGTM metric). The model is restored afterwards.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Union

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from lightning_gradroute.evaluation.losses import LossFn, evaluation_mode, model_device

__all__ = ["AttackResult", "FinetuneResult", "coherence_finetune", "retraining_attack", "steps_to_recover"]

EvalFn = Callable[[nn.Module], Union[float, Mapping[str, float]]]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class FinetuneResult:
    """Outcome of :func:`coherence_finetune`.

    Attributes:
        curve: ``eval_fn`` before fine-tuning (index 0) and after each step.
        best_step: the step whose weights were kept (0: the weights before fine-tuning).
        best_loss: ``curve[best_step]``.
    """

    curve: list[float]
    best_step: int
    best_loss: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AttackResult:
    """Outcome of :func:`retraining_attack`. Curves have one entry per evaluated step, ``eval_steps`` (0: before
    the attack; with ``eval_every=1`` every step, so entry ``i`` is step ``i``).

    Attributes:
        metric: the name of the loss the attack is judged on (``"forget"``).
        curves: per metric, the curve averaged over seeds.
        seed_curves: per seed, per metric, the curve of that run.
        lowest_loss: the minimum over the evaluated steps of the seed-averaged ``metric`` curve.
        lowest_step: the step where it is reached.
        target_loss: the loss to recover (``None`` if not asked).
        steps_to_recover: the first evaluated step where the averaged ``metric`` curve is at or below
            ``target_loss`` (``None``: never within ``steps``).
        eval_steps: the step of each curve entry.
    """

    metric: str
    curves: dict[str, list[float]]
    seed_curves: dict[int, dict[str, list[float]]]
    lowest_loss: float
    lowest_step: int
    target_loss: float | None
    steps_to_recover: int | None
    eval_steps: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def steps_to_recover(curve: Sequence[float], target_loss: float, steps: Sequence[int] | None = None) -> int | None:
    """The first step at which ``curve`` is at or below ``target_loss``; ``None`` if it never gets there.

    ``steps`` is the step of each entry of ``curve`` (default: its index, one entry per step).
    """
    steps = range(len(curve)) if steps is None else steps
    if len(steps) != len(curve):
        raise ValueError(f"steps_to_recover: {len(steps)} steps for a curve of {len(curve)} entries")
    return next((step for step, loss in zip(steps, curve) if loss <= target_loss), None)


def _adamw(lr: float, betas: tuple[float, float], weight_decay: float) -> OptimizerFactory:
    return lambda params: torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def _batch_list(batches: Any) -> list[Any]:
    """One batch (a tensor, dict or tuple) or a list / iterable of batches, as a non-empty list."""
    if isinstance(batches, (torch.Tensor, Mapping, tuple)):
        return [batches]
    listed = list(batches)
    if not listed:
        raise ValueError("no training batches given")
    return listed


def _evaluate(model: nn.Module, eval_fn: EvalFn, metric: str) -> dict[str, float]:
    with evaluation_mode(model):
        value = eval_fn(model)
    values = {metric: float(value)} if not isinstance(value, Mapping) else {k: float(v) for k, v in value.items()}
    if metric not in values:
        raise ValueError(f"eval_fn returned {sorted(values)}; it must return a float or a mapping with {metric!r}")
    return values


def _train(
    model: nn.Module,
    loss_fn: LossFn,
    batches: list[Any],
    steps: int,
    optimizer: OptimizerFactory,
    after_step: Callable[[int], None],
) -> None:
    """``steps`` optimizer steps in train mode, cycling through ``batches``; ``after_step(step)`` after each."""
    device = model_device(model)
    opt = optimizer([p for p in model.parameters() if p.requires_grad])
    was_training = model.training
    model.train()
    try:
        for step, batch in zip(range(1, steps + 1), itertools.cycle(batches)):
            opt.zero_grad(set_to_none=True)
            loss_fn(model, move_data_to_device(batch, device)).backward()
            opt.step()
            after_step(step)
    finally:
        model.train(was_training)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_steps(steps: int, where: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{where}: steps must be a non-negative integer, got {steps!r}")


def coherence_finetune(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    eval_fn: EvalFn,
    steps: int,
    lr: float = 5e-5,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.1,
    optimizer: OptimizerFactory | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on retain ``batches`` for ``steps`` steps and keep the weights that score best.

    The paper runs ``num_steps_coherence_finetuning + 1`` steps (41 for TinyStories ERAC) on one batch of 64
    retain stories, evaluating on 1,000 others after each step; pass that number as ``steps``.

    Args:
        model: trained in place; on return it holds the best weights (possibly the initial ones).
        loss_fn: ``loss_fn(model, batch) -> scalar`` training loss.
        batches: one batch (a tensor, dict or tuple) or a list of batches, cycled one per step.
        eval_fn: ``eval_fn(model) -> float`` (lower is better; a mapping uses its ``"retain"`` entry), called
            in eval mode without gradients.
        steps: optimizer steps.
        lr, betas, weight_decay: AdamW settings (ignored when ``optimizer`` is given).
        optimizer: ``optimizer(params) -> torch.optim.Optimizer`` instead of AdamW.
    """
    _check_steps(steps, "coherence_finetune")
    metric = "retain"
    curve = [_evaluate(model, eval_fn, metric)[metric]]
    best = (curve[0], 0, _snapshot(model))

    def keep_best(step: int) -> None:
        nonlocal best
        curve.append(_evaluate(model, eval_fn, metric)[metric])
        if curve[-1] < best[0]:
            best = (curve[-1], step, _snapshot(model))

    _train(model, loss_fn, _batch_list(batches), steps, optimizer or _adamw(lr, betas, weight_decay), keep_best)
    model.load_state_dict(best[2])
    return FinetuneResult(curve=curve, best_step=best[1], best_loss=best[0])


def retraining_attack(
    model: nn.Module,
    loss_fn: LossFn,
    forget_batches: Any,
    eval_fn: EvalFn,
    steps: int = 40,
    lr: float = 5e-5,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    target_loss: float | None = None,
    metric: str = "forget",
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.01,
    optimizer: OptimizerFactory | None = None,
    eval_every: int = 1,
) -> AttackResult:
    """Try to re-learn the forget data: fine-tune on a few forget examples from several seeds.

    Each seed starts from ``model``'s current weights, seeds torch's RNG (dropout, and any sampling inside
    ``forget_batches``), trains ``steps`` steps and evaluates before the first and after every ``eval_every``-th
    (and the last). ``model`` is restored afterwards.
    The paper (TinyStories): AdamW lr 5e-5, betas (0.9, 0.95), weight decay 0.01, 40 steps, one full batch of
    1, 4, 16 or 64 forget stories, 5 repetitions.

    Example::

        result = retraining_attack(
            model, lambda m, b: m(**b).loss, forget_examples,
            eval_fn=lambda m: retain_forget_loss(m, loss, retain_val, forget_val),
            steps=40, lr=5e-5, seeds=range(5), target_loss=base_model_forget_loss,
        )
        result.lowest_loss, result.steps_to_recover, result.curves["forget"]

    Args:
        model: the model to attack (left unchanged on return).
        loss_fn: ``loss_fn(model, batch) -> scalar`` training loss.
        forget_batches: one batch (a tensor, dict or tuple) or a list of batches cycled one per step, or
            ``forget_batches(seed)`` returning them (to draw different forget examples per seed).
        eval_fn: ``eval_fn(model) -> float`` (the ``metric`` loss) or a mapping of named losses including
            ``metric``; called in eval mode without gradients.
        steps: optimizer steps per seed.
        lr, betas, weight_decay: AdamW settings (ignored when ``optimizer`` is given).
        seeds: one attack per seed; the curves are averaged over them.
        target_loss: report the first step at which the averaged ``metric`` curve reaches this loss.
        metric: which loss of ``eval_fn`` the attack tries to lower.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer`` instead of AdamW.
        eval_every: evaluate after every this many steps (and after the last): a long attack with an expensive
            ``eval_fn`` costs less; ``steps_to_recover`` is then known to this resolution.
    """
    _check_steps(steps, "retraining_attack")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"retraining_attack: eval_every must be a positive integer, got {eval_every!r}")
    eval_steps = [0, *(s for s in range(1, steps + 1) if s % eval_every == 0 or s == steps)]
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"retraining_attack: seeds must be distinct and at least one, got {seeds}")
    initial = _snapshot(model)
    seed_curves: dict[int, dict[str, list[float]]] = {}
    try:
        for seed in seeds:
            model.load_state_dict(initial)
            torch.manual_seed(seed)
            batches = _batch_list(forget_batches(seed) if callable(forget_batches) else forget_batches)
            curves: dict[str, list[float]] = {k: [v] for k, v in _evaluate(model, eval_fn, metric).items()}

            def record(step: int, curves: dict[str, list[float]] = curves) -> None:
                if step in eval_steps:
                    for key, value in _evaluate(model, eval_fn, metric).items():
                        curves[key].append(value)

            _train(model, loss_fn, batches, steps, optimizer or _adamw(lr, betas, weight_decay), record)
            seed_curves[seed] = curves
    finally:
        model.load_state_dict(initial)
    mean = {
        key: [sum(seed_curves[s][key][i] for s in seeds) / len(seeds) for i in range(len(eval_steps))]
        for key in seed_curves[seeds[0]]
    }
    lowest = min(range(len(eval_steps)), key=mean[metric].__getitem__)
    return AttackResult(
        metric=metric,
        curves=mean,
        seed_curves=seed_curves,
        lowest_loss=mean[metric][lowest],
        lowest_step=eval_steps[lowest],
        target_loss=target_loss,
        steps_to_recover=None if target_loss is None else steps_to_recover(mean[metric], target_loss, eval_steps),
        eval_steps=eval_steps,
    )
