"""Two-language v2 (English forget among romanised Russian): the data (one alphabet, shared tokens, forget share,
recall and SGTM's retain-mode labelling, ERA's soft labels), SGTM's three modes as the recipe routes them, the
evaluation's pieces, the sweep's resume / skip logic and report on a fake results tree, and the SGTM pipeline
under ddp_spawn."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from helpers import RECIPES, recipe_cli_args, trainer_kwargs

from gradroute_experiments.text.causal_lm import CausalLM, token_mean_loss
from gradroute_experiments.two_language.bilingual import BilingualDataModule
from gradroute_experiments.two_language.data import is_russian
from gradroute_experiments.two_language.evaluate import BilingualEvaluation, sgtm_forget_units
from gradroute_experiments.two_language.transliterate import transliterate
from lightning_gradroute import GradientRoutingCallback
from lightning_gradroute.cli import GradrouteCLI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import two_language_v2_sweep as sweep  # noqa: E402

V2 = RECIPES / "two_language" / "v2"
#: A tiny model with the recipes' head dim (16), so their dedicated units (MLP 0:64, dims 0:16) fit it.
TINY = {"model_type": "gpt_neo", "vocab_size": 1024, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
        "attention_types": [[["global", "local"], 1]], "intermediate_size": 128, "max_position_embeddings": 48,
        "window_size": 48, "activation_function": "gelu_new", "tie_word_embeddings": False,
        "bos_token_id": None, "eos_token_id": None}  # fmt: skip
SMALL = {"num_russian_stories": 600, "max_tokens": 48, "batch_size": 8, "num_val_stories": 8,
         "num_attack_stories": 16, "num_coherence_stories": 4, "num_coherence_val_stories": 4}  # fmt: skip


@pytest.fixture(scope="module")
def full() -> BilingualDataModule:
    """All the carried stories, as the benchmark trains on them (recall 0.9, SGTM's 25% retain mode)."""
    data = BilingualDataModule(recall=0.9, retain_masked_fraction=0.25, seed=1)
    data.setup("fit")
    return data


def test_romanisation_leaves_no_cyrillic_and_keeps_words_apart() -> None:
    assert transliterate("Жила-была Щука, ёжик и Юля.") == "Zhila-byla Shchuka, yozhik i Yulya."
    assert transliterate("Once upon a time") == "Once upon a time"
    assert not is_russian(transliterate("съешь эту"))


def test_both_languages_share_one_alphabet_and_most_tokens(full: BilingualDataModule) -> None:
    """No Cyrillic reaches the tokenizer, English is the ~15% forget domain, and the vocabulary is shared: most
    tokens of English stories occur in Russian ones too, and only some are mostly English (the rows the
    shared-rows control redraws)."""
    splits, summary = full.splits, full.summary()
    assert splits is not None and full.tokenizer is not None
    assert not any(is_russian(token) for token in full.tokenizer.get_vocab())
    assert 0.12 < summary["forget_token_fraction"] < 0.18 and summary["romanised"]
    assert summary["english_token_types_also_in_russian"] > 0.8 * summary["english_token_types"]
    assert 0 < summary["english_occurrences_of_mostly_english_tokens"] < 0.6
    assert full.token_weights is not None and 0 < int((full.token_weights < 0.5).sum()) < 0.2 * full.vocab_size


def test_recall_and_retain_mode_labels_per_story_and_per_token(full: BilingualDataModule) -> None:
    """floor(recall * n) English stories are labelled forget; a quarter of the unlabelled ones (unlabelled English
    included) are in retain mode, never a labelled one; window tokens carry 0 / 1 / 2 accordingly."""
    splits = full.splits
    assert splits is not None
    english = sum(splits.train_forget)
    labelled = [lab for lab, f in zip(splits.train_labelled, splits.train_forget) if f]
    assert sum(labelled) == int(0.9 * english) and not any(
        lab for lab, f in zip(splits.train_labelled, splits.train_forget) if not f
    )
    masked = full.retain_mode_draw(splits.train_labelled)
    assert masked == full.retain_mode_draw(splits.train_labelled)  # seeded
    assert not any(m and lab for m, lab in zip(masked, splits.train_labelled))
    assert sum(masked) == round(0.25 * (len(masked) - sum(splits.train_labelled)))
    assert any(m and f for m, f in zip(masked, splits.train_forget))  # unlabelled English can be in retain mode
    batch = next(iter(full.train_dataloader()))
    expected = batch["labelled"].long() + 2 * batch["retain_masked"].long()
    assert torch.equal(batch["route_labels"], expected) and set(batch["route_labels"].unique().tolist()) == {0, 1, 2}
    assert not bool((batch["labelled"] & ~batch["forget"]).any())


def test_soft_labels_are_the_papers_token_weights_in_labelled_stories() -> None:
    data = BilingualDataModule(**SMALL, recall=0.5, label_mode="soft")
    data.setup("fit")
    assert data.token_weights is not None
    batch = next(iter(data.train_dataloader()))
    expected = batch["labelled"].float() * (1 - data.token_weights[batch["input_ids"][:, 1:]])
    assert torch.equal(batch["route_labels"], expected) and batch["route_labels"].max() > 0
    with pytest.raises(ValueError, match="no retain mode"):
        BilingualDataModule(label_mode="soft", retain_masked_fraction=0.25)
    with pytest.raises(ValueError, match="retain_masked_fraction must be in"):
        BilingualDataModule(retain_masked_fraction=1.5)


def sgtm_setup(monkeypatch: pytest.MonkeyPatch) -> tuple[CausalLM, GradientRoutingCallback]:
    """The SGTM recipe's model and routing callback, at the tiny size, as the CLI builds them."""
    monkeypatch.setattr(sys, "argv", ["gradroute"])
    args = [*recipe_cli_args(V2 / "sgtm.yaml"), f"--model.init_args.config={json.dumps(TINY)}",
            "--model.init_args.warmup_steps=0", "--model.init_args.lr=0.01"]  # fmt: skip
    cli = GradrouteCLI(args=args, run=False)
    routing = next(cb for cb in cli.trainer.callbacks if isinstance(cb, GradientRoutingCallback))
    return cli.model, routing


def one_step(model: CausalLM, routing: GradientRoutingCallback, label: int, tmp_path: Path) -> CausalLM:
    """A copy of ``model`` after one training step on a batch whose every token has ``label``."""
    torch.manual_seed(0)
    ids = torch.randint(0, 1024, (4, 48))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "route_labels": torch.full((4, 47), label)}
    trained = copy.deepcopy(model)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=[copy.deepcopy(routing)]))
    trainer.fit(trained, train_dataloaders=DataLoader([batch], batch_size=None))
    trained.step_loss = float(trainer.callback_metrics["train/loss"])  # type: ignore[attr-defined]
    trained.batch = batch  # type: ignore[attr-defined]
    return trained


def test_sgtm_modes_do_what_sgtm_does(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Default mode (unlabelled data) updates everything; forget mode only the forget units (MLP 0:64, head 0)
    and what no route names (embeddings), not the other units nor the output biases; retain mode leaves the
    forget units exactly alone and does not see them in the forward pass."""
    model, routing = sgtm_setup(monkeypatch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mlp, q = "model.transformer.h.0.mlp.c_fc.weight", "model.transformer.h.1.attn.attention.q_proj.weight"

    def changed(trained: CausalLM, key: str, rows: slice) -> bool:
        return not torch.equal(trained.state_dict()[key][rows], before[key][rows])

    default, forget, retain_mode = (one_step(model, routing, label, tmp_path) for label in (0, 1, 2))
    assert all(changed(default, key, rows) for key in (mlp, q) for rows in (slice(None, 64 if key == mlp else 16),
               slice(64 if key == mlp else 16, None)))  # fmt: skip
    assert changed(forget, mlp, slice(None, 64)) and changed(forget, q, slice(None, 16))
    assert not changed(forget, mlp, slice(64, None)) and not changed(forget, q, slice(16, None))
    bias = "model.transformer.h.0.mlp.c_proj.bias"
    assert not changed(forget, bias, slice(None)) and changed(forget, "model.transformer.wte.weight", slice(None))
    assert not changed(retain_mode, mlp, slice(None, 64)) and not changed(retain_mode, q, slice(None, 16))
    assert changed(retain_mode, mlp, slice(64, None))
    # The retain-mode step's loss is that of the model without its forget units; the default step's is not.
    units = {k: (dim, list(v)) for k, (dim, v) in sgtm_forget_units(routing_router(model, routing)).items()}
    hidden = copy.deepcopy(model)
    from lightning_gradroute.era import zero_units

    zero_units(hidden, units)
    with torch.no_grad():
        assert retain_mode.step_loss == pytest.approx(float(token_mean_loss(hidden, retain_mode.batch)), abs=1e-5)
        assert default.step_loss == pytest.approx(float(token_mean_loss(model, default.batch)), abs=1e-5)
        assert default.step_loss != pytest.approx(retain_mode.step_loss, abs=1e-4)


def routing_router(model: CausalLM, routing: GradientRoutingCallback) -> Any:
    """``routing``'s router attached to a copy of ``model`` (what the evaluation reads at train end)."""
    router = copy.deepcopy(routing).router
    return router.attach(copy.deepcopy(model))


def test_sgtm_forget_units_are_the_retain_modes_hidden_units(monkeypatch: pytest.MonkeyPatch) -> None:
    model, routing = sgtm_setup(monkeypatch)
    units = sgtm_forget_units(routing_router(model, routing))
    assert units["model.transformer.h.0.mlp.c_fc.weight"] == (0, list(range(64)))
    assert units["model.transformer.h.1.attn.attention.out_proj.weight"] == (1, list(range(16)))
    assert "model.transformer.h.0.mlp.c_proj.bias" not in units  # no unit of it is the forget mode's alone
    with pytest.raises(ValueError, match="must name known, other labels"):
        sgtm_forget_units(routing_router(model, routing), retain_mode="nope")


def test_evaluation_refuses_a_setup_that_is_not_its_method(tmp_path: Path) -> None:
    data = BilingualDataModule(**SMALL)
    for evaluation, model, match in (
        (BilingualEvaluation("sgtm"), CausalLM(TINY), "SGTM needs a GradientRoutingCallback"),
        (BilingualEvaluation("token_filtering"), CausalLM(TINY), "token_filter_threshold"),
        (BilingualEvaluation("data_filtering"), CausalLM(TINY), "drop_labelled_forget"),
    ):
        with pytest.raises(ValueError, match=match):
            pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=[evaluation])).fit(model, data)
    with pytest.raises(ValueError, match="attack_budgets"):
        BilingualEvaluation(attack_budgets=[0])
    with pytest.raises(ValueError, match="coherence_steps is ERA's"):
        BilingualEvaluation("sgtm", coherence_steps=3)


# ---------------------------------------------------------------------------------------------------- the sweep
def fake_result(cell: sweep.Cell, forget: float) -> dict[str, Any]:
    """A results.json as BilingualEvaluation writes it, with a forget curve that falls from ``forget``."""
    curve = [forget, forget - 0.5, forget - 1.0]
    attack = {"lowest_forget": curve[-1], "eval_steps": [0, 8, 16], "by_lr": {"0.001": {"curves": {"forget": curve}}}}
    return {
        "final": {"retain": 2.0 + 0.01 * cell.seed, "forget": forget}, "pre_ablation": {"forget": 2.5},
        "attacks": {b: attack for b in sweep.BUDGETS}, "parameters": 1000, "tokens_trained": 5000,
        "curves": {"step": [10, 20], "retain": [3.0, 2.5], "forget": [3.5, 3.0]},
        "data": {"vocab_size": 1024, "batch_size": 16, "max_tokens": 128, "train_stories": 10,
                 "train_forget_stories": 2, "forget_token_fraction": 0.15, "retain_val_stories": 4,
                 "forget_val_stories": 4, "attack_pool_stories": 8},
    }  # fmt: skip


def test_sweep_skips_committed_cells_commits_each_run_and_renders_what_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forget = {"plain": 2.0, "scratch": 6.0, "sgtm": 4.0, "data_filtering": 5.0}
    done: set[Path] = set()
    trained, commits = [], []

    def fake_fit(cli_args: list[str], run_dir: Path, env: Any = None) -> dict[str, float]:
        cell = next(c for c in cells if c.name == run_dir.name)
        trained.append(cell.name)
        (run_dir).mkdir(parents=True, exist_ok=True)
        (run_dir / "results.json").write_text(json.dumps(fake_result(cell, forget[cell.method] + 0.1 * cell.seed)))
        return {"wall": 1.0, "cpu": 1.0}

    monkeypatch.setattr(sweep, "fit_timed", fake_fit)
    monkeypatch.setattr(sweep, "committed", lambda path: path in done)
    monkeypatch.setattr(sweep, "commit", lambda paths, message: (done.update(paths), commits.append(message)))
    cells = [sweep.Cell("0.24M", m, 0.9 if sweep.METHODS[m][2] else None, s) for s in (0, 1) for m in forget]
    results = tmp_path / "results"
    done_first = cells[0]
    sweep.run_cell(done_first, tmp_path / "runs", results, do_commit=True)
    for cell in cells:  # the first is committed now, so it is skipped
        sweep.run_cell(cell, tmp_path / "runs", results, do_commit=True)
    assert trained == [c.name for c in cells] and len(commits) == len(cells)
    assert done == {results / c.name / f for c in cells for f in ("results.json", "seconds.json")}
    assert "--data.init_args.recall=0.9" in cells[2].cli_args(tmp_path) and "1.1M" in sweep.SIZES

    (results / "stray_s9").mkdir()  # not a cell of the plan: ignored
    files = sweep.render(results, tmp_path / "report", "cmd")
    rows = json.loads(files[1].read_text())["rows"]
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == set(forget) and all(r["seeds"] == 2 for r in rows)
    sgtm = by_method["sgtm"]
    assert sgtm["retain_cost"] == pytest.approx(0.0) and sgtm["forget"] == pytest.approx(4.05)
    assert sgtm["to_plain_64"] == 16.0 and not sgtm["to_plain_64_all"]  # 3.0 (or 3.1) never reaches plain's 2.0
    assert sgtm["to_scratch_64"] == 0.0 and sgtm["to_scratch_64_all"]  # it starts below scratch's lowest
    # Paired by seed: SGTM's lowest forget loss is 1.0 below data filtering's in both seeds, its retain cost equal.
    (versus,) = [r for r in json.loads(files[1].read_text())["comparisons"] if r["versus"] == "data_filtering"]
    assert versus["method"] == "sgtm" and versus["seeds"] == 2 and versus["called"]
    assert versus["lowest"] == pytest.approx(-1.0) and versus["retain_cost"] == pytest.approx(0.0)
    markdown = files[0].read_text()
    assert "| 0.24M | SGTM | 0.9 | 2 |" in markdown and "≥ 16.0" in markdown and files[2].stat().st_size > 0


@pytest.mark.timeout(150)
def test_sgtm_pipeline_under_ddp_spawn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three labels, parameter routes, the retain-mode masks, RoutedAdamW and the evaluation's ablation and
    attacks, 2 processes (the data is set up here, so the workers receive its splits)."""
    model, routing = sgtm_setup(monkeypatch)
    data = BilingualDataModule(**SMALL, recall=0.5, retain_masked_fraction=0.25)
    data.setup("fit")
    evaluation = BilingualEvaluation("sgtm", attack_budgets=[4, 8], attack_steps=2, attack_batch_size=4,
                                     attack_eval_every=1, eval_batch_size=8)  # fmt: skip
    kwargs: dict[str, Any] = dict(max_steps=3, strategy="ddp_spawn", devices=2, callbacks=[routing, evaluation])
    pl.Trainer(**trainer_kwargs(tmp_path, **kwargs)).fit(model, data)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["units_zeroed"]["model.transformer.h.0.mlp.c_fc.weight"] == 64
    assert results["post_ablation"] != results["pre_ablation"] and set(results["attacks"]) == {"4", "8"}
    assert results["data"]["retain_masked_token_fraction"] > 0 and results["method"] == "sgtm"
