"""Text label builders of ``lightning_gradroute.labels``: keywords, token sets, frequency weights, oversight."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import GradCapture, RoutedDataModule, TokenModel, fresh_copy, hand_masked_grads, trainer_kwargs
from tokenizers import Tokenizer

from gradroute_experiments.datafiles import DATA_DIR
from lightning_gradroute import GradientRoutingCallback, Route, Target
from lightning_gradroute.labels import partial_oversight
from lightning_gradroute.text_labels import (
    FrequencyWeightedLabels,
    TokenSetLabels,
    keyword_documents,
    keyword_regex,
    token_frequency_weights,
)

PAPER_WORDS = ["tree", "trees", "forest", "forests", "woodland", "woodlands"]
GPT2_TOKENIZER = DATA_DIR / "gpt2-tokenizer" / "tokenizer.json.gz"


def gpt2() -> Tokenizer:
    return Tokenizer.from_str(gzip.decompress(GPT2_TOKENIZER.read_bytes()).decode("utf-8"))


# ------------------------------------------------------------------------------------------- keywords
@pytest.mark.parametrize(
    "text, hit",
    [
        ("They went to the forest.", True),
        ("Forest animals sang.", True),
        ("The FOREST was dark", True),
        ("Many forests grow here", True),
        ("the forest's edge", True),
        ("a tree-house", True),
        ("\nforest\n", True),
        ("Woodlands are green", True),
        ("down the street", False),  # "tree" inside a word
        ("a treehouse", False),
        ("the forester smiled", False),
        ("afforestation", False),
        ("fore st", False),
        ("forest_ranger", False),  # underscore is a word character
    ],
)
def test_keyword_regex_whole_words_any_case(text: str, hit: bool) -> None:
    assert bool(keyword_regex(PAPER_WORDS).search(text)) is hit


def test_keyword_regex_without_plural_misses_plural() -> None:
    assert keyword_regex(["forest"]).search("forests") is None
    assert keyword_regex(["forest"]).search("Forest") is not None


def test_keyword_regex_escapes_and_rejects_bad_words() -> None:
    assert keyword_regex(["c++"]).search("I like c++ a lot") is not None
    assert keyword_regex(["c++"]).search("I like c a lot") is None
    for bad in ([], "forest", [""], ["  "], [3]):
        with pytest.raises(ValueError, match="keyword_regex"):
            keyword_regex(bad)  # type: ignore[arg-type]


def test_keyword_documents() -> None:
    texts = ["A big tree.", "A street.", "Woodland!", "nothing"]
    assert keyword_documents(texts, PAPER_WORDS).tolist() == [True, False, True, False]


# ------------------------------------------------------------------------------------------ token sets
def test_token_set_labels_key_the_next_token_with_real_gpt2_tokens() -> None:
    tok = gpt2()
    words = [" forest", " Forest", "Forest", " forests", " tree", " trees"]
    ids = [tok.encode(w).ids for w in words]
    assert all(len(i) == 1 for i in ids), "each variant is a single GPT-2 token"
    source = TokenSetLabels(token_ids=[i[0] for i in ids])
    text = "Forest walks: the forest, the forests, a street, a forester and one tree."
    encoded = tok.encode(text)
    batch = {"input_ids": torch.tensor([encoded.ids])}
    labels = source(batch)
    assert labels.shape == (1, len(encoded.ids) - 1) and labels.dtype == torch.long
    # position t is labelled iff the token it predicts (t + 1) is one of the word variants
    expected = [int(t.lstrip("Ġ").lower() in {"forest", "forests", "tree", "trees"}) for t in encoded.tokens[1:]]
    assert labels[0].tolist() == expected
    assert sum(expected) == 3  # " forest", " forests", " tree"; "Forest" at position 0 is never a target
    assert "Ġstreet" in encoded.tokens and "Ġfore" in encoded.tokens  # the near misses are really there

    same_position = TokenSetLabels(token_ids=[i[0] for i in ids], next_token=False, label=2, other=1)(batch)
    assert same_position.shape == (1, len(encoded.ids))
    assert same_position[0, 0].item() == 2 and same_position[0, 1:].eq(1).sum() == len(encoded.ids) - 4


def test_token_set_labels_errors() -> None:
    with pytest.raises(ValueError, match="token_ids"):
        TokenSetLabels(token_ids=[])
    with pytest.raises(ValueError, match="label"):
        TokenSetLabels(token_ids=[1], label=-1)
    with pytest.raises(KeyError, match="input_ids"):
        TokenSetLabels(token_ids=[1])({"x": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="integer"):
        TokenSetLabels(token_ids=[1])({"input_ids": torch.zeros(1, 3)})


# ------------------------------------------------------------------------------------ frequency weights
def paper_weight(r: float) -> float:
    return 1 - 1 / (1 + math.exp(-((r - 1 / r) - 4)))


def test_frequency_weights_match_the_paper_formula_with_smoothing() -> None:
    vocab = 6
    retain = [[0, 1, 1, 2], [2, 2, 3]]
    forget = [[4, 4, 1], [4, 0, 4, 4]]
    w = token_frequency_weights(retain, forget, vocab_size=vocab, retain_smoothing=20, forget_smoothing=1)
    retain_counts = torch.tensor([1, 2, 3, 1, 0, 0], dtype=torch.float64) + 20
    forget_counts = torch.tensor([1, 1, 0, 0, 5, 0], dtype=torch.float64) + 1
    r = (forget_counts / forget_counts.sum()) / (retain_counts / retain_counts.sum())
    expected = [paper_weight(float(x)) for x in r]
    assert w.dtype == torch.float32 and w.shape == (vocab,)
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("ratio, weight", [(1, 0.982), (2, 0.924), (4, 0.562), (5, 0.31), (10, 0.003)])
def test_frequency_weights_reproduce_the_papers_examples(ratio: int, weight: float) -> None:
    # token 0 is `ratio` times as frequent in forget as in retain; token 1 pads the totals equal
    retain = [[0] * 10 + [1] * (100 - 10)]
    forget = [[0] * (10 * ratio) + [1] * (100 - 10 * ratio)]
    w = token_frequency_weights(retain, forget, vocab_size=2, retain_smoothing=0, forget_smoothing=0)
    assert w[0].item() == pytest.approx(weight, abs=2e-3)


def test_frequency_weights_unsmoothed_edge_cases() -> None:
    # retain-only token -> 1, forget-only token -> 0, equally frequent with offset 0 -> 0.5, unseen -> as r = 1
    w = token_frequency_weights([[0, 2]], [[1, 2]], vocab_size=4, retain_smoothing=0, forget_smoothing=0, offset=0)
    assert w.tolist() == [1.0, 0.0, 0.5, 0.5]


def test_frequency_weights_errors() -> None:
    with pytest.raises(ValueError, match="outside"):
        token_frequency_weights([[0, 5]], [[1]], vocab_size=4)
    with pytest.raises(ValueError, match="vocab_size"):
        token_frequency_weights([[0]], [[1]], vocab_size=0)
    with pytest.raises(ValueError, match="retain_smoothing"):
        token_frequency_weights([[0]], [[1]], vocab_size=2, retain_smoothing=-1)
    with pytest.raises(ValueError, match="no forget tokens"):
        token_frequency_weights([[0]], [], vocab_size=2, forget_smoothing=0)


def test_frequency_weighted_labels_per_token_next_token() -> None:
    weights = torch.tensor([1.0, 0.25, 0.5, 0.0])
    source = FrequencyWeightedLabels(weights, document_key="labelled")
    batch = {"input_ids": torch.tensor([[0, 1, 2, 3], [0, 3, 3, 1]]), "labelled": torch.tensor([True, False])}
    labels = source(batch)
    assert labels.tolist() == [[0.75, 0.5, 1.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        FrequencyWeightedLabels([0.5, 1.5])
    with pytest.raises(KeyError, match="labelled"):
        source({"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="outside"):
        source({"input_ids": torch.tensor([[0, 7]]), "labelled": torch.tensor([True])})
    with pytest.raises(ValueError, match="shape"):
        source({"input_ids": batch["input_ids"], "labelled": torch.tensor([True])})


@pytest.mark.timeout(60)
def test_callback_soft_labels_give_the_papers_era_mask(tmp_path: Path) -> None:
    """Through the callback, original units get 1.75 * w - 0.75 per token, expanded units 1, retain docs 1."""
    torch.manual_seed(0)
    vocab, seq, n = 11, 5, 4
    weights = torch.linspace(0, 1, vocab)
    ids = torch.randint(0, vocab, (n, seq))
    labelled = torch.tensor([True, False, True, True])
    columns = {"x": ids, "y": torch.randint(0, vocab, (n, seq)), "labelled": labelled}
    model = TokenModel(lr=0.1)
    reference = fresh_copy(model)
    capture = GradCapture()
    routing = GradientRoutingCallback(
        targets={"hidden": Target("encoder")},
        routes=[Route("forget", "hidden", {"0:8": -0.75, "8:": 1.0})],  # "original" 0:8, "expanded" 8:16
        label_source=FrequencyWeightedLabels(weights, document_key="labelled", token_key="x", next_token=False),
    )
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=[routing, capture]))
    trainer.fit(model, RoutedDataModule(columns, batch_size=n))

    # the paper's mask, written from its formula: w per token in labelled docs, 1 in the others
    w = torch.where(labelled[:, None], weights[ids], torch.ones(n, seq))
    mask = torch.ones(n, seq, 16)
    mask[..., :8] = (1.75 * w - 0.75)[..., None]
    expected = hand_masked_grads(reference, "encoder", mask, lambda: reference.compute_loss(columns))
    for name, grad in capture.grads[0].items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------- partial oversight
def test_partial_oversight_counts_nesting_and_seeds() -> None:
    is_forget = torch.tensor([i % 3 == 0 for i in range(30)])  # 10 forget items
    previous = torch.zeros(30, dtype=torch.bool)
    for fraction in (0.0, 0.1, 0.29, 0.3, 0.5, 0.7, 0.99, 1.0):
        labelled = partial_oversight(is_forget, fraction, seed=3)
        assert labelled.dtype == torch.bool and labelled.shape == (30,)
        assert int(labelled.sum()) == math.floor(fraction * 10 + 1e-9)
        assert not bool((labelled & ~is_forget).any()), "only forget items are labelled"
        assert bool((previous <= labelled).all()), "oversight levels are nested for a fixed seed"
        previous = labelled
    assert torch.equal(partial_oversight(is_forget, 0.5, seed=3), partial_oversight(is_forget.tolist(), 0.5, seed=3))
    draws = {tuple(partial_oversight(is_forget, 0.5, seed=s).nonzero().flatten().tolist()) for s in range(5)}
    assert len(draws) > 1, "the seed changes which items are labelled"


def test_partial_oversight_errors() -> None:
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="fraction"):
            partial_oversight([True, False], bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-d"):
        partial_oversight(torch.zeros(2, 2, dtype=torch.bool), 0.5)
