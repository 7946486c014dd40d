"""TinyStories unlearning experiment: data module, model, DEMix and RMU baselines, the after-training pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer_kwargs

from gradroute_experiments.datafiles import DATA_DIR
from lightning_gradroute import GradientRoutingCallback, ParameterTarget, Route, Target
from lightning_gradroute.evaluation import mean_loss, retraining_attack
from lightning_gradroute.expansion import Expansion
from gradroute_experiments.text.causal_lm import next_token_losses, token_mean_loss, weighted_token_losses
from gradroute_experiments.text.stories import read_stories
from gradroute_experiments.text.tokenizer import EOS_TEXT, load_tokenizer
from gradroute_experiments.tinystories.data import PAPER_FORGET_WORDS, TinyStoriesDataModule
from gradroute_experiments.tinystories.demix import DEMixMLP, demix_experts, keep_retain_experts
from gradroute_experiments.tinystories.evaluate import METHODS, UnlearningEvaluation
from gradroute_experiments.tinystories.model import TinyStoriesLM
from gradroute_experiments.tinystories.rmu import RMU
from lightning_gradroute.text_labels import keyword_regex

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = DATA_DIR / "tinystories" / "tinystories_valid_sample.txt"
GPT2 = DATA_DIR / "gpt2-tokenizer" / "tokenizer.json.gz"
SMALL_DATA = {
    "tokenizer": "bpe",
    "bpe_vocab_size": 1024,
    "truncate_chars": 300,
    "max_tokens": 48,
    "batch_size": 8,
    "num_val_stories": 16,
    "num_attack_stories": 8,
    "num_coherence_stories": 8,
    "num_coherence_val_stories": 16,
}
TINY_MODEL = {
    "vocab_size": 1024,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "max_position_embeddings": 48,
    "window_size": 16,
}


@pytest.fixture(scope="module")
def dm() -> TinyStoriesDataModule:
    data = TinyStoriesDataModule(**SMALL_DATA, oversight=0.5, seed=1)
    data.setup("fit")
    return data


# ------------------------------------------------------------------------------------------------ data
def test_carried_files_match_their_readme_checksums() -> None:
    import hashlib

    for path, readme in ((SAMPLE, SAMPLE.parent / "README.md"), (GPT2, GPT2.parent / "README.md")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest in readme.read_text(), f"{path.name}: sha256 {digest} is not the one in its README"


def test_read_stories_splits_whole_stories() -> None:
    stories = read_stories(SAMPLE)
    assert len(stories) == 2386
    assert all(s == s.strip() and EOS_TEXT not in s for s in stories)


def test_gpt2_tokenizer_loads_from_the_gzip() -> None:
    tok = load_tokenizer(str(GPT2))
    assert tok.get_vocab_size() == 50257 and tok.token_to_id(EOS_TEXT) == 50256
    assert tok.encode(" forest").ids == [8222]  # transformers 5's ignored vocab_file kwarg would give [0]
    with pytest.raises(FileNotFoundError, match="neither"):
        load_tokenizer("no/such/tokenizer.json")


def test_forget_split_uses_whole_words_on_the_truncated_story(dm: TinyStoriesDataModule) -> None:
    assert dm.tokenizer is not None and dm.splits is not None
    pattern = keyword_regex(PAPER_FORGET_WORDS)
    decode = dm.tokenizer.decode
    for ids in dm.splits.forget_val + dm.splits.attack_pool:
        assert pattern.search(decode(ids[1:]))
    for ids in dm.splits.retain_val:
        assert not pattern.search(decode(ids[1:]))
    for ids, forget in zip(dm.splits.train, dm.splits.train_forget):
        # the token-truncated text can lose the word, never gain one
        assert forget or not pattern.search(decode(ids[1:]))


def test_partial_oversight_and_filtering(dm: TinyStoriesDataModule) -> None:
    splits = dm.splits
    assert splits is not None
    n_forget = sum(splits.train_forget)
    assert sum(splits.train_labelled) == n_forget // 2
    assert all(f or not lab for f, lab in zip(splits.train_forget, splits.train_labelled))
    filtered = TinyStoriesDataModule(**SMALL_DATA, oversight=0.5, seed=1, drop_labelled_forget=True)
    filtered.setup("fit")
    assert filtered.splits is not None
    assert not any(filtered.splits.train_labelled)
    assert sum(filtered.splits.train_forget) == n_forget - n_forget // 2
    assert len(filtered.splits.train) == len(splits.train) - n_forget // 2


def test_train_batches_carry_next_token_soft_labels(dm: TinyStoriesDataModule) -> None:
    assert dm.token_weights is not None
    batch = next(iter(dm.train_dataloader()))
    ids, labels = batch["input_ids"], batch["route_labels"]
    assert ids.shape[0] == 8 and labels.shape == (8, ids.shape[1] - 1) and labels.is_floating_point()
    assert (ids[:, 0] == dm.eos_id).all()
    expected = (1 - dm.token_weights[ids[:, 1:]]) * batch["labelled"][:, None]
    torch.testing.assert_close(labels, expected)
    # the forget words themselves are among the most routed tokens
    for word in (" tree", " forest"):
        ids = dm.tokenizer.encode(word).ids  # type: ignore[union-attr]
        assert len(ids) == 1 and dm.token_weights[ids[0]] < 0.1


def test_document_labels_and_ground_truth_validation() -> None:
    data = TinyStoriesDataModule(**SMALL_DATA, labels="document", oversight=1.0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["route_labels"].tolist() == batch["labelled"].long().tolist()
    assert torch.equal(batch["labelled"], batch["forget"])  # full oversight
    val = list(data.val_dataloader())
    assert val[0]["route_labels"].tolist()[:4] == [0, 1, 0, 1]  # interleaved retain / forget
    assert sum(int(b["route_labels"].sum()) for b in val) == 16


def test_data_module_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="oversight"):
        TinyStoriesDataModule(oversight=1.5)
    with pytest.raises(ValueError, match="labels"):
        TinyStoriesDataModule(labels="tokens")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tokens"):
        TinyStoriesDataModule(max_tokens=1)
    with pytest.raises(FileNotFoundError, match="tinystories_valid_sample.txt"):
        TinyStoriesDataModule(data_dir=str(tmp_path))
    too_many = TinyStoriesDataModule(**{**SMALL_DATA, "num_val_stories": 400})
    with pytest.raises(ValueError, match="held-out"):
        too_many.setup("fit")


# ---------------------------------------------------------------------------------------------- model
def test_model_losses_skip_padding_and_check_vocab(dm: TinyStoriesDataModule) -> None:
    torch.manual_seed(0)
    lm = TinyStoriesLM(**TINY_MODEL)
    assert not lm.model.config.tie_word_embeddings
    batch = next(iter(dm.train_dataloader()))
    losses, valid = lm.token_losses(batch)
    mask = batch["attention_mask"]
    assert valid.tolist() == (mask[:, :-1] * mask[:, 1:]).bool().tolist()
    # a padded story scores the same alone, without padding
    row = int(valid.sum(1).argmin())
    n = int(mask[row].sum())
    alone, _ = next_token_losses(
        lm.model, {"input_ids": batch["input_ids"][row : row + 1, :n], "attention_mask": mask[row : row + 1, :n]}
    )
    torch.testing.assert_close(losses[row, : n - 1], alone[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        TinyStoriesLM(hidden_size=30, num_heads=4)


def test_demix_experts_choose_per_story_and_ablate_to_the_retain_expert(dm: TinyStoriesDataModule) -> None:
    torch.manual_seed(0)
    lm = TinyStoriesLM(**TINY_MODEL, demix=True)
    mixes = [m for m in lm.modules() if isinstance(m, DEMixMLP)]
    assert len(mixes) == 2
    x = torch.randn(3, 5, 32)
    with demix_experts(lm, torch.tensor([True, False, True])):
        out = mixes[0](x)
    torch.testing.assert_close(out[0], mixes[0].forget(x)[0])
    torch.testing.assert_close(out[1], mixes[0].retain(x)[1])
    assert mixes[0].use_forget is None  # reset outside the block
    # forget stories' gradients reach only the forget experts, retain stories' only the retain experts
    batch = dict(next(iter(dm.train_dataloader())))
    batch["route_labels"] = torch.tensor([1] + [0] * 7)
    losses, valid = lm.token_losses(batch)
    losses[0][valid[0]].sum().backward()
    assert mixes[0].forget.c_fc.weight.grad.abs().sum() > 0
    assert mixes[0].retain.c_fc.weight.grad.abs().sum() == 0  # where() sends the retain path zeros
    retain_expert = mixes[1].retain
    assert keep_retain_experts(lm) == 2
    assert lm.model.transformer.h[1].mlp is retain_expert and not lm.is_demix
    with pytest.raises(ValueError, match="one integer label per story"):
        TinyStoriesLM(**TINY_MODEL, demix=True).token_losses({**batch, "route_labels": torch.zeros(8, 3)})


# ------------------------------------------------------------------------------------------------ RMU
def test_rmu_trains_only_early_mlp_outputs_and_misdirects_forget(dm: TinyStoriesDataModule) -> None:
    torch.manual_seed(0)
    lm = TinyStoriesLM(**{**TINY_MODEL, "num_layers": 4})
    model = lm.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert dm.splits is not None
    forget = list(dm.batches(dm.splits.attack_pool, forget=True))
    retain = list(dm.batches(dm.splits.coherence_train))
    rmu = RMU(steps=30, lr=1e-2, alpha=1.0)  # an untrained model cannot tell forget from retain: small alpha
    assert rmu.resolved(model)["layer"] == 1  # block 4 of 8 -> block 1 of 4 (same relative depth)
    norm_before = RMU._residual(model, forget[0], 1).norm(dim=-1).mean()
    log = rmu(model, forget, retain)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"transformer.h.{i}.mlp.c_proj.{k}" for i in (0, 1) for k in ("weight", "bias")}
    assert all(p.requires_grad for p in model.parameters())  # restored
    assert log["steering_coef"] == pytest.approx(100 * (32 / 512) ** 0.5)
    # forget activations were pushed towards norm-`coef` random vectors, far beyond their initial norm
    norm_after = RMU._residual(model, forget[0], 1).norm(dim=-1).mean()
    assert norm_after > 1.5 * norm_before and log["final_forget_mse"] < log["steering_coef"] ** 2 / 32
    with pytest.raises(ValueError, match="last block"):
        RMU(layer=3)(model, forget, retain)


# ------------------------------------------------------------------------------------------- pipeline
def era_routing(add: int = 8) -> GradientRoutingCallback:
    return GradientRoutingCallback(
        targets={
            "routed": Target("model.transformer.h.0.mlp.act"),
            "unrouted": Target("model.transformer.h.1.mlp.act"),
        },
        routes=[
            Route("forget", "routed", {"original": -0.75, "expanded": 1.0}),
            Route("retain", "unrouted", {"expanded": 0.0}),
            Route("forget", "unrouted", {"expanded": 0.0}),
        ],
        expansions=[Expansion("model.transformer.h.*.mlp", preset="gpt_neo_mlp", add=add, output_init="match")],
        save_ablated=False,
    )


def param_routing() -> GradientRoutingCallback:
    """SGTM-style: forget tokens may change only MLP neurons 96: of the tiny model, retain tokens all others."""
    mlp = "model.transformer.h.*.mlp"
    targets = {
        "up": ParameterTarget(f"{mlp}.c_fc.weight", dim=0),
        "up_bias": ParameterTarget(f"{mlp}.c_fc.bias"),
        "down": ParameterTarget(f"{mlp}.c_proj.weight", dim=1),
    }
    routes = [Route(label, t, {units: 0.0}) for t in targets for label, units in (("forget", ":96"), ("retain", "96:"))]
    return GradientRoutingCallback(targets, routes, ablate="dedicated", ablate_label="forget", save_ablated=False)


def fit_method(method: str, tmp_path: Path, **trainer_args: Any) -> tuple[dict[str, Any], TinyStoriesLM]:
    """A few steps of ``method`` on a tiny model, then the whole evaluation pipeline; returns results.json."""
    pl.seed_everything(0)
    data = TinyStoriesDataModule(
        **SMALL_DATA,
        labels="frequency" if method in ("era", "param_routing", "token_filtering") else "document",
        drop_labelled_forget=method == "data_filtering",
        oversight=0.5,
    )
    lm = TinyStoriesLM(
        **TINY_MODEL,
        demix=method == "demix",
        l1_coeff=1e-4 if method == "era" else 0.0,
        l1_modules="model.transformer.h.0.mlp.act",
        lr=3e-3,
        warmup_steps=1,
        token_filter_threshold=0.5 if method == "token_filtering" else None,
        routed_optimizer=method == "param_routing",
    )
    evaluation = UnlearningEvaluation(
        method,
        coherence_steps=2,
        coherence_lr=1e-3,
        attack_steps=2,
        attack_lr=1e-3,
        attack_stories=4,
        attack_seeds=2,
        eval_batch_size=8,
        rmu=RMU(steps=2) if method == "rmu" else None,
    )
    routing = {"era": era_routing, "param_routing": param_routing}.get(method)
    callbacks = [routing(), evaluation] if routing else [evaluation]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=callbacks, **trainer_args))
    trainer.fit(lm, data)
    return json.loads((tmp_path / "results.json").read_text()), lm


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_train_ablate_finetune_attack(method: str, tmp_path: Path) -> None:
    results, lm = fit_method(method, tmp_path)
    assert results["method"] == method and results["oversight"] == 0.5 and results["steps_trained"] == 3
    for stage in ("pre_ablation", "post_ablation", "final"):
        assert set(results[stage]) == {"retain", "forget", "forget_tokens"}
        assert all(3 < v < 10 for v in results[stage].values())
    attack = results["attack"]
    assert attack["examples"] == 4 and {len(c) for c in attack["curves"].values()} == {3}
    assert attack["curves"]["forget"][0] == pytest.approx(results["final"]["forget"])
    assert attack["lowest_forget"] == min(attack["curves"]["forget"])
    assert ("coherence" in results) == (method in ("era", "param_routing", "demix"))
    changed = results["post_ablation"] != results["pre_ablation"]
    assert changed == (method in ("era", "param_routing", "demix", "rmu")), "only these change the model after training"
    mlp = lm.model.transformer.h[0].mlp
    assert not lm.is_demix and mlp.c_fc.out_features == 4 * TINY_MODEL["hidden_size"]  # ablated architecture
    if method == "data_filtering":
        assert results["data"]["train_labelled_forget_stories"] == 0
    if method == "rmu":
        assert results["rmu"]["layer"] == 0 and results["rmu"]["steps"] == 2
    if method == "demix":
        assert results["experts_removed"] == 2
    if method == "param_routing":
        assert results["units_zeroed"] == {
            f"model.transformer.h.{i}.mlp.{name}": 32
            for i in (0, 1)
            for name in ("c_fc.weight", "c_fc.bias", "c_proj.weight")
        }
        # zero input weights, bias and output weights get zero gradient: the coherence fine-tune cannot regrow them
        assert not mlp.c_fc.weight[96:].any() and not mlp.c_fc.bias[96:].any() and not mlp.c_proj.weight[:, 96:].any()


@pytest.mark.timeout(120)
def test_era_under_ddp_spawn_runs_the_pipeline_and_returns_the_contracted_model(tmp_path: Path) -> None:
    results, lm = fit_method("era", tmp_path, strategy="ddp_spawn", devices=2)
    assert results["method"] == "era" and results["post_ablation"] != results["pre_ablation"]
    # the main process reloaded rank 0's contracted weights into its own (never expanded) model
    assert lm.model.transformer.h[0].mlp.c_fc.weight.shape == (4 * TINY_MODEL["hidden_size"], TINY_MODEL["hidden_size"])


def test_retraining_attack_relearns_forget_stories_on_a_tiny_model(dm: TinyStoriesDataModule) -> None:
    torch.manual_seed(0)
    lm = TinyStoriesLM(**TINY_MODEL)
    assert dm.splits is not None
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    forget_val = list(dm.batches(dm.splits.forget_val, 8, forget=True))
    attack = retraining_attack(
        lm,
        token_mean_loss,
        next(dm.batches(dm.splits.attack_pool, 8, forget=True)),
        eval_fn=lambda m: mean_loss(m, forget_val, token_mean_loss),
        steps=5,
        lr=1e-2,
        seeds=[0, 1],
    )
    curve = attack.curves["forget"]
    assert curve[0] == pytest.approx(mean_loss(lm, forget_val, token_mean_loss))
    assert attack.lowest_loss < curve[0] - 0.5, "fine-tuning on forget stories lowers held-out forget loss"
    assert all(torch.equal(v, before[k]) for k, v in lm.state_dict().items()), "the attack restores the model"


def test_weighted_token_losses_weight_tokens_by_a_table(dm: TinyStoriesDataModule) -> None:
    torch.manual_seed(0)
    lm = TinyStoriesLM(**TINY_MODEL)
    assert dm.splits is not None and dm.token_weights is not None
    tree = dm.tokenizer.encode(" tree").ids[0]  # type: ignore[union-attr]
    with_tree = [ids for ids in dm.splits.forget_val if tree in ids[1:]]
    assert len(with_tree) >= 2
    batch = next(dm.batches(with_tree[:2] + dm.splits.forget_val[:2], 4, forget=True))
    forget_weights = 1 - dm.token_weights
    with torch.no_grad():
        losses, valid = lm.token_losses(batch)
    s = forget_weights[batch["input_ids"][:, 1:]] * valid
    expected = float((losses * s).sum() / s.sum())
    assert weighted_token_losses(lm, [batch], {"w": forget_weights})["w"] == pytest.approx(expected, rel=1e-5)
    # only routed tokens count: a weight table routing nothing but " tree" scores only those positions
    only_tree = torch.zeros_like(forget_weights)
    only_tree[tree] = 1.0
    hits = (batch["input_ids"][:, 1:] == tree) & valid
    only = weighted_token_losses(lm, [batch], {"tree": only_tree, "other": 1 - only_tree})
    assert only["tree"] == pytest.approx(float(losses[hits].mean()), rel=1e-5)
    assert only["other"] == pytest.approx(float(losses[valid & ~hits].mean()), rel=1e-5)
    with pytest.raises(ValueError, match="'none'"):
        weighted_token_losses(lm, [batch], {"none": torch.zeros_like(forget_weights)})


def test_evaluation_rejects_bad_setups(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="method"):
        UnlearningEvaluation("erase")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rmu settings"):
        UnlearningEvaluation("era", rmu=RMU())
    with pytest.raises(ValueError, match="attack_seeds"):
        UnlearningEvaluation("era", attack_seeds=0)
    data = TinyStoriesDataModule(**SMALL_DATA)
    for callbacks, model, match in (
        ([UnlearningEvaluation("era")], TinyStoriesLM(**TINY_MODEL), "add a GradientRoutingCallback"),
        (
            [UnlearningEvaluation("era"), era_routing()],
            TinyStoriesLM(**TINY_MODEL),
            "after the GradientRoutingCallback",
        ),
        ([UnlearningEvaluation("demix")], TinyStoriesLM(**TINY_MODEL), "demix=True"),
        ([era_routing(), UnlearningEvaluation("base")], TinyStoriesLM(**TINY_MODEL), "use 'era'"),
    ):
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=callbacks))
        with pytest.raises(ValueError, match=match):
            trainer.fit(model, data)


def test_dataset_id_loads_train_and_validation_splits_with_datasets(tmp_path: Path, monkeypatch: Any) -> None:
    """The online path (``dataset_id``), pointed at a local folder in the Hub layout (train / validation files)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    stories = read_stories(SAMPLE)
    folder = tmp_path / "stories"
    folder.mkdir()
    for split, chunk in (("train", stories[:1200]), ("validation", stories[1200:])):
        lines = [json.dumps({"story": s}) for s in chunk]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    data = TinyStoriesDataModule(
        **SMALL_DATA, dataset_id=str(folder), text_column="story", num_train_stories=1000, data_dir=str(tmp_path)
    )
    data.setup("fit")
    assert data.splits is not None
    assert len(data.splits.train) == 1000  # train[:1000]; the held-out sets come from the validation split
    train_texts = {data.tokenizer.decode(ids[1:]) for ids in data.splits.train}  # type: ignore[union-attr]
    held_out = data.splits.retain_val + data.splits.forget_val + data.splits.attack_pool
    assert not train_texts & {data.tokenizer.decode(ids[1:]) for ids in held_out}  # type: ignore[union-attr]


def test_rmu_tuning_scores_copies_on_the_held_out_split_and_keeps_the_retain_budget(
    dm: TinyStoriesDataModule, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    from lightning_gradroute.evaluation import mean_loss
    from gradroute_experiments.text.causal_lm import token_mean_loss
    from gradroute_experiments.tinystories.rmu_tuning import RMUTuning, choose

    with pytest.raises(ValueError, match="RMU: need steps >= 1"):  # a bad grid value fails at construction
        RMUTuning(steps=[0])
    with pytest.raises(ValueError, match="empty: \\['alphas'\\]"):
        RMUTuning(alphas=[])
    torch.manual_seed(0)
    lm = TinyStoriesLM(**{**TINY_MODEL, "num_layers": 4})
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    tuning = RMUTuning(layers=[1], steps=[3], steering_coefs=[None], alphas=[1.0], lrs=[1e-4, 5e-2], retain_budget=0.05)
    trainer = SimpleNamespace(
        datamodule=dm, log_dir=str(tmp_path), default_root_dir=str(tmp_path), is_global_zero=True, fast_dev_run=False
    )
    tuning.on_fit_end(trainer, lm)  # type: ignore[arg-type]
    assert all(torch.equal(p, before[n]) for n, p in lm.named_parameters())  # each setting ran on a copy
    results = json.loads((tmp_path / "rmu_tuning.json").read_text())
    assert dm.splits is not None
    assert results["base"]["forget"] == pytest.approx(
        mean_loss(lm, list(dm.batches(dm.splits.attack_pool, forget=True)), token_mean_loss)
    )
    small, large = results["settings"]
    assert (small["lr"], large["lr"]) == (1e-4, 5e-2) and small["steps"] == 3
    for row in (small, large):
        assert row["forget_increase"] == pytest.approx(row["forget"] - results["base"]["forget"])
        assert row["retain_increase"] == pytest.approx(row["retain"] - results["base"]["retain"])
    assert abs(large["forget_increase"]) > abs(small["forget_increase"])  # the settings really differ
    allowed = [r for r in results["settings"] if r["retain_increase"] <= 0.05]
    expected = max(allowed, key=lambda r: r["forget_increase"] - r["retain_increase"]) if allowed else None
    assert results["chosen"] == expected and "at most 0.05 nats" in results["rule"]
    rows = [{"forget_increase": f, "retain_increase": r} for f, r in [(3.0, 2.9), (1.5, 0.3), (0.1, 0.0)]]
    assert choose(rows, 0.5) == rows[1] and choose(rows, 0.01) == rows[2] and choose(rows, -1.0) is None
