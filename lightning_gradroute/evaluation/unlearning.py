"""The unlearning evaluation of the paper's TinyStories experiment, for any causal LM, as a Lightning callback.

:class:`UnlearningEvaluation` reads its data through :class:`UnlearningData` (and :class:`CoherenceData` for the
optional coherence fine-tune), small protocols that a data module or any other object implements; the loss is
``loss_fn(model, batch) -> scalar`` (default :func:`~lightning_gradroute.evaluation.losses.next_token_loss`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_gradroute.callback import GradientRoutingCallback, routing_callback_before
from lightning_gradroute.evaluation.finetune import FinetuneResult, coherence_finetune
from lightning_gradroute.evaluation.finetune import retraining_attack, steps_to_recover
from lightning_gradroute.evaluation.losses import LossFn, mean_loss, next_token_loss

__all__ = [
    "CoherenceData",
    "EvaluationCallback",
    "UnlearningData",
    "UnlearningEvaluation",
    "coherence_finetune_on",
    "recovery_steps",
]


@runtime_checkable
class UnlearningData(Protocol):
    """The data of an unlearning evaluation, read on rank 0 after training. Each ``*_examples`` method returns a
    sequence of examples (a list, a map-style ``Dataset``: ``len`` and ``[i]``): ``retain_eval_examples`` and
    ``forget_eval_examples`` are held out (the retain and forget losses), ``attack_pool_examples`` are other
    forget examples the retraining attack draws from. ``collate_examples(examples, split)`` makes a batch for
    ``loss_fn`` out of some of them; ``split`` names the method they came from, without ``_examples``.
    """

    def retain_eval_examples(self) -> Sequence[Any]: ...
    def forget_eval_examples(self) -> Sequence[Any]: ...
    def attack_pool_examples(self) -> Sequence[Any]: ...
    def collate_examples(self, examples: Sequence[Any], split: str) -> Any: ...


@runtime_checkable
class CoherenceData(Protocol):
    """The data of the coherence fine-tune after ablation: ``coherence_train_examples``, retain examples it trains
    on (one batch), and ``coherence_val_examples``, other retain examples that pick the best step; batched by
    ``collate_examples`` as in :class:`UnlearningData`."""

    def coherence_train_examples(self) -> Sequence[Any]: ...
    def coherence_val_examples(self) -> Sequence[Any]: ...
    def collate_examples(self, examples: Sequence[Any], split: str) -> Any: ...


def _check_protocol(data: Any, protocol: type, who: str) -> None:
    if not isinstance(data, protocol):
        members = sorted(name for name in vars(protocol) if not name.startswith("_"))
        missing = [name for name in members if not callable(getattr(data, name, None))]
        raise TypeError(
            f"{who}: {type(data).__name__} does not implement {protocol.__name__}: it lacks {', '.join(missing)} "
            f"(see lightning_gradroute.evaluation.{protocol.__name__})"
        )


def _take(examples: Sequence[Any], start: int = 0, stop: int | None = None) -> list[Any]:
    """``examples[start:stop]`` as a list, for any sequence (a ``Dataset`` cannot slice)."""
    return [examples[i] for i in range(start, len(examples) if stop is None else min(stop, len(examples)))]


def _batches(data: Any, examples: Sequence[Any], split: str, batch_size: int) -> list[Any]:
    """``examples`` in order, in batches of ``batch_size`` made by ``data.collate_examples``."""
    starts = range(0, len(examples), batch_size)
    return [data.collate_examples(_take(examples, i, i + batch_size), split) for i in starts]


def coherence_finetune_on(
    model: nn.Module,
    data: CoherenceData,
    loss_fn: LossFn,
    steps: int,
    lr: float,
    batch_size: int,
    limit: int | None = None,
) -> FinetuneResult:
    """:func:`~lightning_gradroute.evaluation.coherence_finetune` on ``data``: one batch of all its
    ``coherence_train_examples``, keeping the step with the lowest mean loss on ``coherence_val_examples``
    (batches of ``batch_size``); ``limit`` caps both sets (smoke runs). AdamW with ``lr``, betas (0.9, 0.95),
    weight decay 0.1; ``model`` ends with the best weights."""
    train = data.collate_examples(_take(data.coherence_train_examples(), stop=limit), "coherence_train")
    validation = _batches(data, _take(data.coherence_val_examples(), stop=limit), "coherence_val", batch_size)
    eval_fn = lambda m: mean_loss(m, validation, loss_fn)  # noqa: E731
    return coherence_finetune(model, loss_fn, train, eval_fn=eval_fn, steps=steps, lr=lr)


def recovery_steps(attack: dict[str, Any], target_loss: float) -> int | None:
    """Steps to recover (SGTM's metric) from the ``attack`` entry of an :class:`UnlearningEvaluation`'s results:
    the fewest attack steps after which some learning rate's seed-averaged forget loss is at or below
    ``target_loss`` (say, plain training's forget loss); ``None`` if no rate gets there within the attack."""
    found = [
        steps_to_recover(a["curves"]["forget"], target_loss, attack["eval_steps"]) for a in attack["by_lr"].values()
    ]
    return min((s for s in found if s is not None), default=None)


def _positive_int(who: str, name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{who}: {name} must be an int >= {minimum}, got {value!r}")


class EvaluationCallback(pl.Callback):
    """Base of callbacks that evaluate when ``fit`` ends and write ``results_file`` under the log dir.

    ``setup("fit")`` calls :meth:`check` (raise there, before training, on anything that cannot be evaluated)
    and resolves the log dir on every rank (``trainer.log_dir`` is a collective under DDP); rank 0 then writes
    with :meth:`write_results`.
    """

    def __init__(self, results_file: str = "results.json") -> None:
        self.results: dict[str, Any] = {}
        self.results_file = results_file
        self.out_dir = Path(".")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.check(trainer, pl_module)
        self.out_dir = Path(trainer.log_dir or trainer.default_root_dir)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise if this trainer, model or data cannot be evaluated (nothing to check by default)."""

    def write_results(self, results: dict[str, Any]) -> Path:
        """Keep ``results`` and write them as JSON to ``<log dir>/<results_file>``; return the path."""
        self.results = results
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / self.results_file
        path.write_text(json.dumps(results, indent=2))
        return path


class UnlearningEvaluation(EvaluationCallback):
    """Measure how well (and how robustly) a causal LM unlearned, when ``fit`` ends; write ``results.json``.

    Stages (the paper's TinyStories evaluation), each loss the mean over held-out batches of the batch's mean
    loss (:func:`~lightning_gradroute.evaluation.mean_loss`), on :class:`UnlearningData`'s retain and forget
    examples:

    1. ``pre_ablation``: at ``on_train_end``, before the routing callback ablates in its ``on_fit_end`` (list
       this callback *after* the ``GradientRoutingCallback``; ``setup`` checks);
    2. :meth:`ablate`, a hook for a method's own ablation (nothing by default), then ``post_ablation``;
    3. with ``coherence_steps``, a coherence fine-tune on :class:`CoherenceData` keeping its best step
       (``coherence``), then ``final``;
    4. the retraining attack (``attack``): for each rate of ``attack_lr`` and each of ``attack_seeds`` seeds,
       fine-tune the final model on ``attack_examples`` examples drawn with ``random.Random(seed)`` from the
       attack examples (one batch, or cycled batches of ``attack_batch_size``), evaluating every
       ``attack_eval_every`` steps; the seed-averaged curves per rate (``by_lr``), the lowest forget loss over
       rates and steps, step 0 included (``lowest_forget``, ``lowest_step``, ``lowest_lr``), and with
       ``target_loss`` the steps to recover it (:func:`recovery_steps`). The model is restored afterwards. With
       a list of ``attack_examples`` budgets, one attack per budget (``attacks``, keyed by budget; ``attack`` is
       the first budget's). :meth:`attack` runs one on its own.

    With the routing callback's ``log_grad_norms=True`` the mean of each logged gradient norm lands in
    ``grad_norms``. Under ``fast_dev_run`` every set is cut to one batch of ``eval_batch_size`` and every stage
    runs one step with one seed. Rank 0 evaluates and writes.

    Example::

        class Data(MyDataModule):  # or any object, passed as data=...
            def retain_eval_examples(self): return self.splits["retain_test"]
            def forget_eval_examples(self): return self.splits["forget_test"]
            def attack_pool_examples(self): return self.splits["forget_attack"]
            def collate_examples(self, examples, split): return self.pad(examples)  # {"input_ids", "attention_mask"}

        evaluation = UnlearningEvaluation(attack_steps=40, attack_lr=[5e-5, 5e-4], attack_examples=64)
        trainer = pl.Trainer(callbacks=[routing, evaluation])  # after the GradientRoutingCallback
        trainer.fit(model, Data())  # then read <log dir>/results.json

    Args:
        data: the :class:`UnlearningData`; None: the trainer's datamodule.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for every evaluation and fine-tune, given the
            LightningModule; default :func:`~lightning_gradroute.evaluation.losses.next_token_loss`
            (``model(input_ids=...)`` returning logits or an output with ``.logits``; over real tokens).
        coherence_steps: coherence fine-tune steps (0: none; the paper: 41), which needs :class:`CoherenceData`.
        coherence_lr: its AdamW learning rate (the paper: 5e-5, betas (0.9, 0.95), weight decay 0.1).
        attack_steps: attack steps per seed (the paper: 40).
        attack_lr: its AdamW learning rate (the paper: 5e-5, weight decay 0.01), or distinct rates to sweep.
        attack_examples: examples per attack (the paper: 64), at most the attack examples there are; or distinct
            budgets, one attack each (e.g. ``[16, 64, 256]``).
        attack_batch_size: batches of this many, cycled one per step; None: one batch.
        attack_seeds: attacks per rate, averaged (the paper: 5).
        attack_eval_every: evaluate after every this many attack steps (and the last).
        attack_metrics: the losses the attack evaluates, among :attr:`LOSSES`, with ``"forget"``.
        target_loss: report the attack's steps to recover this forget loss.
        eval_batch_size: batch size of the held-out evaluations.
        results_file: file name under the trainer's log dir.
    """

    #: The losses :meth:`held_out_losses` can measure (subclasses that measure more extend it).
    LOSSES: tuple[str, ...] = ("retain", "forget")

    def __init__(
        self,
        data: UnlearningData | None = None,
        loss_fn: LossFn | None = None,
        coherence_steps: int = 0,
        coherence_lr: float = 5e-5,
        attack_steps: int = 40,
        attack_lr: float | Sequence[float] = 5e-5,
        attack_examples: int | Sequence[int] = 64,
        attack_batch_size: int | None = None,
        attack_seeds: int = 5,
        attack_eval_every: int = 1,
        attack_metrics: Sequence[str] | None = None,
        target_loss: float | None = None,
        eval_batch_size: int = 128,
        results_file: str = "results.json",
    ) -> None:
        super().__init__(results_file)
        who = type(self).__name__
        budgets = list(attack_examples) if isinstance(attack_examples, (list, tuple)) else [attack_examples]
        if not budgets or len(set(budgets)) != len(budgets):
            raise ValueError(f"{who}: attack_examples must be a positive int or distinct ones, got {attack_examples}")
        for budget in budgets:
            _positive_int(who, "attack_examples", budget)
        for name, value, minimum in (
            ("coherence_steps", coherence_steps, 0),
            ("attack_steps", attack_steps, 0),
            ("attack_seeds", attack_seeds, 1),
            ("attack_eval_every", attack_eval_every, 1),
            ("attack_batch_size", attack_batch_size or 1, 1),
            ("eval_batch_size", eval_batch_size, 1),
        ):
            _positive_int(who, name, value, minimum)
        lrs = list(attack_lr) if isinstance(attack_lr, (list, tuple)) else [attack_lr]
        if not lrs or len(set(lrs)) != len(lrs) or not all(isinstance(lr, (int, float)) and lr > 0 for lr in lrs):
            raise ValueError(f"{who}: attack_lr must be a positive number or distinct ones, got {attack_lr}")
        metrics = tuple(self.LOSSES if attack_metrics is None else attack_metrics)
        if "forget" not in metrics or not set(metrics) <= set(self.LOSSES):
            raise ValueError(f"{who}: attack_metrics must include 'forget' and be among {self.LOSSES}, got {metrics}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"{who}: loss_fn must be a callable loss_fn(model, batch) -> Tensor, got {loss_fn!r}")
        if data is not None:
            _check_protocol(data, UnlearningData, who)
        self.data, self.loss_fn = data, loss_fn or next_token_loss
        self.coherence_steps, self.coherence_lr = coherence_steps, coherence_lr
        self.attack_steps, self.attack_lrs, self.attack_budgets = attack_steps, lrs, budgets
        self._budget_list = isinstance(attack_examples, (list, tuple))
        self.attack_batch_size, self.attack_seeds = attack_batch_size, attack_seeds
        self.attack_eval_every, self.attack_metrics, self.target_loss = attack_eval_every, metrics, target_loss
        self.eval_batch_size = eval_batch_size
        #: The trainer's routing callback (:func:`~lightning_gradroute.callback.routing_callback_before`).
        #: Set in ``setup``.
        self.routing: GradientRoutingCallback | None = None
        self._grad_norms: dict[str, list[float]] = {}
        self._eval_batches: dict[str, list[Any]] = {}
        self._quick, self._started = False, 0.0

    # ------------------------------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        who = type(self).__name__
        self.routing = routing_callback_before(trainer, self, who)
        data = self.data if self.data is not None else trainer.datamodule
        if data is None:
            raise ValueError(f"{who}: pass data=... (an UnlearningData) or fit with a datamodule that implements it")
        _check_protocol(data, UnlearningData, who)
        if self.coherence_steps:
            _check_protocol(data, CoherenceData, f"{who}(coherence_steps={self.coherence_steps})")
        self._data, self._quick = data, bool(trainer.fast_dev_run)
        self._eval_batches = {}
        super().setup(trainer, pl_module, stage)
        self._started = time.perf_counter()

    # ------------------------------------------------------------------------------------------ hooks
    def ablate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """A method's own ablation, after the routing callback's and before ``post_ablation`` (rank 0): change
        ``pl_module`` in place and return what goes into ``results.json`` (nothing by default)."""
        return {}

    def held_out_losses(self, model: nn.Module, metrics: Sequence[str] | None = None) -> dict[str, float]:
        """The held-out losses of ``model`` named in ``metrics`` (default :attr:`LOSSES`; ``forget`` always)."""
        wanted = [name for name in ("retain", "forget") if name == "forget" or name in (metrics or self.LOSSES)]
        return {name: mean_loss(model, self.eval_batches(f"{name}_eval"), self.loss_fn) for name in wanted}

    def metadata(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Entries added to ``results.json`` after the measurements (nothing by default)."""
        return {}

    def eval_batches(self, split: str) -> list[Any]:
        """The held-out batches of ``"retain_eval"`` or ``"forget_eval"`` (built once)."""
        if split not in self._eval_batches:
            stop = self.eval_batch_size if self._quick else None
            examples = _take(getattr(self._data, f"{split}_examples")(), stop=stop)
            self._eval_batches[split] = _batches(self._data, examples, split, self.eval_batch_size)
        return self._eval_batches[split]

    # ----------------------------------------------------------------------------------------- stages
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._collect_grad_norms(trainer)  # the previous step's

    def _collect_grad_norms(self, trainer: pl.Trainer) -> None:
        prefix = "gradroute/grad_norm/"
        for key, value in trainer.callback_metrics.items():
            if key.startswith(prefix):
                self._grad_norms.setdefault(key.removeprefix(prefix), []).append(float(value))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collect_grad_norms(trainer)  # the last step's
        if trainer.is_global_zero:
            self.results = {"pre_ablation": self.held_out_losses(pl_module)}
            self.results["train_seconds"] = round(time.perf_counter() - self._started, 1)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        started, results, quick = time.perf_counter(), self.results, self._quick
        results.update(self.ablate(trainer, pl_module))
        results["post_ablation"] = self.held_out_losses(pl_module)
        steps = min(self.coherence_steps, 1) if quick else self.coherence_steps
        if steps:
            limit = self.eval_batch_size if quick else None
            coherence = coherence_finetune_on(
                pl_module, self._data, self.loss_fn, steps, self.coherence_lr, self.eval_batch_size, limit
            )
            results["coherence"] = coherence.to_dict()
        results["final"] = self.held_out_losses(pl_module)
        attacks = {str(budget): self.attack(pl_module, budget) for budget in self.attack_budgets}
        results["attack"] = attacks[str(self.attack_budgets[0])]
        if self._budget_list:
            results["attacks"] = attacks
        if self._grad_norms:
            results["grad_norms"] = {k: sum(v) / len(v) for k, v in sorted(self._grad_norms.items())}
        results.update(self.metadata(trainer, pl_module))
        results.update(
            parameters=sum(p.numel() for p in pl_module.parameters()),
            steps_trained=trainer.global_step,
            evaluation_seconds=round(time.perf_counter() - started, 1),
        )
        path = self.write_results(results)
        summary = {k: results[k] for k in ("pre_ablation", "post_ablation", "final")}
        rank_zero_info(
            f"unlearning results: {path}\n{json.dumps(summary)}\n"
            f"lowest forget loss under the retraining attack: {results['attack']['lowest_forget']:.4f}"
        )

    def attack(self, pl_module: pl.LightningModule, examples: int) -> dict[str, Any]:
        """The retraining attack (stage 4) with ``examples`` attack examples, from ``pl_module`` as it is now
        (restored afterwards); what ``results.json`` holds under ``attack``. Call it after ``setup``."""
        pool, quick = self._data.attack_pool_examples(), self._quick
        size = min(examples, len(pool), self.eval_batch_size if quick else len(pool))

        def attack_batches(seed: int) -> list[Any]:
            drawn = [pool[i] for i in random.Random(seed).sample(range(len(pool)), size)]
            return _batches(self._data, drawn, "attack_pool", self.attack_batch_size or size)

        by_lr = {
            lr: retraining_attack(
                pl_module,
                self.loss_fn,
                attack_batches,
                eval_fn=lambda m: self.held_out_losses(m, self.attack_metrics),
                steps=1 if quick else self.attack_steps,
                lr=lr,
                seeds=range(1 if quick else self.attack_seeds),
                eval_every=1 if quick else self.attack_eval_every,
            )
            for lr in self.attack_lrs
        }
        best = min(self.attack_lrs, key=lambda lr: by_lr[lr].lowest_loss)
        attack = {
            "examples": size,
            "lowest_forget": by_lr[best].lowest_loss,
            "lowest_step": by_lr[best].lowest_step,
            "lowest_lr": best,
            "curves": by_lr[best].curves,
            "eval_steps": by_lr[best].eval_steps,
            "by_lr": {
                str(lr): {"lowest_forget": a.lowest_loss, "lowest_step": a.lowest_step, "curves": a.curves}
                for lr, a in by_lr.items()
            },
        }
        if self.target_loss is not None:
            attack.update(target_loss=self.target_loss, steps_to_recover=recovery_steps(attack, self.target_loss))
        return attack
