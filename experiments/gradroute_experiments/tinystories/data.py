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
training stories that carry a forget label (:func:`~gradroute_experiments.text.stories.label_noise`).
``drop_labelled_forget=True`` is the data-filtering baseline.

Validation batches carry the ground truth (``route_labels`` = 1 for forget stories), so the mixin logs
``val/loss_retain`` and ``val/loss_forget``. The evaluation pipeline
(:class:`~lightning_gradroute.evaluation.UnlearningEvaluation`) reads the held-out story sets of
:attr:`TinyStoriesDataModule.splits` through the text layer's ``*_examples`` and ``collate_examples`` methods.

The shuffles, the tokenizer, the held-out split, the label noise and the batching are the text layer's
(:class:`~gradroute_experiments.text.story_module.StoryDataModule`, which the two-language data module shares);
this module adds what is TinyStories: the forget words, the dataset, the per-token routing labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor
from typing_extensions import override

from gradroute_experiments.datafiles import data_path
from gradroute_experiments.text.checks import require_file, require_fraction, require_ints
from gradroute_experiments.text.stories import read_stories, tinystories_sample
from gradroute_experiments.text.story_module import StoryDataModule, StorySettings
from lightning_gradroute.labels import LabelSource
from lightning_gradroute.text_labels import (
    FrequencyWeightedLabels,
    TokenSetLabels,
    keyword_documents,
    select_concept_tokens,
)

__all__ = ["PAPER_FORGET_WORDS", "TinyStoriesDataModule"]

#: The paper's forget concept (``shared_settings.py: words_to_localize``).
PAPER_FORGET_WORDS = ("tree", "trees", "forest", "forests", "woodland", "woodlands")


class TinyStoriesDataModule(StoryDataModule):
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
            are labelled forget too (false positives, seeded by ``seed``; see
            :func:`~gradroute_experiments.text.stories.label_noise`).
        drop_labelled_forget: leave labelled forget stories out of training (the data-filtering baseline).
        labels: ``"frequency"`` per-token soft labels (ERA), ``"document"`` per-story labels (DEMix) or
            ``"tokens"`` per-token labels from a token set (needs ``oversight=1``: every story is routed).
        route_tokens: ``labels="tokens"``: the routed tokens as text, each exactly one token (``" Lily"``).
        route_top_k: ``labels="tokens"``: instead, route the ``route_top_k`` tokens with the highest
            forget / retain frequency ratio (:func:`~lightning_gradroute.text_labels.select_concept_tokens` with
            ``route_min_count`` and ``route_exclude``, single-token strings left out by hand).
        route_held_out: ``route_top_k`` only: this many of the chosen tokens are *not* routed but held out, so
            that an evaluation can measure absorption on concept tokens the routing never saw: ranks 2, 4, 6, ...
            by frequency ratio (every other one, so the routed and held-out halves span the same range); at most
            ``route_top_k // 2``.
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
        route_held_out: int = 0,
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
        owner = "TinyStoriesDataModule"
        require_fraction(owner, "oversight", oversight)
        require_fraction(owner, "precision", precision, zero_allowed=False)
        if labels not in ("frequency", "document", "tokens"):
            raise ValueError(f"{owner}: labels must be 'frequency', 'document' or 'tokens', got {labels!r}")
        if labels == "tokens":
            if (route_tokens is None) == (route_top_k is None):
                raise ValueError(f"{owner}(labels='tokens'): set exactly one of route_tokens, route_top_k")
            if oversight != 1.0 or precision != 1.0 or drop_labelled_forget:
                raise ValueError(
                    f"{owner}(labels='tokens') routes the token set in every story; oversight, precision and "
                    "drop_labelled_forget apply to 'frequency' and 'document' labels"
                )
        elif route_tokens is not None or route_top_k is not None or route_exclude:
            raise ValueError(f"{owner}: route_tokens/route_top_k/route_exclude need labels='tokens', not {labels!r}")
        if route_held_out and (route_top_k is None or not 0 < route_held_out <= route_top_k // 2):
            raise ValueError(
                f"{owner}: route_held_out={route_held_out} needs route_top_k and at most route_top_k // 2 "
                f"(route_top_k={route_top_k}): the held-out tokens are every other one of the chosen"
            )
        require_ints(
            owner,
            {  # argument: (value, smallest allowed)
                "truncate_chars": (truncate_chars, 1),
                "max_tokens": (max_tokens, 2),
                "batch_size": (batch_size, 1),
                "num_val_stories": (num_val_stories, 1),
                "num_attack_stories": (num_attack_stories, 1),
                "num_retain_pool_stories": (num_retain_pool_stories, 0),
                "num_coherence_stories": (num_coherence_stories, 1),
                "num_coherence_val_stories": (num_coherence_val_stories, 1),
                "frequency_stories": (frequency_stories, 1),
                "bpe_vocab_size": (bpe_vocab_size, 1),
            },
        )
        if tokenizer != "bpe" and not data_path(tokenizer).is_file():
            raise FileNotFoundError(f"{owner}: tokenizer {tokenizer!r} is neither 'bpe' nor a file")
        if dataset_id is None:
            require_file(
                tinystories_sample(data_dir),
                owner,
                "put the carried sample there (the package carries it: leave data_dir None) or set dataset_id to "
                "load TinyStories with `datasets`",
            )
        super().__init__(
            StorySettings(
                tokenizer=tokenizer,
                bpe_vocab_size=bpe_vocab_size,
                recall=oversight,
                precision=precision,
                drop_labelled_forget=drop_labelled_forget,
                num_val_stories=num_val_stories,
                num_attack_stories=num_attack_stories,
                num_retain_pool_stories=num_retain_pool_stories,
                num_coherence_stories=num_coherence_stories,
                num_coherence_val_stories=num_coherence_val_stories,
                seed=seed,
                truncate_chars=truncate_chars,
                frequency_stories=frequency_stories,
                retain_smoothing=retain_smoothing,
                forget_smoothing=forget_smoothing,
            )
        )
        self.save_hyperparameters()
        self.forget_words = tuple(forget_words)
        self.label_source: LabelSource | None = None
        #: ``labels="tokens"``: the routed token ids, and each one's forget / retain frequency ratio when chosen by
        #: ``route_top_k`` (``None`` for ``route_tokens``).
        self.route_token_ids: list[int] = []
        self.route_token_ratios: list[float] | None = None
        #: ``route_held_out``: the chosen concept tokens left unrouted, and their ratios.
        self.held_out_token_ids: list[int] = []
        self.held_out_token_ratios: list[float] = []

    # ------------------------------------------------------------------ loading
    @override
    def load_texts(self) -> tuple[list[str], list[str]]:
        hp = self.hparams
        if hp.dataset_id is None:
            stories = read_stories(tinystories_sample(hp.data_dir))
            return stories, []  # the held-out sets are carved out of the sample
        import datasets  # only needed online

        train = datasets.load_dataset(hp.dataset_id, split=f"train[:{hp.num_train_stories}]")[hp.text_column]
        held_out = datasets.load_dataset(hp.dataset_id, split="validation")[hp.text_column]
        return [s.strip() for s in train if s.strip()], [s.strip() for s in held_out if s.strip()]

    @override
    def classify(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of ``texts`` (at most ``max_tokens``) and whether the text the model sees (after both
        truncations) mentions a forget word."""
        assert self.tokenizer is not None
        ids = self.encode(texts, self.hparams.max_tokens)
        seen = self.tokenizer.decode_batch([i[1:] for i in ids], skip_special_tokens=False)
        return ids, keyword_documents(seen, self.forget_words).tolist()

    @override
    def fit_labels(self, retain: list[list[int]], forget: list[list[int]]) -> None:
        if self.hparams.labels == "tokens":
            self._choose_route_tokens(retain, forget)
            self.label_source = TokenSetLabels(self.route_token_ids)
        else:
            self.label_source = FrequencyWeightedLabels(self.token_weights, document_key="labelled")

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
        held = set(range(1, 2 * hp.route_held_out, 2))  # ranks 2, 4, ... (0-based odd positions)
        self.route_token_ids = [token for i, (token, _) in enumerate(chosen) if i not in held]
        self.route_token_ratios = [ratio for i, (_, ratio) in enumerate(chosen) if i not in held]
        self.held_out_token_ids = [token for i, (token, _) in enumerate(chosen) if i in held]
        self.held_out_token_ratios = [ratio for i, (_, ratio) in enumerate(chosen) if i in held]

    # -------------------------------------------------------------- batching
    @override
    def route_labels(self, batch: dict[str, Tensor]) -> Tensor:
        if self.hparams.labels == "document":
            return batch["labelled"].long()
        assert self.label_source is not None
        return self.label_source(batch)

    @override
    def summary(self) -> dict[str, Any]:
        """The story counts of :meth:`StoryDataModule.summary` and the routed tokens (for results.json and the
        README)."""
        assert self.tokenizer is not None
        decode = self.tokenizer.decode
        routed = [
            {"id": token, "text": decode([token])}
            | ({"ratio": round(self.route_token_ratios[i], 2)} if self.route_token_ratios else {})
            for i, token in enumerate(self.route_token_ids)
        ]
        held_out = [
            {"id": token, "text": decode([token]), "ratio": round(ratio, 2)}
            for token, ratio in zip(self.held_out_token_ids, self.held_out_token_ratios)
        ]
        return (
            super().summary()
            | ({"routed_tokens": routed} if routed else {})
            | ({"held_out_tokens": held_out} if held_out else {})
        )
