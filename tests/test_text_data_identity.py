"""Data identity of the story data modules: for fixed settings, the tokenizer, the splits, the token statistics, the
packed windows and every training and validation batch hash to the digests recorded before the text layer
(``gradroute_experiments.text``) was factored out of the TinyStories experiment. A regression pin of the data, not
of the code: a change here changes what every TinyStories and two-language run trains and is evaluated on.

The token-frequency weights are computed with a stand-in (:func:`exact_token_weights`, the forget share of the
smoothed counts) instead of :func:`~lightning_gradroute.text_labels.token_frequency_weights`: its sigmoid rounds
differently on other CPU kernels, and the digest must pin the data module's plumbing (which stories and counts reach
the weights, how the weights reach the labels), not one machine's last bits. The digests were recorded with
lightning-gradroute 0.2's data modules (commit 4ddd73a) under the same stand-in; with the real weights function the
0.2 and 0.3 digests were also equal on the machine this was written on."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest
import torch

from gradroute_experiments.tinystories.data import TinyStoriesDataModule
from gradroute_experiments.two_language.data import TwoLanguageDataModule

SMALL = {"tokenizer": "bpe", "bpe_vocab_size": 1024, "truncate_chars": 300, "max_tokens": 48, "batch_size": 8,
         "num_val_stories": 16, "num_attack_stories": 8, "num_coherence_stories": 8,
         "num_coherence_val_stories": 16}  # fmt: skip
FOOD = ["food", "eat", "ate", "cake", "cookies", "apple", "hungry", "yummy", "lunch", "dinner"]
CASES: dict[str, tuple[type, dict[str, Any]]] = {
    "tinystories_frequency": (TinyStoriesDataModule, {**SMALL, "oversight": 0.5, "seed": 1}),
    "tinystories_document_noisy_filtered": (
        TinyStoriesDataModule,
        {**SMALL, "labels": "document", "oversight": 0.5, "precision": 0.8, "drop_labelled_forget": True,
         "num_retain_pool_stories": 8, "seed": 2},
    ),  # fmt: skip
    "tinystories_top_k_tokens": (
        TinyStoriesDataModule,
        {**SMALL, "bpe_vocab_size": 512, "forget_words": FOOD, "labels": "tokens", "route_top_k": 6,
         "route_min_count": 3},
    ),  # fmt: skip
    "tinystories_gpt2_route_tokens": (
        TinyStoriesDataModule,
        {**{k: v for k, v in SMALL.items() if k not in ("tokenizer", "bpe_vocab_size")}, "labels": "tokens",
         "route_tokens": [" Lily"]},
    ),  # fmt: skip
    "two_language_small": (
        TwoLanguageDataModule,
        {"bpe_vocab_size": 512, "max_tokens": 48, "batch_size": 8, "num_val_stories": 8, "num_attack_stories": 8,
         "recall": 0.5, "precision": 0.8, "seed": 3},
    ),  # fmt: skip
    "two_language_defaults_filtered": (TwoLanguageDataModule, {"recall": 0.5, "drop_labelled_forget": True}),
}
DIGESTS = {
    "tinystories_frequency": "e6d09fcb1ea0ae88623f484a6dc4ebe3e831d58a45b2dec4901e3a194a7b3f3b",
    "tinystories_document_noisy_filtered": "22c874d49bdd7296ac0d6385b92199dba25259a6ce560b2137d6a9aad314615f",
    "tinystories_top_k_tokens": "dbe084b6c02a7590f95a4ca01d39256aff2d36b02e55fd3ca88f8d57923f5840",
    "tinystories_gpt2_route_tokens": "10c2d50e5bafb99603a9d2c801bc14892276d9571ca05640f8a58151e032df95",
    "two_language_small": "4694a1379f0c3437130e301750b471aff0eea9fcc260a7e5e9f505262f0ce1ce",
    "two_language_defaults_filtered": "725fbf30b51eb2bf7e502365c98128dd65df91bd113a1b944171969beb4a919e",
}


def exact_token_weights(
    retain_tokens: Any, forget_tokens: Any, vocab_size: int, retain_smoothing: float, forget_smoothing: float, **_: Any
) -> torch.Tensor:
    """Per token, its forget share of the smoothed counts: only exactly rounded arithmetic (integer counts, one
    float64 division, one rounding to float32), so every CPU gives the same bits."""
    def counts(docs: Any) -> torch.Tensor:
        total = torch.zeros(vocab_size, dtype=torch.float64)
        for doc in docs:
            total += torch.bincount(torch.as_tensor(doc, dtype=torch.long).flatten(), minlength=vocab_size)
        return total

    retain, forget = counts(retain_tokens) + retain_smoothing, counts(forget_tokens) + forget_smoothing
    return (forget / (forget + retain)).float()


@pytest.fixture(autouse=True)
def cpu_independent_token_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gradroute_experiments.text.story_module.token_frequency_weights", exact_token_weights)


def _plain(value: Any) -> Any:
    """``value`` as JSON-able data (tensors with their dtype and shape; floats exactly, through ``repr``)."""
    if isinstance(value, torch.Tensor):
        return {"dtype": str(value.dtype), "shape": list(value.shape), "values": _plain(value.tolist())}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return repr(value)
    return value


def data_digest(dm: Any) -> str:
    """sha256 of everything a run reads from a set-up story data module."""
    parts = {
        "tokenizer": json.loads(dm.tokenizer.to_str()),
        "splits": dataclasses.asdict(dm.splits),
        "token_weights": dm.token_weights,
        # A data module without a routed token set (two languages) routes none: [] and None, as TinyStories' defaults.
        "route_token_ids": getattr(dm, "route_token_ids", []),
        "route_token_ratios": getattr(dm, "route_token_ratios", None),
        "windows": getattr(dm, "windows", None),
        "window_flags": getattr(dm, "window_flags", None),
        "train_batches": list(dm.train_dataloader()),
        "val_batches": list(dm.val_dataloader()),
        "attack_batches": list(dm.batches(dm.splits.attack_pool, forget=True)),
        "summary": dm.summary(),
    }
    text = json.dumps(_plain(parts), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_data_is_what_it_was(case: str) -> None:
    cls, kwargs = CASES[case]
    dm = cls(**kwargs)
    dm.setup("fit")
    assert data_digest(dm) == DIGESTS[case]
