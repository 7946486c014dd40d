"""The two-language benchmark, v2: English (forget, about 15% of the tokens) among Russian stories written in Latin
letters (retain), packed, with SGTM's three training modes as per-token labels.

What changed from :class:`~gradroute_experiments.two_language.data.TwoLanguageDataModule` (v1), and why
(``recipes/two_language/v2/README.md`` has the whole design):

* **English is the forget domain**, a small share of training (the case the gradient-routing paper's authors
  name as the realistic one); the retain domain is all 14,753 carried Russian stories (``tinystories_ru_all``).
* **One alphabet.** Russian is romanised (:func:`~gradroute_experiments.two_language.transliterate.
  transliterate`) before the BPE is trained, so the languages share letters and subword tokens and no
  embedding row is trained by one language only by construction.
* **SGTM's modes.** SGTM gives every training batch one of three modes: ``forget`` (only the dedicated units
  learn) for labelled forget data, ``retain`` (the dedicated units are zeroed in the forward and learn nothing)
  for a fraction (``retain_retain_perc``, 25%) of the rest, ``default`` (everything learns) otherwise, including
  unlabelled forget data. Here the modes are per story, as labels of its tokens: 0 ``retain`` (default mode),
  1 ``forget``, 2 ``retain_masked`` (SGTM's retain mode) for ``retain_masked_fraction`` of the unlabelled
  stories. SGTM's simulation draws its retain-mode batches among the *truly* retain ones; a trainer only knows
  its labels, so here they are drawn among all unlabelled stories (unlabelled English included, in proportion).

Route labels of a training batch (per predicted token, ``(B, T - 1)``):

* ``label_mode="modes"``: the integers above (with ``retain_masked_fraction=0``, just 0 / 1: what token
  filtering and data filtering need);
* ``label_mode="soft"``: ERA's soft labels (the paper's): ``1 - w[token]`` in labelled stories, 0 elsewhere,
  ``w`` the token-frequency retain weights of :class:`~gradroute_experiments.text.story_module.StoryDataModule`.

The batch also carries the ground truth ``forget`` and the flags ``labelled`` / ``retain_masked``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from gradroute_experiments.datafiles import data_path
from gradroute_experiments.text.checks import require_file, require_fraction, require_ints
from gradroute_experiments.text.stories import pack_stories, read_stories, tinystories_sample
from gradroute_experiments.text.story_module import StoryDataModule, StorySettings
from gradroute_experiments.two_language.data import is_russian, window_loader
from gradroute_experiments.two_language.transliterate import transliterate

__all__ = ["RUSSIAN_FILE", "BilingualDataModule"]

#: All carried Russian stories (14,753; ``data/tinystories_ru/README.md``).
RUSSIAN_FILE = "tinystories_ru_all.txt.gz"


class BilingualDataModule(StoryDataModule):
    """English (forget) and romanised Russian (retain) stories, packed, labelled with SGTM's modes or ERA's soft
    labels (module docstring).

    Example (the v2 recipes' data)::

        dm = BilingualDataModule(recall=0.9, retain_masked_fraction=0.25)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        batch["route_labels"].unique()     # tensor([0, 1, 2]): default, forget, retain mode

    Args:
        data_dir: folder with the English sample ``tinystories_valid_sample.txt`` (None: the carried one).
        russian_data_dir: folder with ``tinystories_ru_all.txt.gz`` (None: the carried one).
        romanise: write Russian in Latin letters (False keeps Cyrillic: the side-channel setting of v1).
        bpe_vocab_size: vocabulary of the byte-level BPE trained on both languages.
        recall: fraction of English training stories that carry a forget label (seeded).
        precision: fraction of labelled stories that are English (below 1, Russian ones are labelled too).
        drop_labelled_forget: leave the labelled stories out (data filtering).
        retain_masked_fraction: fraction of the unlabelled training stories in SGTM's retain mode (label 2;
            SGTM: 0.25); 0 for every method but SGTM.
        label_mode: ``"modes"`` (integer labels) or ``"soft"`` (ERA's soft labels; needs
            ``retain_masked_fraction=0``).
        num_russian_stories: use only the first this many Russian stories of the file (None: all; smoke tests).
        max_tokens: tokens per training window, and per held-out story (cut).
        batch_size: training windows (and held-out stories) per batch.
        num_val_stories: held-out English and Russian test stories each.
        num_attack_stories: other held-out English stories, the attack's pool (its largest budget at most).
        num_coherence_stories / num_coherence_val_stories: Russian training stories for ERA's coherence
            fine-tune and its best-step selection.
        seed: story order, held-out split, labels, retain-mode draw and window shuffling.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        russian_data_dir: str | None = None,
        romanise: bool = True,
        bpe_vocab_size: int = 1024,
        recall: float = 1.0,
        precision: float = 1.0,
        drop_labelled_forget: bool = False,
        retain_masked_fraction: float = 0.0,
        label_mode: Literal["modes", "soft"] = "modes",
        num_russian_stories: int | None = None,
        max_tokens: int = 128,
        batch_size: int = 16,
        num_val_stories: int = 128,
        num_attack_stories: int = 256,
        num_coherence_stories: int = 32,
        num_coherence_val_stories: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        owner = "BilingualDataModule"
        require_file(
            data_path(russian_data_dir, default="tinystories_ru") / RUSSIAN_FILE,
            owner,
            "put the Russian stories there (or leave russian_data_dir None for the carried ones)",
        )
        require_file(tinystories_sample(data_dir), owner, "put the English sample there (or leave data_dir None)")
        require_fraction(owner, "recall", recall)
        require_fraction(owner, "precision", precision, zero_allowed=False)
        require_fraction(owner, "retain_masked_fraction", retain_masked_fraction)
        if label_mode not in ("modes", "soft"):
            raise ValueError(f"{owner}: label_mode must be 'modes' or 'soft', got {label_mode!r}")
        if label_mode == "soft" and retain_masked_fraction:
            raise ValueError(f"{owner}: label_mode='soft' (ERA) has no retain mode; set retain_masked_fraction 0")
        require_ints(
            owner,
            {  # argument: (value, smallest allowed)
                "bpe_vocab_size": (bpe_vocab_size, 1),
                "max_tokens": (max_tokens, 2),
                "batch_size": (batch_size, 1),
                "num_val_stories": (num_val_stories, 1),
                "num_attack_stories": (num_attack_stories, 1),
                "num_coherence_stories": (num_coherence_stories, 1),
                "num_coherence_val_stories": (num_coherence_val_stories, 1),
                "num_russian_stories": (1 if num_russian_stories is None else num_russian_stories, 1),
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
                num_coherence_stories=num_coherence_stories,
                num_coherence_val_stories=num_coherence_val_stories,
                seed=seed,
            )
        )
        self.save_hyperparameters()
        self._is_english: dict[str, bool] = {}
        self.windows: Tensor | None = None
        #: Per window token, ``(forget, labelled, retain_masked)``.
        self.window_flags: Tensor | None = None

    @override
    def load_texts(self) -> tuple[list[str], list[str]]:
        english = read_stories(tinystories_sample(self.hparams.data_dir))
        russian = read_stories(data_path(self.hparams.russian_data_dir, default="tinystories_ru") / RUSSIAN_FILE)
        russian = russian[: self.hparams.num_russian_stories]
        # The language is read off the script before romanising (a romanised story has no Cyrillic left), and
        # classify() looks it up by the text it is given.
        self._is_english.clear()
        texts = []
        for text in english + russian:
            english_story = not is_russian(text)
            shown = transliterate(text) if self.hparams.romanise and not english_story else text
            self._is_english[shown] = english_story
            texts.append(shown)
        return texts, []

    @override
    def classify(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of the whole stories (held-out ones are cut in setup) and whether each is English."""
        return self.encode(texts), [self._is_english[text] for text in texts]

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
        masked = self.retain_mode_draw(splits.train_labelled)
        flags = list(zip(splits.train_forget, splits.train_labelled, masked))
        self.windows, self.window_flags = pack_stories(splits.train, flags, cut)

    def retain_mode_draw(self, labelled: Sequence[bool]) -> list[bool]:
        """Which training stories are in SGTM's retain mode: ``round(retain_masked_fraction * n)`` of the ``n``
        unlabelled ones, drawn with ``seed``."""
        unlabelled = [i for i, lab in enumerate(labelled) if not lab]
        count = round(self.hparams.retain_masked_fraction * len(unlabelled))
        order = torch.randperm(len(unlabelled), generator=torch.Generator().manual_seed(self.hparams.seed + 2))
        masked = [False] * len(labelled)
        for k in order[:count].tolist():
            masked[unlabelled[k]] = True
        return masked

    @override
    def route_labels(self, batch: dict[str, Tensor]) -> Tensor:
        """One label per story (a per-story batch of :meth:`collate`: held-out stories); training windows carry
        theirs per token (:meth:`collate_windows`)."""
        return batch["labelled"].long()

    def collate_windows(self, items: Sequence[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """A training batch of packed windows with per-predicted-token ``route_labels`` and flags."""
        ids = torch.stack([window for window, _ in items])
        flags = torch.stack([f for _, f in items])[:, 1:]  # the flags of each predicted token
        forget, labelled, masked = flags.unbind(-1)
        if self.hparams.label_mode == "soft":
            assert self.token_weights is not None
            labels = labelled.float() * (1 - self.token_weights[ids[:, 1:]])
        else:
            labels = labelled.long() + 2 * masked.long()  # a story is never both labelled and retain-masked
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "route_labels": labels,
            "forget": forget,
            "labelled": labelled,
            "retain_masked": masked,
        }

    @override
    def train_dataloader(self) -> DataLoader:
        self._require_splits()
        assert self.windows is not None and self.window_flags is not None
        return window_loader(self, self.windows, self.window_flags, self.collate_windows)

    def vocabulary_sharing(self) -> dict[str, Any]:
        """How much of the vocabulary the languages share, from the training stories: the token types English uses,
        how many of them Russian uses too, and the fraction of English token occurrences whose token is mostly
        English (retain weight below 0.5: the rows ``reset_forget_rows`` re-draws)."""
        splits = self._require_splits()
        assert self.token_weights is not None
        english = [t for ids, f in zip(splits.train, splits.train_forget) if f for t in ids[1:]]
        russian = {t for ids, f in zip(splits.train, splits.train_forget) if not f for t in ids[1:]}
        mostly_english = (self.token_weights[torch.tensor(english, dtype=torch.long)] < 0.5).float()
        return {  # data filtering at recall 1 trains on no English: no types, no occurrences
            "english_token_types": len(set(english)),
            "english_token_types_also_in_russian": len(set(english) & russian),
            "english_occurrences_of_mostly_english_tokens": round(float(mostly_english.mean()), 4) if english else None,
        }

    @override
    def summary(self) -> dict[str, Any]:
        """The story counts of :meth:`StoryDataModule.summary`, the packed windows' token counts and
        :meth:`vocabulary_sharing`."""
        assert self.window_flags is not None
        tokens = self.window_flags[:, 1:].float()  # predicted tokens
        return super().summary() | self.vocabulary_sharing() | {
            "forget_language": "english",
            "romanised": self.hparams.romanise,
            "recall": self.hparams.recall,
            "precision": self.hparams.precision,
            "retain_masked_fraction": self.hparams.retain_masked_fraction,
            "batch_size": self.hparams.batch_size,
            "max_tokens": self.hparams.max_tokens,
            "train_windows": len(self.window_flags),
            "train_predicted_tokens": tokens.shape[0] * tokens.shape[1],
            "forget_token_fraction": round(float(tokens[..., 0].mean()), 4),
            "labelled_token_fraction": round(float(tokens[..., 1].mean()), 4),
            "retain_masked_token_fraction": round(float(tokens[..., 2].mean()), 4),
        }
