"""Token-routing unlearning: the concept token set (frequency-ratio selection, token labels), the neuron ablation
range, the absorption metric, the evaluation pipeline, and the streamed web-text data of the paper-scale recipes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import transformers
from helpers import trainer_kwargs

from gradroute_experiments.datafiles import DATA_DIR
from lightning_gradroute import GradientRoutingCallback, Route, Target
from gradroute_experiments.text.causal_lm import CausalLM, weighted_token_losses
from gradroute_experiments.text.stories import read_stories
from gradroute_experiments.tinystories.data import TinyStoriesDataModule
from gradroute_experiments.token_unlearning.ablation import ablate_neurons, ablated_weight_norm
from gradroute_experiments.token_unlearning.evaluate import RetrainingProtocol, TokenUnlearningEvaluation
from gradroute_experiments.text.web_text import WebTextDataModule, read_documents
from lightning_gradroute.text_labels import TokenSetLabels, select_concept_tokens

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = DATA_DIR / "tinystories" / "tinystories_valid_sample.txt"
GPT2 = str(DATA_DIR / "gpt2-tokenizer" / "tokenizer.json.gz")
FOOD = ["food", "eat", "ate", "cake", "cookies", "apple", "hungry", "yummy", "lunch", "dinner"]
SMALL = {
    "tokenizer": "bpe", "bpe_vocab_size": 512, "truncate_chars": 300, "max_tokens": 48, "batch_size": 8,
    "num_val_stories": 8, "num_attack_stories": 6, "num_retain_pool_stories": 6, "num_coherence_stories": 4,
    "num_coherence_val_stories": 8,
}


# ------------------------------------------------------------------------------------------ token selection
def test_select_concept_tokens_ranks_by_the_frequency_ratio() -> None:
    retain = [[0, 0, 1, 2, 2, 2], [0, 1, 1, 2]]          # 10 tokens: 0 x3, 1 x3, 2 x4
    forget = [[3, 3, 3, 1, 4], [3, 4, 1, 0, 0, 5]]       # 11 tokens: 0 x2, 1 x2, 3 x4, 4 x2, 5 x1
    chosen = select_concept_tokens(retain, forget, vocab_size=6, top_k=3, min_forget_count=2)
    # 3 and 4 never occur in retain, whose count is floored at 0.1; 0 and 1 tie at (2/11) / (3/10): lower id first
    assert [t for t, _ in chosen] == [3, 4, 0]
    assert chosen[0][1] == pytest.approx((4 / 11) / (0.1 / 10)) and chosen[1][1] == pytest.approx((2 / 11) / 0.01)
    assert chosen[2][1] == pytest.approx((2 / 11) / (3 / 10))
    without_4 = select_concept_tokens(retain, forget, 6, top_k=3, min_forget_count=2, exclude=[4])
    assert [t for t, _ in without_4] == [3, 0, 1]
    # token 5 (seen once in forget) is eligible only from min_forget_count=1; token 2 (never in forget) never
    assert [t for t, _ in select_concept_tokens(retain, forget, 6, top_k=3, min_forget_count=1)] == [3, 4, 5]
    with pytest.raises(ValueError, match="only 4 tokens occur at least 2 times"):
        select_concept_tokens(retain, forget, 6, top_k=5, min_forget_count=2)
    with pytest.raises(ValueError, match="outside"):
        select_concept_tokens(retain, [[7]], 6, top_k=1, min_forget_count=1)
    with pytest.raises(ValueError, match="top_k"):
        select_concept_tokens(retain, forget, 6, top_k=0)


@pytest.fixture(scope="module")
def food() -> TinyStoriesDataModule:
    data = TinyStoriesDataModule(**SMALL, forget_words=FOOD, labels="tokens", route_top_k=6, route_min_count=3)
    data.setup("fit")
    return data


def test_token_labels_route_the_chosen_set_in_every_story(food: TinyStoriesDataModule) -> None:
    assert food.splits is not None and food.tokenizer is not None
    retain = [ids[1:] for ids, f in zip(food.splits.train, food.splits.train_forget) if not f]
    forget = [ids[1:] for ids, f in zip(food.splits.train, food.splits.train_forget) if f]
    expected = select_concept_tokens(retain, forget, food.vocab_size, 6, min_forget_count=3, exclude=[food.eos_id])
    assert food.route_token_ids == [t for t, _ in expected]
    assert food.route_token_ratios == pytest.approx([r for _, r in expected])
    ratios = food.route_token_ratios
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] > 1  # over-represented in forget stories
    batch = next(iter(food.train_dataloader()))
    ids, labels = batch["input_ids"], batch["route_labels"]
    assert labels.dtype == torch.long and labels.shape == (8, ids.shape[1] - 1)
    assert torch.equal(labels, torch.isin(ids[:, 1:], torch.tensor(food.route_token_ids)).long())
    summary = food.summary()["routed_tokens"]
    assert [r["id"] for r in summary] == food.route_token_ids and all("ratio" in r for r in summary)


def test_held_out_concept_tokens_are_every_other_chosen_one_and_never_routed() -> None:
    data = TinyStoriesDataModule(
        **SMALL, forget_words=FOOD, labels="tokens", route_top_k=6, route_min_count=3, route_held_out=2
    )
    data.setup("fit")
    assert data.splits is not None
    retain = [ids[1:] for ids, f in zip(data.splits.train, data.splits.train_forget) if not f]
    forget = [ids[1:] for ids, f in zip(data.splits.train, data.splits.train_forget) if f]
    chosen = [t for t, _ in select_concept_tokens(retain, forget, data.vocab_size, 6, 3, exclude=[data.eos_id])]
    # ranks 2 and 4 held out; ranks 1, 3, 5, 6 routed
    assert data.held_out_token_ids == [chosen[1], chosen[3]]
    assert data.route_token_ids == [chosen[0], chosen[2], chosen[4], chosen[5]]
    batch = next(iter(data.train_dataloader()))
    targets = batch["input_ids"][:, 1:]
    assert torch.equal(batch["route_labels"], torch.isin(targets, torch.tensor(data.route_token_ids)).long())
    summary = data.summary()
    assert [t["id"] for t in summary["held_out_tokens"]] == data.held_out_token_ids
    assert len(summary["routed_tokens"]) == 4
    for bad in ({"route_top_k": 6, "route_held_out": 4}, {"route_tokens": [" Lily"], "route_held_out": 1}):
        with pytest.raises(ValueError, match="route_held_out=.* at most route_top_k // 2"):
            TinyStoriesDataModule(labels="tokens", **bad)


def test_token_label_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="exactly one of route_tokens, route_top_k"):
        TinyStoriesDataModule(labels="tokens")
    with pytest.raises(ValueError, match="oversight"):
        TinyStoriesDataModule(labels="tokens", route_tokens=[" Lily"], oversight=0.5)
    with pytest.raises(ValueError, match="need labels='tokens'"):
        TinyStoriesDataModule(route_top_k=3)
    data = TinyStoriesDataModule(**SMALL, labels="tokens", route_tokens=[" Lily", " xylophonist"])
    with pytest.raises(ValueError, match=r"route_tokens entry ' xylophonist' is \d tokens"):
        data.setup("fit")


def test_token_set_labels_keep_ids_above_uint16() -> None:
    """Qwen2's vocabulary reaches 151,935: ids stay int64 (the reference stored them as uint16)."""
    ids = torch.tensor([[151643, 70000, 65535, 151000]])
    labels = TokenSetLabels([151000, 70000])({"input_ids": ids})
    assert labels.tolist() == [[1, 0, 1]]


# --------------------------------------------------------------------------------------------- ablation
def qwen2_mlp(neurons: int = 96) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(
        "qwen2", vocab_size=30, hidden_size=8, intermediate_size=neurons, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def test_ablation_zeroes_exactly_the_range_and_the_neurons_stay_dead() -> None:
    model = qwen2_mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert ablate_neurons(model, "model.layers.*.mlp", "0:80", preset="qwen2_mlp") == 160  # 80 per layer, 0..79
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp"
        for name in ("gate_proj", "up_proj"):  # rows 0..79 compute the neurons
            weight = model.get_parameter(f"{prefix}.{name}.weight")
            assert weight[:80].abs().sum() == 0 and torch.equal(weight[80:], before[f"{prefix}.{name}.weight"][80:])
        down = model.get_parameter(f"{prefix}.down_proj.weight")  # columns 0..79 read them
        assert down[:, :80].abs().sum() == 0 and torch.equal(down[:, 80:], before[f"{prefix}.down_proj.weight"][:, 80:])
        assert (down[:, 79] == 0).all() and (down[:, 80] != 0).all()  # the reference's off-by-one left neuron 79
    hidden: list[torch.Tensor] = []
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: hidden.append(a[0]))
    ids = torch.randint(0, 30, (2, 7))
    model(input_ids=ids)
    assert hidden[0][..., :80].abs().sum() == 0 and (hidden[0][..., 80:] != 0).all()
    # AdamW fine-tuning afterwards: every gradient into the ablated weights is exactly 0, so they stay 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert ablated_weight_norm(model, "model.layers.*.mlp", "0:80", "qwen2_mlp") == 0.0
    trained = model.model.layers[0].mlp.down_proj.weight[:, 80:]
    assert not torch.equal(trained, before["model.layers.0.mlp.down_proj.weight"][:, 80:])  # the rest did train


def test_ablation_of_gpt_mlps_zeroes_rows_bias_and_columns_in_either_weight_layout() -> None:
    neo = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
        vocab_size=30, hidden_size=8, num_layers=1, num_heads=2, attention_types=[[["global"], 1]],
        intermediate_size=20,
    ))
    gpt2_config = transformers.GPT2Config(vocab_size=30, n_embd=8, n_layer=1, n_head=2, n_inner=20)
    gpt2 = transformers.GPT2LMHeadModel(gpt2_config)
    assert ablate_neurons(neo, "transformer.h.0.mlp", [3, 7], preset="gpt_neo_mlp") == 2
    mlp = neo.transformer.h[0].mlp
    assert mlp.c_fc.weight[[3, 7]].abs().sum() == 0 and mlp.c_fc.bias[[3, 7]].abs().sum() == 0
    assert mlp.c_proj.weight[:, [3, 7]].abs().sum() == 0 and mlp.c_fc.weight[4].abs().sum() > 0
    assert ablate_neurons(gpt2, "transformer.h.0.mlp", "-4:", preset="gpt2_mlp") == 4   # Conv1D: weight (in, out)
    conv = gpt2.transformer.h[0].mlp
    assert conv.c_fc.weight[:, 16:].abs().sum() == 0 and conv.c_fc.bias[16:].abs().sum() == 0
    assert conv.c_proj.weight[16:].abs().sum() == 0 and conv.c_proj.weight[:16].abs().sum() > 0
    with pytest.raises(ValueError, match="unknown preset"):
        ablate_neurons(neo, "transformer.h.0.mlp", "0:2", preset="mlp")
    with pytest.raises(ValueError, match="has no 'gate_proj'"):
        ablate_neurons(neo, "transformer.h.0.mlp", "0:2", preset="llama_mlp")
    with pytest.raises(ValueError, match=r"out of range for 20 features"):
        ablate_neurons(neo, "transformer.h.0.mlp", [25], preset="gpt_neo_mlp")


# ------------------------------------------------------------------------------------------- absorption
def test_the_absorption_metric_is_a_masked_mean_not_the_references_zeroed_average(food: TinyStoriesDataModule) -> None:
    torch.manual_seed(0)
    lm = CausalLM(config={"model_type": "qwen2", "vocab_size": 512, "hidden_size": 16, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32})
    assert food.splits is not None
    batch = next(food.batches(food.splits.forget_val, 8, forget=True))
    routed = torch.zeros(512)
    routed[food.route_token_ids] = 1
    result = weighted_token_losses(lm, [batch], {"unrouted": 1 - routed, "routed": routed})
    with torch.no_grad():
        losses, valid = lm.token_losses(batch)
    hit = torch.isin(batch["input_ids"][:, 1:], torch.tensor(food.route_token_ids)) & valid
    assert hit.any() and result["unrouted"] == pytest.approx(float(losses[valid & ~hit].mean()), rel=1e-5)
    assert result["routed"] == pytest.approx(float(losses[hit].mean()), rel=1e-5)
    reference = float((losses * (~hit) * valid).sum() / valid.sum())  # zeroed, divided by all tokens
    assert reference < result["unrouted"] - 1e-3


def test_absorption_compares_forget_and_retain_increases() -> None:
    base = {"retain": 3.0, "retain_unrouted": 3.0, "forget": 3.2, "forget_unrouted": 3.1, "forget_routed": 4.0}
    results = {
        "base": base,
        "post_ablation": base | {"retain_unrouted": 3.1, "forget_unrouted": 3.5, "forget_routed": 6.0},
        "final": base | {"retain_unrouted": 3.05, "forget_unrouted": 3.2},
        "retraining": {"sym": {"retain": {"lowest": {"retain": 3.0, "retain_unrouted": 3.0}},
                               "forget": {"lowest": {"forget": 3.3, "forget_unrouted": 3.15, "forget_routed": 4.5}}}},
    }
    out = TokenUnlearningEvaluation._absorption(results)
    assert "held_out_minus_other" not in out["post_ablation"]  # no held-out concept tokens
    assert out["post_ablation"]["forget_minus_retain_unrouted"] == pytest.approx(0.3)
    assert out["post_ablation"]["forget_routed_increase"] == pytest.approx(2.0)
    assert out["final"]["forget_minus_retain_unrouted"] == pytest.approx(0.05)
    assert out["retrained_sym"]["forget_unrouted_increase"] == pytest.approx(0.05)
    assert out["retrained_sym"]["forget_minus_retain_unrouted"] == pytest.approx(0.05)
    held_out = {"forget_held_out": 5.0, "forget_other": 3.0}
    results["base"] = base | held_out
    results["post_ablation"] |= {"forget_held_out": 5.4, "forget_other": 3.1}
    results["final"] |= held_out
    results["retraining"]["sym"]["forget"]["lowest"] |= held_out
    out = TokenUnlearningEvaluation._absorption(results)
    assert out["post_ablation"]["held_out_minus_other"] == pytest.approx(0.3)
    assert out["final"]["held_out_minus_other"] == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------- the pipeline
@pytest.mark.timeout(120)
def test_token_unlearning_pipeline_trains_ablates_repairs_and_retrains_both_sides(tmp_path: Path) -> None:
    pl.seed_everything(0)
    data = TinyStoriesDataModule(
        **SMALL, forget_words=FOOD, labels="tokens", route_top_k=6, route_min_count=3, route_held_out=2
    )
    lm = CausalLM(
        config={"model_type": "qwen2", "vocab_size": 512, "hidden_size": 16, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32,
                "max_position_embeddings": 48, "tie_word_embeddings": True},
        lr=1e-2, warmup_steps=1, l1_coeff=1e-4, l1_modules="model.model.layers.0.mlp.down_proj", l1_site="input",
    )
    routing = GradientRoutingCallback(
        targets={"mlp": Target("model.model.layers.0.mlp.down_proj", site="input")},
        routes=[Route("forget", "mlp", {"8:": -5e-8})],
    )
    protocols = [RetrainingProtocol("symmetric", 4, 4, 2), RetrainingProtocol("paper", 6, 2, 2)]
    evaluation = TokenUnlearningEvaluation(
        "model.model.layers.0.mlp", "0:8", "qwen2_mlp", coherence_steps=2, coherence_lr=1e-3, protocols=protocols,
        retrain_lr=1e-3, retrain_seeds=2, eval_batch_size=8,
    )
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, callbacks=[routing, evaluation]))
    trainer.fit(lm, data)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["ablated_neurons"] == 8 and results["routed"] is True
    keys = {"retain", "retain_unrouted", "forget", "forget_unrouted", "forget_routed", "forget_held_out"}
    keys.add("forget_other")
    for stage in ("base", "post_ablation", "final"):
        assert set(results[stage]) == keys
    assert all("held_out_minus_other" in results["absorption"][stage] for stage in ("post_ablation", "final"))
    assert results["post_ablation"] != results["base"]
    assert results["ablated_weights_max_after_coherence"] == 0.0
    assert lm.model.model.layers[0].mlp.down_proj.weight[:, :8].abs().sum() == 0  # retraining restored the model
    for name, (retain_n, forget_n) in {"symmetric": (4, 4), "paper": (6, 2)}.items():
        run = results["retraining"][name]
        assert run["symmetric"] == (retain_n == forget_n)
        assert run["retain"]["examples"] == retain_n and run["forget"]["examples"] == forget_n
        assert set(run["retain"]["curves"]) == {"retain", "retain_unrouted"}
        assert {len(c) for c in run["forget"]["curves"].values()} == {3}
        assert run["forget"]["curves"]["forget"][0] == pytest.approx(results["final"]["forget"])
    assert set(results["absorption"]) == {"post_ablation", "final", "retrained_symmetric", "retrained_paper"}


def test_token_unlearning_evaluation_checks_its_setup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distinct names"):
        TokenUnlearningEvaluation("m", "0:2", "qwen2_mlp", protocols=[RetrainingProtocol("a", 1, 1, 1)] * 2)
    with pytest.raises(ValueError, match="forget_examples must be a positive int"):
        RetrainingProtocol("a", 1, 0, 1)
    data = TinyStoriesDataModule(
        **SMALL, forget_words=FOOD, labels="tokens", route_top_k=6, route_min_count=3, route_held_out=2
    )
    lm = CausalLM(config={"model_type": "qwen2", "vocab_size": 512, "hidden_size": 16, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32})
    for evaluation, match in (
        (TokenUnlearningEvaluation("model.model.layers.0.mlp", "0:8", "qwen2_mlp",
                                   protocols=[RetrainingProtocol("big", 7, 2, 1)]), "needs 7 stories"),
        (TokenUnlearningEvaluation("model.model.layerz.0.mlp", "0:8", "qwen2_mlp"), "matches no module"),
    ):
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=[evaluation]))
        with pytest.raises(ValueError, match=match):
            trainer.fit(lm, data)


# ---------------------------------------------------------------------------------------------- web text
def web(tmp_path: Path, **kwargs: Any) -> WebTextDataModule:
    return WebTextDataModule(
        dataset_id="text", dataset_config=None, data_files=str(SAMPLE), tokenizer=GPT2, max_tokens=17,
        batch_size=4, route_tokens=[" the"], num_val_documents=3, **kwargs,
    )


def test_web_text_packs_the_stream_after_the_held_out_head(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    dm = web(tmp_path, num_coherence_documents=2)
    dm.setup("fit")
    assert dm.splits is not None and dm.tokenizer is not None
    lines = [line.strip() for line in SAMPLE.read_text().splitlines() if line.strip()]
    head = [dm.tokenizer.decode(ids[1:]) for ids in dm.splits.retain_val + dm.splits.coherence_train]
    assert all(lines[i].startswith(head[i]) for i in range(5)) and len(dm.splits.coherence_train) == 2
    rows = [row["ids"] for row, _ in zip(iter(dm.train_dataloader().dataset), range(6))]
    eos = dm.eos_id
    stream = [tok for line in lines[5:12] for tok in [eos, *dm.tokenizer.encode(line, add_special_tokens=False).ids]]
    assert [tok for row in rows for tok in row] == stream[: 6 * 17]  # packed, in order, after the 5 held-out lines
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 17) and batch["attention_mask"].all()
    assert torch.equal(batch["route_labels"], (batch["input_ids"][:, 1:] == dm.route_token_ids[0]).long())


def test_web_text_mixes_in_the_forget_corpus_and_holds_part_of_it_out(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "forget.jsonl"
    docs = [f"forget document number {i} about viruses" for i in range(7)]
    corpus.write_text("\n".join(json.dumps({"text": d, "doi": i}) for i, d in enumerate(docs)) + "\n")
    dm = web(tmp_path, forget_corpus=str(corpus), forget_copies=2, forget_every=3, num_forget_val_documents=2,
             num_attack_documents=1)
    dm.setup("fit")
    assert dm.splits is not None and dm.tokenizer is not None
    held = {dm.tokenizer.decode(ids[1:]) for ids in dm.splits.forget_val + dm.splits.attack_pool}
    assert len(held) == 3 and held <= set(docs)
    stream = list(dm.train_dataloader().dataset._documents())  # type: ignore[attr-defined]
    texts = [dm.tokenizer.decode(ids) for ids in stream[:40]]
    inserted = [t for t in texts if t.startswith("forget document")]
    assert [i for i, t in enumerate(texts) if t.startswith("forget document")][:3] == [3, 7, 11]  # after every 3rd
    assert len(inserted) == 8 and set(inserted) == set(docs) - held  # 4 training documents, 2 copies each
    with pytest.raises(ValueError, match="need a forget_corpus"):
        web(tmp_path, num_attack_documents=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        web(tmp_path, forget_corpus=str(tmp_path / "missing.jsonl"))


def test_read_documents_reads_jsonl_and_txt(tmp_path: Path) -> None:
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": " a "}\n\n{"text": ""}\n{"text": "b"}\n')
    assert read_documents(jsonl) == ["a", "b"]
    assert read_documents(SAMPLE) == read_stories(SAMPLE)
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="no 'text' field"):
        read_documents(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="neither .jsonl nor .txt"):
        read_documents(Path(GPT2))

