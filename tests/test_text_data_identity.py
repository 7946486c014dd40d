"""Data identity of the story data modules: for fixed settings, the tokenizer, the splits, the token statistics, the
packed windows and every training and validation batch hash to the digests recorded before the text layer
(``gradroute_experiments.text``) was factored out of the TinyStories experiment. A regression pin of the data, not
of the code: a change here changes what every TinyStories and two-language run trains and is evaluated on."""

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
    "tinystories_frequency": "5b2ae086a4091c9654ffd601067592d28096a0a831afccfb7a991c5b2b51ed09",
    "tinystories_document_noisy_filtered": "05fc3a663f56cef53b5862a968095fca67b7ddf80cadaebca54e5e10d78fbf57",
    "tinystories_top_k_tokens": "811fe44ee3c1c4cc285b1fcd2c374c97dc3f3add5d17e79035f2c9fc63d205c7",
    "tinystories_gpt2_route_tokens": "87d1807afb37120761393765dbb56e535ae886a485ac8215d0530e1cf2be70ef",
    "two_language_small": "e7dbc28122b12a4fad3de3a1e1f4391c3c4afec6e438e4ba9ecf907c527eb47b",
    "two_language_defaults_filtered": "31a8fa5f9d2b116c7f64c382da97cdee15ab7494179533525b6a8afd7a7758f6",
}


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
