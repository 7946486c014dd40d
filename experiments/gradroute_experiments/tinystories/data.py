"""TinyStories for unlearning: stories split into forget (they mention trees, forests or woodlands) and retain.

Offline (the default) it reads the TinyStories sample the project carries (``carried:tinystories``, 2,386 whole
stories of the validation split); online it loads the full dataset with ``datasets`` (``dataset_id``). Each
story is cut to ``truncate_chars`` characters, prefixed with ``<|endoftext|>`` and tokenised (right padding,
at most ``max_tokens`` tokens). It is a forget story when the text of those tokens (what the model sees)
mentions one of ``forget_words`` as a whole word, in any case.

Routing labels ride in every training batch as ``batch["route_labels"]``:

* ``labels="frequency"`` (ERA): per-token soft labels keyed by the next token,
  :class:`~lightning_gradroute.text_labels.FrequencyWeightedLabels` over the paper's token-frequency weights. The
  weights are computed from ground-truth retain and forget training stories (as the paper does, even under
  partial oversight).
* ``labels="document"`` (DEMix): one integer per story, 1 for labelled forget stories.
* ``labels="tokens"`` (steering scalar, token-routing unlearning): per-token integer labels keyed by the next
  token, 1 where it is one of a token set, in every story
  (:class:`~lightning_gradroute.text_labels.TokenSetLabels`). The set is ``route_tokens`` as given, or the
  ``route_top_k`` tokens most over-represented in forget stories
  (:func:`~lightning_gradroute.text_labels.select_concept_tokens`, the paper's virology procedure, on
  ground-truth training stories); :attr:`TinyStoriesDataModule.route_token_ids` holds it.

Partial oversight (label recall): only ``floor(oversight * n_forget)`` training forget stories, drawn with
``seed``, carry a forget label; the rest train as retain. Label precision below 1 adds false positives: retain
training stories that carry a forget label (:func:`label_noise`). ``drop_labelled_forget=True`` is the
data-filtering baseline.

Validation batches carry the ground truth (``route_labels`` = 1 for forget stories), so the mixin logs
``val/loss_retain`` and ``val/loss_forget``. The evaluation pipeline
(:class:`~lightning_gradroute.evaluation.UnlearningEvaluation`) reads the held-out story sets of
:attr:`TinyStoriesDataModule.splits` through its ``*_examples`` and ``collate_examples`` methods.
"""

from __future__ import annotations

import abc
import gzip
import itertools
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from gradroute_experiments.datafiles import data_path
from lightning_gradroute.labels import LabelSource, partial_oversight
from lightning_gradroute.text_labels import (
    FrequencyWeightedLabels,
    TokenSetLabels,
    keyword_documents,
    select_concept_tokens,
    token_frequency_weights,
)

__all__ = [
    "EOS_TEXT",
    "PAPER_FORGET_WORDS",
    "StoryBatches",
    "StorySplits",
    "TinyStoriesDataModule",
    "label_noise",
    "load_tokenizer",
    "read_stories",
]

#: The paper's forget concept (``shared_settings.py: words_to_localize``).
PAPER_FORGET_WORDS = ("tree", "trees", "forest", "forests", "woodland", "woodlands")
EOS_TEXT = "<|endoftext|>"
SAMPLE_FILE = "tinystories_valid_sample.txt"
_SEPARATOR = re.compile(r"^<\|endoftext\|>$", re.MULTILINE)


def read_stories(path: str | Path) -> list[str]:
    """Stories of a TinyStories text file: split on lines equal to ``<|endoftext|>``, stripped, empty ones dropped."""
    text = Path(path).read_text(encoding="utf-8")
    return [story.strip() for story in _SEPARATOR.split(text) if story.strip()]


def load_tokenizer(spec: str, stories: Sequence[str] = (), bpe_vocab_size: int = 4096) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` with ``<|endoftext|>`` as a special token.

    Args:
        spec: ``"bpe"`` trains a byte-level BPE of ``bpe_vocab_size`` tokens on ``stories`` (deterministic,
            about 1 s for the carried sample); ``"hf:<repo>"`` loads a Hub tokenizer (``"hf:Qwen/Qwen2-0.5B"``,
            online or cached); anything else is the path of a tokenizer JSON file, gzipped or not
            (``carried:gpt2-tokenizer/tokenizer.json.gz`` is the GPT-2 / GPT-Neo tokenizer, see
            :mod:`gradroute_experiments.datafiles`).
    """
    if spec == "bpe":
        if not stories:
            raise ValueError("load_tokenizer: training a BPE needs stories")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=bpe_vocab_size,
            special_tokens=[EOS_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(stories, trainer)
        return tokenizer
    if spec.startswith("hf:"):
        tokenizer = Tokenizer.from_pretrained(spec[3:])  # from the Hugging Face Hub (or its local cache)
    else:
        path = data_path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: {spec!r} is neither 'bpe', 'hf:<repo>' nor a tokenizer JSON file")
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    if tokenizer.token_to_id(EOS_TEXT) is None:
        raise ValueError(f"tokenizer {spec!r} has no {EOS_TEXT!r} token")
    return tokenizer


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
    if isinstance(precision, bool) or not isinstance(precision, (int, float)) or not 0 < precision <= 1:
        raise ValueError(f"label_noise: precision must be in (0, 1], got {precision!r}")
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


class _Stories(torch.utils.data.Dataset):
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
            _Stories([ids for ids, _ in pairs], flags, flags),
            batch_size=self.hparams.batch_size,
            collate_fn=self._collate_ground_truth,
            num_workers=self.hparams.num_workers,
        )


class TinyStoriesDataModule(StoryBatches, pl.LightningDataModule):
    """TinyStories split into forget and retain stories, with routing labels per token or per story.

    Example (the quick CPU setting)::

        dm = TinyStoriesDataModule(tokenizer="bpe", bpe_vocab_size=2048, max_tokens=128, oversight=0.5)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        batch["input_ids"].shape, batch["route_labels"].shape      # (B, T), (B, T - 1)

    Args:
        data_dir: folder with ``tinystories_valid_sample.txt`` (used when ``dataset_id`` is None); None: the carried
            sample.
        dataset_id: a Hugging Face dataset id (``"roneneldan/TinyStories"``; the paper used
            ``"delphi-suite/stories"``) to load with ``datasets`` instead of the carried sample.
        text_column: the dataset's text column (``"text"`` for roneneldan, ``"story"`` for delphi-suite).
        num_train_stories: how many training stories to load from ``dataset_id`` (the paper: 500,000).
        tokenizer: ``"bpe"`` (train one on the training stories) or a tokenizer JSON path (``.gz`` allowed).
        bpe_vocab_size: vocabulary size of the trained BPE.
        forget_words: a story is a forget story if it mentions one of these as a whole word (any case).
        oversight: fraction of training forget stories that carry a forget label (label recall; seeded by ``seed``).
        precision: fraction of the labelled training stories that are forget stories; below 1, retain stories
            are labelled forget too (false positives, seeded by ``seed``; see :func:`label_noise`).
        drop_labelled_forget: leave labelled forget stories out of training (the data-filtering baseline).
        labels: ``"frequency"`` per-token soft labels (ERA), ``"document"`` per-story labels (DEMix) or
            ``"tokens"`` per-token labels from a token set (needs ``oversight=1``: every story is routed).
        route_tokens: ``labels="tokens"``: the routed tokens as text, each exactly one token (``" Lily"``).
        route_top_k: ``labels="tokens"``: instead, route the ``route_top_k`` tokens with the highest
            forget / retain frequency ratio (:func:`~lightning_gradroute.text_labels.select_concept_tokens` with
            ``route_min_count`` and ``route_exclude``, single-token strings left out by hand).
        truncate_chars: cut every story to this many characters before classifying and tokenising.
        max_tokens: tokens per story including the leading ``<|endoftext|>``.
        batch_size: training and validation batch size.
        num_val_stories: held-out retain and forget stories each (forget ones after the attack pool).
        num_attack_stories: held-out forget stories for the retraining attack.
        num_retain_pool_stories: held-out retain stories for retraining on the retain side (0: none).
        num_coherence_stories: retain training stories for the coherence fine-tune.
        num_coherence_val_stories: other retain training stories to select the fine-tune's best step.
        frequency_stories: at most this many retain and forget training stories each for the token statistics.
        retain_smoothing / forget_smoothing: add-k pseudo-counts of the token statistics (paper: 20 and 1).
        seed: shuffling, the held-out split and the partial-oversight draw.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        dataset_id: str | None = None,
        text_column: str = "text",
        num_train_stories: int = 500_000,
        tokenizer: str = "carried:gpt2-tokenizer/tokenizer.json.gz",
        bpe_vocab_size: int = 4096,
        forget_words: Sequence[str] = PAPER_FORGET_WORDS,
        oversight: float = 1.0,
        precision: float = 1.0,
        drop_labelled_forget: bool = False,
        labels: Literal["frequency", "document", "tokens"] = "frequency",
        route_tokens: Sequence[str] | None = None,
        route_top_k: int | None = None,
        route_min_count: int = 5,
        route_exclude: Sequence[str] = (),
        truncate_chars: int = 1029,
        max_tokens: int = 256,
        batch_size: int = 80,
        num_val_stories: int = 3000,
        num_attack_stories: int = 64,
        num_retain_pool_stories: int = 0,
        num_coherence_stories: int = 64,
        num_coherence_val_stories: int = 1000,
        frequency_stories: int = 25_000,
        retain_smoothing: float = 20.0,
        forget_smoothing: float = 1.0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= oversight <= 1:
            raise ValueError(f"TinyStoriesDataModule: oversight must be in [0, 1], got {oversight}")
        if isinstance(precision, bool) or not isinstance(precision, (int, float)) or not 0 < precision <= 1:
            raise ValueError(f"TinyStoriesDataModule: precision must be in (0, 1], got {precision!r}")
        if labels not in ("frequency", "document", "tokens"):
            raise ValueError(
                f"TinyStoriesDataModule: labels must be 'frequency', 'document' or 'tokens', got {labels!r}"
            )
        if labels == "tokens":
            if (route_tokens is None) == (route_top_k is None):
                raise ValueError("TinyStoriesDataModule(labels='tokens'): set exactly one of route_tokens, route_top_k")
            if oversight != 1.0 or precision != 1.0 or drop_labelled_forget:
                raise ValueError(
                    "TinyStoriesDataModule(labels='tokens') routes the token set in every story; oversight, "
                    "precision and drop_labelled_forget apply to 'frequency' and 'document' labels"
                )
        elif route_tokens is not None or route_top_k is not None or route_exclude:
            raise ValueError(
                f"TinyStoriesDataModule: route_tokens/route_top_k/route_exclude need labels='tokens', not {labels!r}"
            )
        for name in (
            "truncate_chars",
            "max_tokens",
            "batch_size",
            "num_val_stories",
            "num_attack_stories",
            "num_coherence_stories",
            "num_coherence_val_stories",
            "frequency_stories",
            "bpe_vocab_size",
        ):
            value = locals()[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "max_tokens" else 1):
                raise ValueError(f"TinyStoriesDataModule: {name} must be a positive int, got {value!r}")
        pool = num_retain_pool_stories
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 0:
            raise ValueError(f"TinyStoriesDataModule: num_retain_pool_stories must be an int >= 0, got {pool!r}")
        if tokenizer != "bpe" and not data_path(tokenizer).is_file():
            raise FileNotFoundError(f"TinyStoriesDataModule: tokenizer {tokenizer!r} is neither 'bpe' nor a file")
        if dataset_id is None and not (data_path(data_dir, default="tinystories") / SAMPLE_FILE).is_file():
            raise FileNotFoundError(
                f"TinyStoriesDataModule: {data_path(data_dir, default='tinystories') / SAMPLE_FILE} is missing; put the carried sample there "
                "(the package carries it: leave data_dir None) or set dataset_id to load TinyStories with `datasets`"
            )
        self.save_hyperparameters()
        self.forget_words = tuple(forget_words)
        self.tokenizer: Tokenizer | None = None
        self.splits: StorySplits | None = None
        self.token_weights: Tensor | None = None
        self.label_source: LabelSource | None = None
        #: ``labels="tokens"``: the routed token ids, and each one's forget / retain frequency ratio when chosen by
        #: ``route_top_k`` (``None`` for ``route_tokens``).
        self.route_token_ids: list[int] = []
        self.route_token_ratios: list[float] | None = None

    # ------------------------------------------------------------------ loading
    def _load_texts(self) -> tuple[list[str], list[str]]:
        """(train stories, held-out stories), before shuffling."""
        hp = self.hparams
        if hp.dataset_id is None:
            stories = read_stories(data_path(hp.data_dir, default="tinystories") / SAMPLE_FILE)
            return stories, []  # the held-out sets are carved out of the sample
        import datasets  # only needed online

        train = datasets.load_dataset(hp.dataset_id, split=f"train[:{hp.num_train_stories}]")[hp.text_column]
        held_out = datasets.load_dataset(hp.dataset_id, split="validation")[hp.text_column]
        return [s.strip() for s in train if s.strip()], [s.strip() for s in held_out if s.strip()]

    def encode(self, stories: Sequence[str]) -> list[list[int]]:
        """Token ids of ``<|endoftext|>`` + story, at most ``max_tokens`` long."""
        assert self.tokenizer is not None
        encodings = self.tokenizer.encode_batch([EOS_TEXT + s for s in stories])
        return [e.ids[: self.hparams.max_tokens] for e in encodings]

    def _classify(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of ``texts`` and whether the text the model sees (after both truncations) is a forget story."""
        assert self.tokenizer is not None
        ids = self.encode(texts)
        seen = self.tokenizer.decode_batch([i[1:] for i in ids], skip_special_tokens=False)
        return ids, keyword_documents(seen, self.forget_words).tolist()

    @override
    def setup(self, stage: str) -> None:
        if self.splits is not None:
            return
        hp = self.hparams
        rng = random.Random(hp.seed)
        train_texts, held_out_texts = self._load_texts()
        rng.shuffle(train_texts)
        rng.shuffle(held_out_texts)
        train_texts = [s[: hp.truncate_chars] for s in train_texts]
        held_out_texts = [s[: hp.truncate_chars] for s in held_out_texts]
        # A trained BPE sees every loaded story (with the carried sample that includes the held-out ones): it
        # is only a vocabulary, and the forget split must be decided on the tokens the model is trained on.
        self.tokenizer = load_tokenizer(hp.tokenizer, train_texts + held_out_texts, hp.bpe_vocab_size)
        train_ids, train_forget = self._classify(train_texts)
        if held_out_texts:
            held_ids, held_forget = self._classify(held_out_texts)
        else:
            held_ids, held_forget, train_ids, train_forget = self._carve_held_out(train_ids, train_forget)
        forget_held = [ids for ids, f in zip(held_ids, held_forget) if f]
        retain_held = [ids for ids, f in zip(held_ids, held_forget) if not f]
        need_forget = hp.num_attack_stories + hp.num_val_stories
        need_retain = hp.num_val_stories + hp.num_retain_pool_stories
        if len(forget_held) < need_forget or len(retain_held) < need_retain:
            raise ValueError(
                f"TinyStoriesDataModule: the held-out stories have {len(forget_held)} forget / {len(retain_held)} "
                f"retain; need {need_forget} / {need_retain} (lower num_val_stories, num_attack_stories or "
                "num_retain_pool_stories)"
            )
        train_labelled = label_noise(train_forget, hp.oversight, hp.precision, seed=hp.seed)
        retain_ids = [ids for ids, f in zip(train_ids, train_forget) if not f]
        forget_ids = [ids for ids, f in zip(train_ids, train_forget) if f]
        n_coherence = hp.num_coherence_stories + hp.num_coherence_val_stories
        if len(retain_ids) < n_coherence:
            raise ValueError(
                f"TinyStoriesDataModule: {len(retain_ids)} retain training stories, the coherence fine-tune needs "
                f"{n_coherence} (lower num_coherence_stories or num_coherence_val_stories)"
            )
        # Statistics without the <|endoftext|> prefix, from ground-truth labels (as the paper).
        self.token_weights = token_frequency_weights(
            [ids[1:] for ids in retain_ids[: hp.frequency_stories]],
            [ids[1:] for ids in forget_ids[: hp.frequency_stories]],
            vocab_size=self.vocab_size,
            retain_smoothing=hp.retain_smoothing,
            forget_smoothing=hp.forget_smoothing,
        )
        if hp.labels == "tokens":
            self._choose_route_tokens(
                [ids[1:] for ids in retain_ids[: hp.frequency_stories]],
                [ids[1:] for ids in forget_ids[: hp.frequency_stories]],
            )
            self.label_source = TokenSetLabels(self.route_token_ids)
        else:
            self.label_source = FrequencyWeightedLabels(self.token_weights, document_key="labelled")

        keep = [not (hp.drop_labelled_forget and lab) for lab in train_labelled]
        self.splits = StorySplits(
            train=[ids for ids, k in zip(train_ids, keep) if k],
            train_forget=[f for f, k in zip(train_forget, keep) if k],
            train_labelled=[lab for lab, k in zip(train_labelled, keep) if k],
            retain_val=retain_held[: hp.num_val_stories],
            forget_val=forget_held[hp.num_attack_stories : need_forget],
            attack_pool=forget_held[: hp.num_attack_stories],
            retain_pool=retain_held[hp.num_val_stories : need_retain],
            coherence_train=retain_ids[: hp.num_coherence_stories],
            coherence_val=retain_ids[hp.num_coherence_stories : n_coherence],
        )

    def _choose_route_tokens(self, retain: list[list[int]], forget: list[list[int]]) -> None:
        hp = self.hparams
        if hp.route_tokens is not None:
            self.route_token_ids = [self.single_token(text, "route_tokens entry") for text in hp.route_tokens]
            return
        chosen = select_concept_tokens(
            retain,
            forget,
            vocab_size=self.vocab_size,
            top_k=hp.route_top_k,
            min_forget_count=hp.route_min_count,
            exclude=[self.eos_id] + [self.single_token(text, "route_exclude entry") for text in hp.route_exclude],
        )
        self.route_token_ids = [token for token, _ in chosen]
        self.route_token_ratios = [ratio for _, ratio in chosen]

    def _carve_held_out(
        self, ids: list[list[int]], forget: list[bool]
    ) -> tuple[list[list[int]], list[bool], list[list[int]], list[bool]]:
        """Split one story list into held-out and training stories: the first forget and retain stories (in the
        shuffled order) that the test sets and the attack pool need are held out."""
        hp = self.hparams
        need = {
            True: hp.num_attack_stories + hp.num_val_stories,
            False: hp.num_val_stories + hp.num_retain_pool_stories,
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

    # -------------------------------------------------------------- batching
    @override
    def route_labels(self, batch: dict[str, Tensor]) -> Tensor:
        if self.hparams.labels == "document":
            return batch["labelled"].long()
        assert self.label_source is not None
        return self.label_source(batch)

    @override
    def train_dataloader(self) -> DataLoader:
        splits = self._require_splits()
        dataset = _Stories(splits.train, splits.train_forget, splits.train_labelled)
        generator = torch.Generator().manual_seed(self.hparams.seed)
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
        """Counts of the story sets and the routed tokens (for results.json and the README)."""
        splits = self._require_splits()
        flags = list(zip(splits.train_forget, splits.train_labelled))
        assert self.tokenizer is not None
        routed = [
            {"id": token, "text": self.tokenizer.decode([token])}
            | ({"ratio": round(self.route_token_ratios[i], 2)} if self.route_token_ratios else {})
            for i, token in enumerate(self.route_token_ids)
        ]
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
        } | ({"routed_tokens": routed} if routed else {})
