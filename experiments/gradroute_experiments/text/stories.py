"""Stories (or documents) as the language experiments use them: read from a text file, labelled with noise,
packed into one token stream, split into the sets an unlearning experiment needs, and batched.

* :func:`read_stories`: the stories of a TinyStories-style text file (separated by ``<|endoftext|>`` lines);
  :func:`tinystories_sample` is the English sample the project carries.
* :func:`label_noise`: which forget items carry a forget label under partial oversight (recall) and false
  positives (precision).
* :func:`pack_stories`: stories concatenated and cut into windows of a fixed length, each token keeping its
  story's flags (pretraining-style packing).
* :class:`StorySplits`: the token ids of the training stories and of every held-out set.
* :class:`StoryBatches`: the batching every text data module shares (right padding with ``<|endoftext|>``,
  per-story flags, routing labels; validation and evaluation batches carry the ground truth).

:class:`~gradroute_experiments.text.story_module.StoryDataModule` builds the splits from forget-flagged stories;
:class:`~gradroute_experiments.text.web_text.WebTextDataModule` streams a corpus into the same batching.
"""

from __future__ import annotations

import abc
import gzip
import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from gradroute_experiments.datafiles import data_path
from gradroute_experiments.text.checks import require_fraction
from gradroute_experiments.text.tokenizer import EOS_TEXT
from lightning_gradroute.labels import partial_oversight

__all__ = [
    "SAMPLE_FILE",
    "StoryBatches",
    "StoryDataset",
    "StorySplits",
    "label_noise",
    "pack_stories",
    "read_stories",
    "tinystories_sample",
]

#: The English TinyStories sample (2,386 whole stories of the validation split), which the TinyStories and the
#: two-language experiments both train on; the project carries it under ``carried:tinystories``.
SAMPLE_FILE = "tinystories_valid_sample.txt"
_SEPARATOR = re.compile(r"^<\|endoftext\|>$", re.MULTILINE)


def tinystories_sample(data_dir: str | None) -> Path:
    """The English TinyStories sample file in ``data_dir`` (None: the carried one)."""
    return data_path(data_dir, default="tinystories") / SAMPLE_FILE


def read_stories(path: str | Path) -> list[str]:
    """Stories of a TinyStories text file (gzipped if its name ends in ``.gz``): split on lines equal to
    ``<|endoftext|>``, stripped, empty ones dropped."""
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as file:
            text = file.read()
    else:
        text = path.read_text(encoding="utf-8")
    return [story.strip() for story in _SEPARATOR.split(text) if story.strip()]


def label_noise(is_forget: Sequence[bool], recall: float, precision: float = 1.0, seed: int = 0) -> list[bool]:
    """Which items carry a forget label under imperfect labels.

    ``floor(recall * n_forget)`` forget items are labelled (:func:`~lightning_gradroute.labels.partial_oversight`);
    then, so that a fraction ``precision`` of the labelled items are forget items, ``round(n_labelled * (1 -
    precision) / precision)`` retain items, drawn uniformly with ``seed``, are labelled too (false positives). Both
    draws are seeded prefixes of one permutation each, so for a fixed seed the labelled forget items grow with
    ``recall`` and the false positives grow as ``precision`` falls.

    Raises:
        ValueError: ``recall`` outside [0, 1], ``precision`` outside (0, 1], or more false positives than retain
            items.
    """
    require_fraction("label_noise", "precision", precision, zero_allowed=False)
    labelled = partial_oversight(list(is_forget), recall, seed=seed)
    retain_index = [i for i, forget in enumerate(is_forget) if not forget]
    n_false = round(int(labelled.sum()) * (1 - precision) / precision)
    if n_false > len(retain_index):
        raise ValueError(
            f"label_noise: precision {precision} needs {n_false} false positives but there are only "
            f"{len(retain_index)} retain items"
        )
    order = torch.randperm(len(retain_index), generator=torch.Generator().manual_seed(seed + 1))
    for k in order[:n_false].tolist():
        labelled[retain_index[k]] = True
    return labelled.tolist()


def pack_stories(stories: Sequence[list[int]], flags: Sequence[Sequence[bool]], length: int) -> tuple[Tensor, Tensor]:
    """Concatenate ``stories`` (each starting with ``<|endoftext|>``) and cut the stream into windows.

    Args:
        stories: token ids per story, each beginning with the ``<|endoftext|>`` that separates it from the
            previous one.
        flags: per story, its flags (e.g. ``(forget, labelled)``); every story has the same number.
        length: tokens per window; the incomplete last window is dropped.

    Returns:
        ``(ids, token_flags)``: ``(windows, length)`` token ids and ``(windows, length, n_flags)`` bool flags, each
        token's being its story's, except that a story's leading ``<|endoftext|>`` has the previous story's
        flags (it is where that story ends).
    """
    if length < 2:
        raise ValueError(f"pack_stories: length must be at least 2, got {length}")
    if len(stories) != len(flags) or not stories:
        raise ValueError(f"pack_stories: need as many flag rows as stories (at least one), got {len(flags)} and "
                         f"{len(stories)}")  # fmt: skip
    lengths = torch.tensor([len(story) for story in stories])
    if bool((lengths < 1).any()):
        raise ValueError("pack_stories: a story has no tokens (each starts with <|endoftext|>)")
    owner = torch.repeat_interleave(torch.arange(len(stories)), lengths)  # the story of each token
    owner[(lengths.cumsum(0) - lengths)[1:]] -= 1  # a story's leading <|endoftext|> ends the previous one
    token_flags = torch.tensor([list(f) for f in flags], dtype=torch.bool)[owner]
    windows = len(owner) // length
    if windows == 0:
        raise ValueError(f"pack_stories: {len(owner)} tokens do not fill one window of {length}")
    keep = windows * length
    ids = torch.tensor(list(itertools.chain.from_iterable(stories))[:keep])
    return ids.view(windows, length), token_flags[:keep].view(windows, length, -1)


@dataclass
class StorySplits:
    """Token ids of every story set the experiment uses (lists of id lists, each starting with ``<|endoftext|>``).

    Attributes:
        train: the training stories (after partial oversight and filtering), with ``train_forget`` (ground
            truth) and ``train_labelled`` (carries a forget label) flags.
        retain_val / forget_val: held-out test sets of retain and forget stories.
        attack_pool: held-out forget stories the retraining attack trains on.
        retain_pool: held-out retain stories that retraining on the retain side trains on (a symmetric
            retraining protocol), disjoint from ``retain_val``.
        coherence_train / coherence_val: retain training stories for the coherence fine-tune and its
            best-checkpoint selection (disjoint).
    """

    train: list[list[int]]
    train_forget: list[bool]
    train_labelled: list[bool]
    retain_val: list[list[int]]
    forget_val: list[list[int]]
    attack_pool: list[list[int]]
    retain_pool: list[list[int]]
    coherence_train: list[list[int]]
    coherence_val: list[list[int]]


class StoryDataset(torch.utils.data.Dataset):
    """Stories as dataset items: ``{"ids", "forget", "labelled"}`` (token ids and the two per-story flags)."""

    def __init__(self, ids: list[list[int]], forget: list[bool], labelled: list[bool]) -> None:
        self.ids, self.forget, self.labelled = ids, forget, labelled

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"ids": self.ids[i], "forget": self.forget[i], "labelled": self.labelled[i]}


class StoryBatches(abc.ABC):
    """Batching shared by the text data modules: a mixin for a ``LightningDataModule`` that has set, in ``setup``,
    ``tokenizer`` (with ``<|endoftext|>``), ``splits`` (:class:`StorySplits`) and ``route_labels(batch)``, and has
    ``hparams.batch_size`` and ``hparams.num_workers``.

    Every batch is a dict: right-padded ``input_ids`` / ``attention_mask`` (pad = ``<|endoftext|>``), per-story
    ``forget`` / ``labelled`` flags and ``route_labels``. Validation and :meth:`batches` carry the ground truth per
    story (1 for forget stories) as ``route_labels``, so the mixin logs ``val/loss_<label>`` per set.
    """

    tokenizer: Tokenizer | None
    splits: StorySplits | None
    hparams: Any

    @abc.abstractmethod
    def route_labels(self, batch: dict[str, Tensor]) -> Tensor:
        """The routing labels of a training batch."""

    @property
    def vocab_size(self) -> int:
        if self.tokenizer is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() first")
        return self.tokenizer.get_vocab_size()

    @property
    def eos_id(self) -> int:
        assert self.tokenizer is not None
        return self.tokenizer.token_to_id(EOS_TEXT)

    def single_token(self, text: str, what: str) -> int:
        """The id of ``text``, which must be exactly one token of this tokenizer."""
        assert self.tokenizer is not None
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"{type(self).__name__}: {what} {text!r} is {len(ids)} tokens {ids}, not one token")
        return ids[0]

    def encode(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
        """Token ids of ``<|endoftext|>`` + text for each of ``texts``, at most ``max_tokens`` long (None: whole)."""
        assert self.tokenizer is not None
        return [e.ids[:max_tokens] for e in self.tokenizer.encode_batch([EOS_TEXT + text for text in texts])]

    def collate(self, items: Sequence[dict[str, Any]] | Sequence[list[int]]) -> dict[str, Tensor]:
        """Right-padded ``input_ids`` / ``attention_mask`` (pad = ``<|endoftext|>``) plus flags and route labels.

        Items are dataset items (``{"ids", "forget", "labelled"}``) or bare id lists (flags then False).
        """
        items = [it if isinstance(it, dict) else {"ids": it, "forget": False, "labelled": False} for it in items]
        length = max(len(it["ids"]) for it in items)
        input_ids = torch.full((len(items), length), self.eos_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, it in enumerate(items):
            input_ids[row, : len(it["ids"])] = torch.tensor(it["ids"])
            attention_mask[row, : len(it["ids"])] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "forget": torch.tensor([it["forget"] for it in items]),
            "labelled": torch.tensor([it["labelled"] for it in items]),
        }
        batch["route_labels"] = self.route_labels(batch)
        return batch

    def _collate_ground_truth(self, items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        batch = self.collate(items)
        batch["route_labels"] = batch["forget"].long()
        return batch

    def batches(
        self, stories: Sequence[list[int]], batch_size: int | None = None, forget: bool = False
    ) -> Iterator[dict[str, Tensor]]:
        """Batches of ``stories`` in order; ``route_labels`` (per story) say whether they are forget stories."""
        size = batch_size or self.hparams.batch_size
        for start in range(0, len(stories), size):
            yield self._story_batch(stories[start : start + size], forget)

    def _story_batch(self, stories: Sequence[list[int]], forget: bool) -> dict[str, Tensor]:
        return self._collate_ground_truth([{"ids": ids, "forget": forget, "labelled": forget} for ids in stories])

    # The UnlearningData and CoherenceData protocols of lightning_gradroute.evaluation (its UnlearningEvaluation).
    def retain_eval_examples(self) -> list[list[int]]:
        return self._require_splits().retain_val

    def forget_eval_examples(self) -> list[list[int]]:
        return self._require_splits().forget_val

    def attack_pool_examples(self) -> list[list[int]]:
        return self._require_splits().attack_pool

    def coherence_train_examples(self) -> list[list[int]]:
        return self._require_splits().coherence_train

    def coherence_val_examples(self) -> list[list[int]]:
        return self._require_splits().coherence_val

    def collate_examples(self, examples: Sequence[list[int]], split: str) -> dict[str, Tensor]:
        """A batch of stories as :meth:`batches` makes it, forget stories for the forget and attack splits."""
        return self._story_batch(examples, forget=split in ("forget_eval", "attack_pool"))

    def _require_splits(self) -> StorySplits:
        if self.splits is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() first")
        return self.splits

    @override
    def val_dataloader(self) -> DataLoader:
        splits = self._require_splits()
        # Interleaved, so that a run limited to a few validation batches still sees both sets.
        retain = [(ids, False) for ids in splits.retain_val]
        forget = [(ids, True) for ids in splits.forget_val]
        pairs = [pair for both in itertools.zip_longest(retain, forget) for pair in both if pair is not None]
        flags = [is_forget for _, is_forget in pairs]
        return DataLoader(
            StoryDataset([ids for ids, _ in pairs], flags, flags),
            batch_size=self.hparams.batch_size,
            collate_fn=self._collate_ground_truth,
            num_workers=self.hparams.num_workers,
        )
