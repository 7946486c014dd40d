"""A data module of stories with forget flags, turned into training stories and held-out sets.

:class:`StoryDataModule` is what the TinyStories and two-language data modules share. A subclass says where its
texts come from (:meth:`~StoryDataModule.load_texts`) and how a text becomes token ids and a forget flag
(:meth:`~StoryDataModule.classify`); :meth:`~StoryDataModule.setup` then, with the subclass's
:class:`StorySettings`:

1. shuffles the training and held-out texts (one ``random.Random(seed)``, in that order) and cuts each to
   ``truncate_chars`` characters;
2. loads the tokenizer (:func:`~gradroute_experiments.text.tokenizer.load_tokenizer`; a BPE is trained on every
   loaded text: it is only a vocabulary, and the forget split must be decided on the tokens the model sees);
3. classifies the texts; without a separate held-out set it holds out the first forget and retain stories (in the
   shuffled order) that the test sets, the attack pool and the retain pool need;
4. draws the forget labels of the training stories (:func:`~gradroute_experiments.text.stories.label_noise`
   with ``recall`` and ``precision``), takes the coherence sets from the retain training stories, computes the
   token-frequency weights (:func:`~lightning_gradroute.text_labels.token_frequency_weights`, from the ground
   truth, as the paper) and calls :meth:`~StoryDataModule.fit_labels` for the subclass's routing labels;
5. drops the labelled training stories under ``drop_labelled_forget`` (the data-filtering baseline) and sets
   :attr:`~StoryDataModule.splits`.

Training batches are shuffled stories (seeded by ``seed``), batched by
:class:`~gradroute_experiments.text.stories.StoryBatches`.
"""

from __future__ import annotations

import abc
import random
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from tokenizers import Tokenizer
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from gradroute_experiments.text.stories import StoryBatches, StoryDataset, StorySplits, label_noise
from gradroute_experiments.text.tokenizer import load_tokenizer
from lightning_gradroute.text_labels import token_frequency_weights

__all__ = ["StoryDataModule", "StorySettings"]


@dataclass(frozen=True)
class StorySettings:
    """How :meth:`StoryDataModule.setup` splits the stories; a subclass builds it from its own arguments.

    Attributes:
        tokenizer / bpe_vocab_size: the :func:`~gradroute_experiments.text.tokenizer.load_tokenizer` spec and the
            vocabulary of a trained BPE.
        recall / precision: the label noise of the training stories (:func:`~gradroute_experiments.text.stories.
            label_noise`).
        drop_labelled_forget: leave every labelled training story out (the data-filtering baseline).
        num_val_stories: held-out retain and forget test stories each.
        num_attack_stories: held-out forget stories for the retraining attack.
        num_retain_pool_stories: held-out retain stories for retraining on the retain side.
        num_coherence_stories / num_coherence_val_stories: retain training stories for the coherence fine-tune
            and its best-step selection.
        seed: the shuffles, the held-out split and the label noise.
        truncate_chars: cut every text to this many characters first (None: whole texts).
        frequency_stories: at most this many retain and forget training stories each for the token statistics.
        retain_smoothing / forget_smoothing: their add-k pseudo-counts (the paper: 20 and 1).
    """

    tokenizer: str
    bpe_vocab_size: int
    recall: float
    precision: float
    drop_labelled_forget: bool
    num_val_stories: int
    num_attack_stories: int
    num_retain_pool_stories: int
    num_coherence_stories: int
    num_coherence_val_stories: int
    seed: int
    truncate_chars: int | None = None
    frequency_stories: int = 25_000
    retain_smoothing: float = 20.0
    forget_smoothing: float = 1.0


class StoryDataModule(StoryBatches, pl.LightningDataModule):
    """Stories with forget flags, split into training stories and held-out sets (see the module docstring).

    A subclass calls ``super().__init__(settings)`` and ``self.save_hyperparameters()`` (its own arguments, which
    must include ``batch_size`` and ``num_workers``), and implements :meth:`load_texts`, :meth:`classify` and
    :meth:`~gradroute_experiments.text.stories.StoryBatches.route_labels`.
    """

    def __init__(self, settings: StorySettings) -> None:
        super().__init__()
        self.settings = settings
        self.tokenizer: Tokenizer | None = None
        self.splits: StorySplits | None = None
        #: Per-token retain weights from the ground-truth training stories (``(vocab_size,)``), set by ``setup``.
        self.token_weights: Tensor | None = None

    @abc.abstractmethod
    def load_texts(self) -> tuple[list[str], list[str]]:
        """(training texts, held-out texts), before shuffling; no held-out texts: they are carved out of the
        training ones."""

    @abc.abstractmethod
    def classify(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of ``texts`` (each starting with ``<|endoftext|>``) and whether each is a forget story."""

    def fit_labels(self, retain: list[list[int]], forget: list[list[int]]) -> None:
        """Set up the routing labels from ground-truth retain and forget training stories (token ids without the
        leading ``<|endoftext|>``, at most ``frequency_stories`` each); called after ``token_weights`` is set.
        Nothing by default."""

    @override
    def setup(self, stage: str) -> None:
        if self.splits is not None:
            return
        s = self.settings
        owner = type(self).__name__
        rng = random.Random(s.seed)
        train_texts, held_out_texts = self.load_texts()
        rng.shuffle(train_texts)
        rng.shuffle(held_out_texts)
        if s.truncate_chars is not None:
            train_texts = [t[: s.truncate_chars] for t in train_texts]
            held_out_texts = [t[: s.truncate_chars] for t in held_out_texts]
        # A trained BPE sees every loaded story (without a held-out set that includes the held-out ones): it
        # is only a vocabulary, and the forget split must be decided on the tokens the model is trained on.
        self.tokenizer = load_tokenizer(s.tokenizer, train_texts + held_out_texts, s.bpe_vocab_size)
        train_ids, train_forget = self.classify(train_texts)
        if held_out_texts:
            held_ids, held_forget = self.classify(held_out_texts)
        else:
            held_ids, held_forget, train_ids, train_forget = self._carve_held_out(train_ids, train_forget)
        forget_held = [ids for ids, f in zip(held_ids, held_forget) if f]
        retain_held = [ids for ids, f in zip(held_ids, held_forget) if not f]
        need_forget = s.num_attack_stories + s.num_val_stories
        need_retain = s.num_val_stories + s.num_retain_pool_stories
        if len(forget_held) < need_forget or len(retain_held) < need_retain:
            raise ValueError(
                f"{owner}: the held-out stories have {len(forget_held)} forget / {len(retain_held)} retain; need "
                f"{need_forget} / {need_retain} (lower num_val_stories, num_attack_stories or num_retain_pool_stories)"
            )
        train_labelled = label_noise(train_forget, s.recall, s.precision, seed=s.seed)
        retain_ids = [ids for ids, f in zip(train_ids, train_forget) if not f]
        forget_ids = [ids for ids, f in zip(train_ids, train_forget) if f]
        n_coherence = s.num_coherence_stories + s.num_coherence_val_stories
        if len(retain_ids) < n_coherence:
            raise ValueError(
                f"{owner}: {len(retain_ids)} retain training stories, the coherence fine-tune needs {n_coherence} "
                "(lower num_coherence_stories or num_coherence_val_stories)"
            )
        # Statistics without the <|endoftext|> prefix, from ground-truth labels (as the paper).
        retain_stats = [ids[1:] for ids in retain_ids[: s.frequency_stories]]
        forget_stats = [ids[1:] for ids in forget_ids[: s.frequency_stories]]
        self.token_weights = token_frequency_weights(
            retain_stats,
            forget_stats,
            vocab_size=self.vocab_size,
            retain_smoothing=s.retain_smoothing,
            forget_smoothing=s.forget_smoothing,
        )
        self.fit_labels(retain_stats, forget_stats)

        keep = [not (s.drop_labelled_forget and lab) for lab in train_labelled]
        self.splits = StorySplits(
            train=[ids for ids, k in zip(train_ids, keep) if k],
            train_forget=[f for f, k in zip(train_forget, keep) if k],
            train_labelled=[lab for lab, k in zip(train_labelled, keep) if k],
            retain_val=retain_held[: s.num_val_stories],
            forget_val=forget_held[s.num_attack_stories : need_forget],
            attack_pool=forget_held[: s.num_attack_stories],
            retain_pool=retain_held[s.num_val_stories : need_retain],
            coherence_train=retain_ids[: s.num_coherence_stories],
            coherence_val=retain_ids[s.num_coherence_stories : n_coherence],
        )

    def _carve_held_out(
        self, ids: list[list[int]], forget: list[bool]
    ) -> tuple[list[list[int]], list[bool], list[list[int]], list[bool]]:
        """Split one story list into held-out and training stories: the first forget and retain stories (in the
        shuffled order) that the test sets and the attack pool need are held out."""
        s = self.settings
        need = {
            True: s.num_attack_stories + s.num_val_stories,
            False: s.num_val_stories + s.num_retain_pool_stories,
        }
        held_ids, held_forget, train_ids, train_forget = [], [], [], []
        for story, is_forget in zip(ids, forget):
            if need[is_forget] > 0:
                need[is_forget] -= 1
                held_ids.append(story)
                held_forget.append(is_forget)
            else:
                train_ids.append(story)
                train_forget.append(is_forget)
        return held_ids, held_forget, train_ids, train_forget

    @override
    def train_dataloader(self) -> DataLoader:
        splits = self._require_splits()
        dataset = StoryDataset(splits.train, splits.train_forget, splits.train_labelled)
        generator = torch.Generator().manual_seed(self.settings.seed)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            drop_last=len(dataset) >= self.hparams.batch_size,
            collate_fn=self.collate,
            generator=generator,
            num_workers=self.hparams.num_workers,
        )

    def summary(self) -> dict[str, Any]:
        """Counts of the story sets (for results.json and the README)."""
        splits = self._require_splits()
        flags = list(zip(splits.train_forget, splits.train_labelled))
        return {
            "train_stories": len(splits.train),
            "train_forget_stories": sum(splits.train_forget),
            "train_labelled_forget_stories": sum(f and lab for f, lab in flags),
            "train_labelled_retain_stories": sum(lab and not f for f, lab in flags),
            "retain_val_stories": len(splits.retain_val),
            "forget_val_stories": len(splits.forget_val),
            "attack_pool_stories": len(splits.attack_pool),
            "retain_pool_stories": len(splits.retain_pool),
            "vocab_size": self.vocab_size,
            "forget_fraction": round(sum(splits.train_forget) / max(1, len(splits.train)), 4),
            "tokens_mostly_routed": int((self.token_weights < 0.5).sum()) if self.token_weights is not None else 0,
        }
