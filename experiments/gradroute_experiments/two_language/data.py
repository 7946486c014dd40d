"""Two languages in one corpus, every token's domain known exactly: English TinyStories (retain) and Russian
TinyStories-style stories (forget), the SGTM paper's bilingual TinyStories setting (Shilov et al. 2025, arXiv
2512.05648) on the data this project carries.

A story's language is read from its script: it is Russian (forget) when it contains a Cyrillic letter. On the
carried data this is exact (every Russian story has Cyrillic letters, no English story has one; the tests check
it). One byte-level BPE is trained on both languages.

Training data is packed, as language models are pretrained: the training stories (``<|endoftext|>`` + story,
in a seeded random order) are concatenated into one token stream and cut into windows of ``max_tokens`` tokens,
so a window often holds the end of one story and the start of the next, in either language. Every token keeps
the labels of its story (an ``<|endoftext|>`` those of the story it ends: predicting it is predicting that the
story is over), so the training batch carries, per predicted token (``input_ids[:, 1:]``, shape ``(B, T - 1)``):

* ``route_labels``: 1 where the token's story carries a forget label, else 0 (what routing and token
  filtering see);
* ``forget``: the ground truth (the token's story is Russian);
* ``labelled``: the same as ``route_labels``, as a bool.

Label noise is simulated per story: ``recall`` is the fraction of Russian training stories that carry a forget
label, ``precision`` the fraction of labelled stories that are Russian (below 1, English stories are labelled
too); see :func:`~gradroute_experiments.text.stories.label_noise`. ``drop_labelled_forget=True``
(data filtering) drops every labelled story before packing (:func:`~gradroute_experiments.text.stories.
pack_stories`).

Held-out sets (one story per row, cut to ``max_tokens``, with per-story ground-truth labels): ``num_val_stories``
English and Russian test stories, and ``num_attack_stories`` other Russian stories for the retraining attack.
The shuffles, the held-out split, the token statistics and the held-out batches are the text layer's
(:class:`~gradroute_experiments.text.story_module.StoryDataModule`, which the TinyStories data module shares).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from gradroute_experiments.datafiles import data_path
from gradroute_experiments.text.checks import require_file, require_fraction, require_ints
from gradroute_experiments.text.stories import pack_stories, read_stories, tinystories_sample
from gradroute_experiments.text.story_module import StoryDataModule, StorySettings

__all__ = ["FORGET_FILE", "TwoLanguageDataModule", "is_russian", "window_loader"]

FORGET_FILE = "tinystories_ru_sample.txt"
_CYRILLIC = re.compile("[\u0400-\u04ff]")


def is_russian(text: str) -> bool:
    """Whether ``text`` contains a Cyrillic letter (U+0400-U+04FF)."""
    return _CYRILLIC.search(text) is not None


def window_loader(
    module: StoryDataModule, windows: Tensor, flags: Tensor, collate: Callable[[Any], dict[str, Tensor]]
) -> DataLoader:
    """The training loader of packed ``windows`` and their per-token ``flags``: shuffled with the module's
    ``hparams.seed``, ``hparams.batch_size`` windows per batch made by ``collate``."""
    return DataLoader(
        TensorDataset(windows, flags),
        batch_size=module.hparams.batch_size,
        shuffle=True,
        drop_last=len(windows) >= module.hparams.batch_size,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(module.hparams.seed),
        num_workers=module.hparams.num_workers,
    )


class TwoLanguageDataModule(StoryDataModule):
    """English (retain) and Russian (forget) stories, packed into windows with exact per-token language labels.

    Example (the recipes' CPU scale)::

        dm = TwoLanguageDataModule(recall=0.5, max_tokens=128, batch_size=16)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        batch["input_ids"].shape, batch["route_labels"].shape      # (16, 128), (16, 127)

    Args:
        data_dir: folder with the English sample ``tinystories_valid_sample.txt`` (None: the carried one).
        forget_data_dir: folder with the Russian sample ``tinystories_ru_sample.txt`` (None: the carried one).
        bpe_vocab_size: vocabulary of the byte-level BPE trained on both languages' stories.
        recall: fraction of Russian training stories that carry a forget label (seeded by ``seed``).
        precision: fraction of labelled training stories that are Russian (seeded; below 1 adds English ones).
        drop_labelled_forget: leave every labelled story out of training (the data-filtering baseline).
        max_tokens: tokens per training window, and per held-out story (cut).
        batch_size: training windows (and held-out stories) per batch.
        num_val_stories: held-out English and Russian test stories each.
        num_attack_stories: other held-out Russian stories, the retraining attack's pool.
        seed: story order, held-out split, label noise and window shuffling.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        forget_data_dir: str | None = None,
        bpe_vocab_size: int = 2048,
        recall: float = 1.0,
        precision: float = 1.0,
        drop_labelled_forget: bool = False,
        max_tokens: int = 128,
        batch_size: int = 16,
        num_val_stories: int = 64,
        num_attack_stories: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        owner = "TwoLanguageDataModule"
        require_file(
            data_path(forget_data_dir, default="tinystories_ru") / FORGET_FILE,
            owner,
            "put the Russian sample there (or leave forget_data_dir None for the carried one)",
        )
        require_file(tinystories_sample(data_dir), owner, "put the English sample there (or leave data_dir None)")
        require_fraction(owner, "recall", recall)
        require_fraction(owner, "precision", precision, zero_allowed=False)
        require_ints(
            owner,
            {  # argument: (value, smallest allowed)
                "bpe_vocab_size": (bpe_vocab_size, 1),
                "max_tokens": (max_tokens, 2),
                "batch_size": (batch_size, 1),
                "num_val_stories": (num_val_stories, 1),
                "num_attack_stories": (num_attack_stories, 1),
            },
        )
        super().__init__(
            StorySettings(
                tokenizer="bpe",
                bpe_vocab_size=bpe_vocab_size,
                recall=recall,
                precision=precision,
                drop_labelled_forget=drop_labelled_forget,
                num_val_stories=num_val_stories,
                num_attack_stories=num_attack_stories,
                num_retain_pool_stories=0,
                # The two-language recipes run no coherence fine-tune; one story each keeps the splits complete.
                num_coherence_stories=1,
                num_coherence_val_stories=1,
                seed=seed,
                # truncate_chars None: whole stories, packing cuts the stream, not the stories.
            )
        )
        self.save_hyperparameters()
        self.windows: Tensor | None = None
        self.window_flags: Tensor | None = None

    @override
    def load_texts(self) -> tuple[list[str], list[str]]:
        english = read_stories(tinystories_sample(self.hparams.data_dir))
        russian = read_stories(data_path(self.hparams.forget_data_dir, default="tinystories_ru") / FORGET_FILE)
        return english + russian, []  # the held-out sets are carved out of both (after shuffling)

    @override
    def classify(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of the whole stories (held-out ones are cut to ``max_tokens`` in setup) and whether each is
        Russian."""
        return self.encode(texts), [is_russian(text) for text in texts]

    @override
    def setup(self, stage: str) -> None:
        if self.splits is not None:
            return
        super().setup(stage)
        splits = self.splits
        assert splits is not None
        cut = self.hparams.max_tokens
        for name in ("retain_val", "forget_val", "attack_pool", "coherence_train", "coherence_val"):
            setattr(splits, name, [ids[:cut] for ids in getattr(splits, name)])
        flags = list(zip(splits.train_forget, splits.train_labelled))
        self.windows, self.window_flags = pack_stories(splits.train, flags, cut)

    @override
    def route_labels(self, batch: dict[str, Tensor]) -> Tensor:
        """One label per story (what a per-story batch of :meth:`collate` carries; training windows carry theirs
        per token, :meth:`collate_windows`)."""
        return batch["labelled"].long()

    def collate_windows(self, items: Sequence[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """A training batch of packed windows with per-predicted-token ``route_labels``, ``forget``, ``labelled``."""
        ids = torch.stack([window for window, _ in items])
        flags = torch.stack([f for _, f in items])[:, 1:]  # the flags of each predicted token
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "route_labels": flags[..., 1].long(),
            "forget": flags[..., 0],
            "labelled": flags[..., 1],
        }

    @override
    def train_dataloader(self) -> DataLoader:
        self._require_splits()
        assert self.windows is not None and self.window_flags is not None
        return window_loader(self, self.windows, self.window_flags, self.collate_windows)

    @override
    def summary(self) -> dict[str, Any]:
        """The story counts of :meth:`StoryDataModule.summary` plus the packed windows' token counts."""
        assert self.window_flags is not None
        tokens = self.window_flags[:, 1:]  # predicted tokens
        return super().summary() | {
            "recall": self.hparams.recall,
            "precision": self.hparams.precision,
            "batch_size": self.hparams.batch_size,
            "max_tokens": self.hparams.max_tokens,
            "train_windows": len(self.window_flags),
            "train_predicted_tokens": tokens.shape[0] * tokens.shape[1],
            "forget_token_fraction": round(float(tokens[..., 0].float().mean()), 4),
            "labelled_token_fraction": round(float(tokens[..., 1].float().mean()), 4),
        }
