"""UnlearningEvaluation (the core's callback for any causal LM) on a tiny HF Llama built from a config, with a toy
data module implementing the UnlearningData / CoherenceData protocols: stage losses, the ablation hook, the
attack's draws and lowest loss, the protocol errors, and one run under ddp_spawn."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from era_models import SEQ, VOCAB, llama
from helpers import DDP, trainer_kwargs
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_gradroute import GradientRoutingCallback, Route, Target
from lightning_gradroute.evaluation import UnlearningEvaluation, mean_loss, next_token_loss, recovery_steps


class TinyLM(pl.LightningModule):
    """A tiny HF Llama as ``self.model``; ``forward(input_ids=...)`` returns the HF output (with ``.logits``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = llama()

    def forward(self, input_ids: Tensor) -> Any:
        return self.model(input_ids=input_ids)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return next_token_loss(self, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def pad(examples: Sequence[list[int]]) -> dict[str, Tensor]:
    ids = torch.zeros(len(examples), SEQ, dtype=torch.long)
    mask = torch.zeros(len(examples), SEQ, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example)], mask[row, : len(example)] = torch.tensor(example), 1
    return {"input_ids": ids, "attention_mask": mask}


def sequences(n: int, step: int, seed: int) -> list[list[int]]:
    """Counting sequences of 3 to SEQ tokens: retain count up (step 1), forget count down (step -1)."""
    gen = random.Random(seed)
    return [[(start + step * i) % VOCAB for i in range(gen.randint(3, SEQ))] for start in range(n)]


class ToyData(pl.LightningDataModule):
    """Implements both protocols; ``collated`` records each ``collate_examples`` call as ``(split, examples)``."""

    def __init__(self) -> None:
        super().__init__()
        self.sets = {
            "retain_eval": sequences(10, 1, 0),
            "forget_eval": sequences(6, -1, 1),
            "attack_pool": sequences(9, -1, 2),
            "coherence_train": sequences(4, 1, 3),
            "coherence_val": sequences(5, 1, 4),
        }
        self.collated: list[tuple[str, list[list[int]]]] = []

    def train_dataloader(self) -> DataLoader:
        return DataLoader(sequences(16, 1, 5) + sequences(16, -1, 6), batch_size=8, shuffle=True, collate_fn=pad)

    def retain_eval_examples(self) -> list[list[int]]:
        return self.sets["retain_eval"]

    def forget_eval_examples(self) -> list[list[int]]:
        return self.sets["forget_eval"]

    def attack_pool_examples(self) -> list[list[int]]:
        return self.sets["attack_pool"]

    def coherence_train_examples(self) -> list[list[int]]:
        return self.sets["coherence_train"]

    def coherence_val_examples(self) -> list[list[int]]:
        return self.sets["coherence_val"]

    def collate_examples(self, examples: Sequence[list[int]], split: str) -> dict[str, Tensor]:
        self.collated.append((split, list(examples)))
        return pad(examples)


def hf_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The loss computed independently: HF's own shifted loss, pad targets ignored."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model.model(input_ids=batch["input_ids"], labels=labels).loss


def independent(model: nn.Module, data: ToyData) -> dict[str, float]:
    """Retain / forget loss: the sets batched by 4 by hand, scored with :func:`hf_loss`."""
    sets = {split: data.sets[f"{split}_eval"] for split in ("retain", "forget")}
    return {split: mean_loss(model, [pad(s[i : i + 4]) for i in range(0, len(s), 4)], hf_loss)
            for split, s in sets.items()}  # fmt: skip


class ZeroingEvaluation(UnlearningEvaluation):
    """Its ablation zeroes block 0's MLP output weights; it records the independent losses around it."""

    def ablate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        data = trainer.datamodule
        self.seen = {"before": independent(pl_module, data)}
        with torch.no_grad():
            pl_module.model.model.layers[0].mlp.down_proj.weight.zero_()
        self.seen["after"] = independent(pl_module, data)
        return {"zeroed": "model.model.layers.0.mlp.down_proj"}


def evaluation(cls: type = UnlearningEvaluation, **overrides: Any) -> UnlearningEvaluation:
    kwargs: dict[str, Any] = dict(coherence_steps=3, coherence_lr=1e-3, attack_steps=4, attack_lr=[1e-3, 3e-2],
                                  attack_examples=5, attack_seeds=2, target_loss=100.0, eval_batch_size=4)  # fmt: skip
    return cls(**(kwargs | overrides))


@pytest.mark.timeout(120)
def test_stages_match_an_independent_loss_and_the_attack_draws_and_reports_its_lowest_loss(tmp_path: Path) -> None:
    pl.seed_everything(0)
    lm, data, callback = TinyLM(), ToyData(), evaluation(ZeroingEvaluation)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, callbacks=[callback])).fit(lm, data)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {
        "pre_ablation", "train_seconds", "zeroed", "post_ablation", "coherence", "final", "attack", "parameters",
        "steps_trained", "evaluation_seconds",
    }  # fmt: skip
    for stage, expected in (("pre_ablation", callback.seen["before"]), ("post_ablation", callback.seen["after"]),
                            ("final", independent(lm, data))):  # fmt: skip
        assert results[stage] == pytest.approx(expected, rel=1e-5), stage
    assert results["post_ablation"]["forget"] != pytest.approx(results["pre_ablation"]["forget"], rel=1e-3)
    coherence = results["coherence"]
    assert len(coherence["curve"]) == 4 and coherence["best_loss"] == min(coherence["curve"])
    assert results["steps_trained"] == 4 and results["zeroed"] == "model.model.layers.0.mlp.down_proj"

    attack = results["attack"]
    assert attack["examples"] == 5 and attack["eval_steps"] == [0, 1, 2, 3, 4]
    assert set(attack["by_lr"]) == {"0.001", "0.03"}
    step0 = attack["curves"]["forget"][0]
    assert step0 == pytest.approx(results["final"]["forget"], rel=1e-5)
    assert attack["lowest_forget"] <= step0
    assert attack["lowest_forget"] == min(min(a["curves"]["forget"]) for a in attack["by_lr"].values())
    assert attack["by_lr"][str(attack["lowest_lr"])]["lowest_forget"] == attack["lowest_forget"]
    assert attack["lowest_forget"] < step0 - 0.1, "3e-2 for 4 steps re-learns the forget sequences"
    assert attack["target_loss"] == 100.0 and attack["steps_to_recover"] == 0 == recovery_steps(attack, 100.0)
    # every seed of every rate trains on random.Random(seed).sample(pool, 5) (the paper's draw), as one batch
    drawn = [examples for split, examples in data.collated if split == "attack_pool"]
    pool = data.sets["attack_pool"]
    assert drawn == [random.Random(seed).sample(pool, 5) for _ in range(2) for seed in range(2)]


@pytest.mark.timeout(120)
def test_attack_budgets_run_one_attack_each_and_the_first_is_the_attack(tmp_path: Path) -> None:
    pl.seed_everything(0)
    lm, data = TinyLM(), ToyData()
    callback = evaluation(coherence_steps=0, attack_examples=[3, 5], attack_lr=1e-3)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[callback])).fit(lm, data)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["attacks"]) == {"3", "5"} and results["attack"] == results["attacks"]["3"]
    assert [results["attacks"][b]["examples"] for b in ("3", "5")] == [3, 5]
    pool = data.sets["attack_pool"]
    drawn = [examples for split, examples in data.collated if split == "attack_pool"]
    assert drawn == [random.Random(seed).sample(pool, n) for n in (3, 5) for seed in range(2)]
    # the public attack on the final model gives what fit recorded (the model was restored after each)
    assert callback.attack(lm, 5)["lowest_forget"] == pytest.approx(results["attacks"]["5"]["lowest_forget"], rel=1e-6)
    for bad in ([], [3, 3], [0], 2.5):
        with pytest.raises(ValueError, match="attack_examples must be"):
            evaluation(attack_examples=bad)


def test_a_data_object_missing_a_protocol_member_gets_a_one_line_error(tmp_path: Path) -> None:
    class NoAttack:
        def retain_eval_examples(self) -> list: return []  # noqa: E704
        def forget_eval_examples(self) -> list: return []  # noqa: E704
        def collate_examples(self, examples: Sequence, split: str) -> Any: return examples  # noqa: E704

    with pytest.raises(TypeError, match=r"^UnlearningEvaluation: NoAttack does not implement UnlearningData: it lacks "
                                        r"attack_pool_examples \(see [^\n]*\)$"):  # fmt: skip
        UnlearningEvaluation(data=NoAttack())  # type: ignore[arg-type]

    class RetainOnly(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return ToyData().train_dataloader()

    class NoCoherence(ToyData):
        coherence_train_examples = coherence_val_examples = None  # type: ignore[assignment]

    for data, kwargs, match in (
        (RetainOnly(), {}, "RetainOnly does not implement UnlearningData: it lacks attack_pool_examples, "
                           "collate_examples, forget_eval_examples, retain_eval_examples"),
        (NoCoherence(), {"coherence_steps": 1}, r"UnlearningEvaluation\(coherence_steps=1\): NoCoherence does not "
                                                "implement CoherenceData: it lacks coherence_train_examples, "
                                                "coherence_val_examples"),
        (None, {}, "pass data=..."),
    ):  # fmt: skip
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=[UnlearningEvaluation(**kwargs)]))
        with pytest.raises((TypeError, ValueError), match=match):
            if data is None:
                trainer.fit(TinyLM(), train_dataloaders=ToyData().train_dataloader())
            else:
                trainer.fit(TinyLM(), data)
    UnlearningEvaluation(data=NoCoherence())  # without a coherence fine-tune its members are not needed


def test_arguments_and_callback_order_are_checked(tmp_path: Path) -> None:
    for kwargs, match in (
        ({"attack_lr": [1e-3, 1e-3]}, "attack_lr must be a positive number or distinct ones"),
        ({"attack_lr": -1.0}, "attack_lr"),
        ({"attack_metrics": ["retain"]}, "attack_metrics must include 'forget'"),
        ({"attack_metrics": ["forget", "forget_tokens"]}, r"among \('retain', 'forget'\)"),
        ({"attack_seeds": 0}, "attack_seeds must be an int >= 1, got 0"),
        ({"coherence_steps": -1}, "coherence_steps must be an int >= 0"),
    ):
        with pytest.raises(ValueError, match=match):
            UnlearningEvaluation(**kwargs)
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        UnlearningEvaluation(loss_fn="cross_entropy")  # type: ignore[arg-type]
    routing = GradientRoutingCallback({"mlp": Target("model.model.layers.0.mlp.act_fn")},
                                      [Route("forget", "mlp", {"0:8": 0.0})])  # fmt: skip
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=[UnlearningEvaluation(), routing]))
    with pytest.raises(ValueError, match="list it after the GradientRoutingCallback"):
        trainer.fit(TinyLM(), ToyData())


class CountingWrites(UnlearningEvaluation):
    """Appends the rank that writes results to ``<log dir>/writers.txt``."""

    def write_results(self, results: dict[str, Any]) -> Path:
        path = super().write_results(results)
        with open(path.parent / "writers.txt", "a") as file:
            file.write(f"{dist.get_rank() if dist.is_initialized() else -1}\n")
        return path


@pytest.mark.timeout(180)
def test_under_ddp_spawn_rank_zero_evaluates_and_writes_once(tmp_path: Path) -> None:
    pl.seed_everything(0)
    callback = evaluation(CountingWrites, coherence_steps=1, attack_steps=1, attack_lr=1e-3, attack_seeds=1)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[callback], **DDP)).fit(TinyLM(), ToyData())
    assert (tmp_path / "writers.txt").read_text() == "0\n"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps_trained"] == 2 and results["attack"]["eval_steps"] == [0, 1]
    assert results["attack"]["curves"]["forget"][0] == pytest.approx(results["final"]["forget"])
