"""Two-language unlearning (English retain, Russian forget): carried data, tokenisation and per-token language
labels in packed windows, label recall / precision, token filtering, SGTM-style ablation of dedicated units,
steps to recover, and the pipeline under ddp_spawn."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer_kwargs

from gradroute_experiments.datafiles import DATA_DIR
from lightning_gradroute import ForwardMask, GradientRoutingCallback, ParameterTarget, Route, Target
from gradroute_experiments.text.stories import label_noise, pack_stories, read_stories
from lightning_gradroute.evaluation import recovery_steps
from lightning_gradroute.era import zero_units
from gradroute_experiments.tinystories.evaluate import UnlearningEvaluation
from gradroute_experiments.tinystories.model import TinyStoriesLM
from gradroute_experiments.two_language.data import FORGET_FILE, TwoLanguageDataModule, is_russian

ROOT = Path(__file__).resolve().parents[1]
ENGLISH = DATA_DIR / "tinystories" / "tinystories_valid_sample.txt"
RUSSIAN = DATA_DIR / "tinystories_ru" / FORGET_FILE
SMALL = {"bpe_vocab_size": 512, "max_tokens": 48, "batch_size": 8, "num_val_stories": 8, "num_attack_stories": 8}
TINY_MODEL = {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 48, "window_size": 48, "lr": 3e-3, "warmup_steps": 1}  # fmt: skip


@pytest.fixture(scope="module")
def dm() -> TwoLanguageDataModule:
    data = TwoLanguageDataModule(**SMALL, recall=0.5, precision=0.8, seed=3)
    data.setup("fit")
    return data


def test_carried_russian_sample_matches_its_readme_and_the_script_tells_the_language_exactly() -> None:
    digest = hashlib.sha256(RUSSIAN.read_bytes()).hexdigest()
    assert digest in (RUSSIAN.parent / "README.md").read_text()
    russian, english = read_stories(RUSSIAN), read_stories(ENGLISH)
    assert len(russian) == 1200
    assert all(is_russian(s) for s in russian) and not any(is_russian(s) for s in english)


def test_one_bpe_for_both_languages_and_exact_per_token_language_labels(dm: TwoLanguageDataModule) -> None:
    tokenizer, splits = dm.tokenizer, dm.splits
    assert tokenizer is not None and splits is not None and dm.windows is not None and dm.window_flags is not None
    assert tokenizer.get_vocab_size() == 512
    pieces = [tokenizer.decode([i]) for i in range(512)]
    assert sum(map(is_russian, pieces)) > 50 and sum(p.isascii() and p.strip().isalpha() for p in pieces) > 50
    for story in (read_stories(RUSSIAN)[0], read_stories(ENGLISH)[0]):
        assert tokenizer.decode(tokenizer.encode(story).ids) == story
    # The windows are the training stories' token stream, in order, cut into max_tokens pieces.
    stream = [i for story in splits.train for i in story]
    assert dm.windows.flatten().tolist() == stream[: dm.windows.numel()] and dm.windows.shape[1] == 48
    # Every token carries its story's language; <|endoftext|> (the story separator) that of the story it ends.
    flags = dm.window_flags.flatten(0, 1)
    ids = dm.windows.flatten()
    eos = ids == dm.eos_id
    cyrillic = torch.tensor([is_russian(pieces[i]) for i in ids.tolist()])
    latin = torch.tensor([any("a" <= c.lower() <= "z" for c in pieces[i]) for i in ids.tolist()])
    assert bool(flags[cyrillic, 0].all()) and not bool(flags[latin & ~eos, 0].any())
    starts = torch.tensor([len(s) for s in splits.train]).cumsum(0)[:-1]
    starts = starts[starts < ids.numel()]
    assert bool(eos[starts].all()) and torch.equal(flags[starts], flags[starts - 1])
    assert bool((flags[:, 0] != flags[0, 0]).any()), "both languages are in the stream"
    # Training batches: per predicted token, the labels of the target token.
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, 48) and batch["route_labels"].shape == (8, 47)
    assert torch.equal(batch["route_labels"], batch["labelled"].long())
    row = dm.windows.tolist().index(batch["input_ids"][0].tolist())
    assert torch.equal(batch["forget"][0], dm.window_flags[row, 1:, 0])
    language = dm.window_flags[..., 0]
    assert bool((language.any(1) & ~language.all(1)).any()), "some windows hold both languages"
    # Held-out rows are one story each, cut to max_tokens, in the right language.
    assert all(len(s) <= 48 for s in splits.forget_val + splits.retain_val + splits.attack_pool)
    assert all(is_russian(tokenizer.decode(s)) for s in splits.forget_val + splits.attack_pool)
    assert not any(is_russian(tokenizer.decode(s)) for s in splits.retain_val)


def test_pack_stories_cuts_one_stream_and_gives_separators_the_previous_story_flags() -> None:
    ids, flags = pack_stories([[0, 5, 6], [0, 7], [0, 8, 9, 10]], [(False,), (True,), (False,)], length=4)
    assert ids.tolist() == [[0, 5, 6, 0], [7, 0, 8, 9]]  # the incomplete last window (10) is dropped
    assert flags[..., 0].tolist() == [[False, False, False, False], [True, True, False, False]]
    with pytest.raises(ValueError, match="do not fill one window"):
        pack_stories([[0, 1]], [(True,)], length=4)
    with pytest.raises(ValueError, match="as many flag rows"):
        pack_stories([[0, 1]], [], length=2)


def test_label_recall_and_precision_are_seeded_counted_and_nested(dm: TwoLanguageDataModule) -> None:
    forget = [i % 3 == 0 for i in range(300)]  # 100 forget, 200 retain
    for recall, precision, true, false in ((0.5, 1.0, 50, 0), (0.25, 0.8, 25, 6), (1.0, 0.5, 100, 100)):
        labelled = label_noise(forget, recall, precision, seed=7)
        assert sum(f and lab for f, lab in zip(forget, labelled)) == true
        assert sum(lab and not f for f, lab in zip(forget, labelled)) == false
        assert labelled == label_noise(forget, recall, precision, seed=7)
        assert labelled != label_noise(forget, recall, precision, seed=8)
    low, high = label_noise(forget, 0.25, 0.9, seed=1), label_noise(forget, 0.5, 0.9, seed=1)
    assert all(h for f, lo, h in zip(forget, low, high) if f and lo)  # more recall keeps the labelled forget items
    noisier = label_noise(forget, 0.5, 0.7, seed=1)
    assert all(n for f, h, n in zip(forget, high, noisier) if h and not f)  # less precision keeps the false ones
    with pytest.raises(ValueError, match="precision"):
        label_noise(forget, 0.5, 0.0)
    with pytest.raises(ValueError, match="only 200 retain"):
        label_noise(forget, 1.0, 0.3)
    summary = dm.summary()
    assert summary["train_labelled_forget_stories"] == summary["train_forget_stories"] // 2
    assert summary["train_labelled_retain_stories"] == round(summary["train_labelled_forget_stories"] * 0.2 / 0.8)
    assert 0 < summary["labelled_token_fraction"] < summary["forget_token_fraction"] + 0.2
    # Its hyperparameters (what LightningCLI and checkpoints record) are its own arguments, not TinyStories' ones.
    assert dm.hparams.recall == 0.5 and "oversight" not in dm.hparams and "labels" not in dm.hparams
    with pytest.raises(ValueError, match="recall"):
        TwoLanguageDataModule(recall=1.5)
    with pytest.raises(FileNotFoundError, match="tinystories_ru_sample.txt"):
        TwoLanguageDataModule(forget_data_dir="no/such/dir")


def test_token_filtering_takes_labelled_tokens_out_of_the_loss(dm: TwoLanguageDataModule) -> None:
    batch = next(iter(dm.train_dataloader()))
    assert batch["labelled"].any() and not batch["labelled"].all()
    torch.manual_seed(0)
    lm = TinyStoriesLM(**TINY_MODEL, token_filter_threshold=1.0)
    lm.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no trainer to log to
    lm._routing_stage = lambda: "train"  # type: ignore[method-assign]
    loss = lm.training_step(batch, 0)
    losses, valid = lm.token_losses(batch)
    keep = valid & ~batch["labelled"]
    torch.testing.assert_close(loss, losses[keep].mean())
    with pytest.raises(ValueError, match="token_filter_threshold"):
        TinyStoriesLM(**TINY_MODEL, token_filter_threshold=0.0)


def sgtm_routing(neurons: int = 16, check_coverage: bool = True, masked: bool = False) -> GradientRoutingCallback:
    """Forget tokens may change only the last ``neurons`` MLP neurons and the last head of the tiny model; with
    ``masked``, retain tokens do not see them in training (SGTM's retain mode, as in the recipes)."""
    mlp, attn = "model.transformer.h.*.mlp", "model.transformer.h.*.attn.attention"
    split, head = 64 - neurons, 16
    targets = {
        "up": ParameterTarget(f"{mlp}.c_fc.weight", dim=0),
        "up_bias": ParameterTarget(f"{mlp}.c_fc.bias"),
        "down": ParameterTarget(f"{mlp}.c_proj.weight", dim=1),
        "qkv": ParameterTarget(f"{attn}.[qkv]_proj.weight", dim=0),
        "out": ParameterTarget(f"{attn}.out_proj.weight", dim=1),
    }
    routes = [Route("forget", t, {f":{split}": 0.0}) for t in ("up", "up_bias", "down")]
    routes += [Route("retain", t, {f"{split}:": 0.0}) for t in ("up", "up_bias", "down")]
    routes += [Route("forget", t, {f":{head}": 0.0}) for t in ("qkv", "out")]
    routes += [Route("retain", t, {f"{head}:": 0.0}) for t in ("qkv", "out")]
    masks = []
    if masked:
        targets["mlp"] = Target(f"{mlp}.act")
        targets["heads"] = Target(f"{attn}.out_proj", site="input")
        masks = [ForwardMask("retain", "mlp", f"{split}:"), ForwardMask("retain", "heads", f"{head}:")]
    return GradientRoutingCallback(targets, routes, ablate="dedicated", ablate_label="forget", save_ablated=False,
                                   check_coverage=check_coverage, masks=masks)  # fmt: skip


def test_zeroing_dedicated_units_silences_exactly_those_neurons_and_heads(dm: TwoLanguageDataModule) -> None:
    torch.manual_seed(0)
    lm = TinyStoriesLM(**TINY_MODEL)
    router = sgtm_routing().router
    with router.attached(lm):
        units = router.dedicated_units("forget")
        assert units["model.transformer.h.0.mlp.c_fc.weight"] == (0, list(range(48, 64)))
        assert units["model.transformer.h.1.attn.attention.v_proj.weight"] == (0, list(range(16, 32)))
        assert units["model.transformer.h.0.attn.attention.out_proj.weight"] == (1, list(range(16, 32)))
        before = {n: p.detach().clone() for n, p in lm.named_parameters()}
        zeroed = zero_units(lm, units)
    assert zeroed["model.transformer.h.1.mlp.c_fc.bias"] == 16 and len(zeroed) == 2 * 7
    for name, param in lm.named_parameters():
        if name in units:
            dim, index = units[name]
            assert not param.index_select(dim, torch.tensor(index)).any(), name
            kept = [i for i in range(param.shape[dim]) if i not in index]
            assert torch.equal(
                param.index_select(dim, torch.tensor(kept)), before[name].index_select(dim, torch.tensor(kept))
            )
        else:
            assert torch.equal(param, before[name]), name
    # The zeroed neurons output exactly 0 and the zeroed head writes nothing.
    seen = {}
    lm.model.transformer.h[0].mlp.act.register_forward_hook(lambda m, a, out: seen.update(act=out))
    lm.model.transformer.h[0].attn.attention.out_proj.register_forward_hook(lambda m, a, out: seen.update(z=a[0]))
    with torch.no_grad():
        lm(next(iter(dm.train_dataloader()))["input_ids"][:, :-1])
    assert not seen["act"][..., 48:].any() and seen["act"][..., :48].abs().sum() > 0
    out_proj = lm.model.transformer.h[0].attn.attention.out_proj
    torch.testing.assert_close(out_proj(seen["z"]), out_proj(seen["z"] * (torch.arange(32) < 16)))


def test_the_recipes_masks_hide_the_units_from_retain_tokens_at_the_models_sites(dm: TwoLanguageDataModule) -> None:
    """The SGTM recipes' forward masks on the real sites (GELU output, ``out_proj`` input): retain tokens see the
    dedicated units as 0, forget tokens see them (the mechanics are in tests/test_forward_mask.py)."""
    torch.manual_seed(0)
    lm = TinyStoriesLM(**TINY_MODEL)
    batch = next(iter(dm.train_dataloader()))
    retain = batch["route_labels"] == 0
    assert retain.any() and (~retain).any()
    seen: dict[str, torch.Tensor] = {}
    block = lm.model.transformer.h[1]
    router = sgtm_routing(masked=True).router
    with router.attached(lm):  # the probes go on after the router's hooks: they see the masked values
        block.mlp.act.register_forward_hook(lambda m, a, out: seen.update(act=out))
        block.attn.attention.out_proj.register_forward_pre_hook(lambda m, a: seen.update(heads=a[0]))
        with router.route(batch["route_labels"]):
            lm(batch["input_ids"][:, :-1]).logsumexp(-1).mean().backward()
    act, heads = seen["act"], seen["heads"]
    assert not act[retain][:, 48:].any() and act[retain][:, :48].abs().sum() > 0 and act[~retain][:, 48:].any()
    assert not heads[retain][:, 16:].any() and heads[retain][:, :16].any() and heads[~retain][:, 16:].any()


def test_steps_to_recover_on_a_tiny_model(dm: TwoLanguageDataModule, tmp_path: Path) -> None:
    """The attack on an (essentially) untrained tiny model, two learning rates: steps to recover is the first
    evaluated step at which the better rate's seed-averaged forget loss reaches the target, None beyond reach."""
    splits = dm.splits
    assert splits is not None
    evaluation = UnlearningEvaluation("base", attack_steps=6, attack_lr=[1e-4, 3e-3], attack_stories=8,
                                      attack_batch_size=4, attack_seeds=2, attack_eval_every=2,
                                      attack_metrics=["forget"], eval_batch_size=8)  # fmt: skip
    pl.seed_everything(0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=[evaluation]))
    trainer.fit(TinyStoriesLM(**{**TINY_MODEL, "lr": 1e-9, "warmup_steps": 0}), dm)  # one step at lr 1e-9: untrained
    attack = json.loads((tmp_path / "results.json").read_text())["attack"]
    assert attack["eval_steps"] == [0, 2, 4, 6] and set(attack["by_lr"]) == {"0.0001", "0.003"}
    fast, slow = attack["by_lr"]["0.003"]["curves"]["forget"], attack["by_lr"]["0.0001"]["curves"]["forget"]
    assert fast[-1] < slow[-1] < slow[0] and attack["lowest_lr"] == 0.003
    assert recovery_steps(attack, fast[0]) == 0
    target = (fast[1] + fast[2]) / 2  # between the losses after steps 2 and 4 of the fast rate
    assert fast[2] <= target < min(fast[1], slow[-1]) and recovery_steps(attack, target) == 4
    assert recovery_steps(attack, min(fast) - 1.0) is None


@pytest.mark.timeout(120)
def test_sgtm_pipeline_under_ddp_spawn_zeroes_the_dedicated_units(tmp_path: Path) -> None:
    """Packed per-token labels, parameter routing, RoutedAdamW, the retain mask and the evaluation, 2 processes
    (the data module is set up here, so the workers receive its splits instead of each training a tokenizer)."""
    pl.seed_everything(0)
    data = TwoLanguageDataModule(**SMALL, recall=0.5)
    data.setup("fit")
    lm = TinyStoriesLM(**TINY_MODEL, routed_optimizer=True)
    evaluation = UnlearningEvaluation("param_routing", coherence_steps=0, attack_steps=1, attack_lr=1e-3,
                                      attack_stories=4, attack_seeds=1, attack_metrics=["forget"],
                                      eval_batch_size=8)  # fmt: skip
    callbacks = [sgtm_routing(masked=True), evaluation]
    kwargs: dict[str, Any] = dict(max_steps=3, strategy="ddp_spawn", devices=2, callbacks=callbacks)
    pl.Trainer(**trainer_kwargs(tmp_path, **kwargs)).fit(lm, data)
    results = json.loads((tmp_path / "results.json").read_text())
    assert (
        results["method"] == "param_routing" and results["units_zeroed"]["model.transformer.h.0.mlp.c_fc.weight"] == 16
    )
    assert results["post_ablation"] != results["pre_ablation"]
    assert results["data"]["forget_token_fraction"] > results["data"]["labelled_token_fraction"] > 0


def test_evaluation_checks_the_method_against_the_setup(dm: TwoLanguageDataModule, tmp_path: Path) -> None:
    era = GradientRoutingCallback({"up": ParameterTarget("model.transformer.h.*.mlp.c_fc.weight")},
                                  [Route("forget", "up", {":8": 0.0})])  # fmt: skip
    for callbacks, model, match in (
        ([UnlearningEvaluation("param_routing")], TinyStoriesLM(**TINY_MODEL), "add a GradientRoutingCallback"),
        (
            [era, UnlearningEvaluation("era")],
            TinyStoriesLM(**TINY_MODEL),
            "'era' needs the routing callback's expansions",
        ),
        ([era, UnlearningEvaluation("param_routing")], TinyStoriesLM(**TINY_MODEL), "needs its ablate='dedicated'"),
        ([UnlearningEvaluation("token_filtering")], TinyStoriesLM(**TINY_MODEL), "token_filter_threshold set"),
        ([UnlearningEvaluation("base")], TinyStoriesLM(**TINY_MODEL, token_filter_threshold=1.0), "threshold None"),
    ):
        with pytest.raises(ValueError, match=match):
            pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=callbacks)).fit(model, dm)
    with pytest.raises(ValueError, match="attack_lr"):
        UnlearningEvaluation("base", attack_lr=[1e-3, 1e-3])
    with pytest.raises(ValueError, match="attack_metrics"):
        UnlearningEvaluation("base", attack_metrics=["retain"])
