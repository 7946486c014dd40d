"""Label sources for text: which tokens or documents are routed, from token ids, words or token frequencies.

Model-agnostic builders (they see strings and token ids only):

* :func:`keyword_regex` / :func:`keyword_documents`: which documents mention any of some words, matched as
  whole words, case-insensitively (``" forest"``, ``"Forest,"`` yes; ``"forestry"``, ``"street"`` no);
* :class:`TokenSetLabels`: per-token labels from a set of token ids;
* :func:`token_frequency_weights` and :class:`FrequencyWeightedLabels`: the paper's soft per-token labels from
  how much more often a token occurs in forget than in retain documents;
* :func:`select_concept_tokens`: the paper's choice of a concept's token set (its virology experiment) by the
  same frequency ratio, for :class:`TokenSetLabels`.

Per-token labels are keyed by the *next* token by default: position ``t`` of a model fed ``input_ids[:, :-1]``
predicts ``input_ids[:, t + 1]``, and it is that target which decides how the position's gradient is routed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gradroute.labels import LabelSource

__all__ = [
    "FrequencyWeightedLabels",
    "TokenSetLabels",
    "keyword_documents",
    "keyword_regex",
    "select_concept_tokens",
    "token_frequency_weights",
]


def keyword_regex(words: Sequence[str]) -> re.Pattern[str]:
    """A case-insensitive regex that matches any of ``words`` as a whole word.

    A match may not touch a letter, digit or underscore on either side, so ``"forest"`` matches ``" forest"``,
    ``"Forest,"`` and ``"forest's"`` but not ``"forests"``, ``"afforest"`` or ``"forestry"`` (list inflections
    separately, as the paper does). Words are matched literally (regex characters are escaped).

    Example::

        >>> bool(keyword_regex(["tree", "forest"]).search("A big Forest."))
        True
        >>> bool(keyword_regex(["tree"]).search("down the street"))
        False
    """
    if isinstance(words, str) or not isinstance(words, Sequence) or not words:
        raise ValueError(f"keyword_regex: words must be a non-empty list of strings, got {words!r}")
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"keyword_regex: every word must be a non-blank string, got {word!r}")
    alternatives = "|".join(re.escape(w.strip()) for w in sorted(set(words), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def keyword_documents(texts: Iterable[str], words: Sequence[str]) -> Tensor:
    """A bool tensor: which of ``texts`` mention any of ``words`` as a whole word (see :func:`keyword_regex`)."""
    pattern = keyword_regex(words)
    return torch.tensor([pattern.search(text) is not None for text in texts], dtype=torch.bool)


def _token_ids(batch: Any, key: str, next_token: bool, who: str) -> Tensor:
    if not isinstance(batch, Mapping) or key not in batch:
        raise KeyError(f"{who}: the batch has no {key!r} entry")
    ids = batch[key]
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise ValueError(f"{who}: batch[{key!r}] must be an integer (B, T) tensor of token ids")
    return ids[:, 1:] if next_token else ids


class TokenSetLabels(LabelSource):
    """Per-token labels: ``label`` where the token is one of ``token_ids``, ``other`` everywhere else.

    Example (route every position that predicts " California")::

        source = TokenSetLabels(token_ids=[tokenizer.encode(" California")[0]])
        GradientRoutingCallback(..., label_source=source)

    Args:
        token_ids: the token ids that get ``label``.
        token_key: the batch entry holding ``(B, T)`` token ids.
        next_token: key each position by the token it predicts: the labels are ``(B, T - 1)`` and fit a model fed
            ``input_ids[:, :-1]``. With ``False`` they are ``(B, T)`` and keyed by the token at the position.
        label: the label index for positions whose token is in the set.
        other: the label index for all other positions.
    """

    def __init__(
        self,
        token_ids: Sequence[int],
        token_key: str = "input_ids",
        next_token: bool = True,
        label: int = 1,
        other: int = 0,
    ) -> None:
        ids = list(token_ids)
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"TokenSetLabels: token_ids must be a non-empty list of non-negative ints, got {ids!r}")
        for name, value in (("label", label), ("other", other)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TokenSetLabels: {name} must be a label index (int >= 0), got {value!r}")
        self.token_ids = torch.tensor(sorted(set(ids)), dtype=torch.long)
        self.token_key = token_key
        self.next_token = next_token
        self.label = label
        self.other = other

    def __call__(self, batch: Any) -> Tensor:
        ids = _token_ids(batch, self.token_key, self.next_token, "TokenSetLabels")
        hit = torch.isin(ids, self.token_ids.to(ids.device))
        return torch.where(hit, self.label, self.other).long()


def token_frequency_weights(
    retain_tokens: Iterable[Sequence[int] | Tensor],
    forget_tokens: Iterable[Sequence[int] | Tensor],
    vocab_size: int,
    retain_smoothing: float = 20.0,
    forget_smoothing: float = 1.0,
    sharpness: float = 1.0,
    offset: float = 4.0,
) -> Tensor:
    r"""The paper's per-token retain weight: ``w = 1 - sigmoid(sharpness * (r - 1/r) - offset)``.

    ``r = f_forget / f_retain`` is the ratio of a token's relative frequency in the forget documents to that in
    the retain documents, after add-k smoothing (``forget_smoothing`` / ``retain_smoothing`` pseudo-counts per
    vocabulary entry). With the defaults (the paper's), ``w`` is about 0.98 for ``r = 1``, 0.56 for ``r = 4``,
    0.31 for ``r = 5`` and 0.003 for ``r = 10``: tokens several times more frequent in forget documents are
    routed, common ones are not. A token absent from both (possible only without smoothing) gets ``r = 1``.

    Args:
        retain_tokens: token-id sequences of retain documents.
        forget_tokens: token-id sequences of forget documents.
        vocab_size: length of the returned table; every id must be below it.

    Returns:
        A float32 ``(vocab_size,)`` tensor of weights in [0, 1]; 1 means "retain", 0 "fully forget".
    """
    _check_vocab_size(vocab_size, "token_frequency_weights")
    for name, value in (("retain_smoothing", retain_smoothing), ("forget_smoothing", forget_smoothing)):
        if not value >= 0 or math.isinf(value):
            raise ValueError(f"token_frequency_weights: {name} must be a finite number >= 0, got {value!r}")
    frequencies = []
    for name, docs, smoothing in (
        ("retain", retain_tokens, retain_smoothing),
        ("forget", forget_tokens, forget_smoothing),
    ):
        counts = _token_counts(docs, vocab_size, name, "token_frequency_weights") + smoothing
        if counts.sum() == 0:
            raise ValueError(f"token_frequency_weights: no {name} tokens and no smoothing; frequencies are undefined")
        frequencies.append(counts / counts.sum())
    f_retain, f_forget = frequencies
    # r - 1/r = (f² - g²) / (f g), which is -inf / +inf where one frequency is 0 and 0 where both are.
    with torch.no_grad():
        numerator = f_forget.square() - f_retain.square()
        spread = torch.where(numerator == 0, torch.zeros_like(numerator), numerator / (f_forget * f_retain))
        return (1 - torch.sigmoid(sharpness * spread - offset)).float()


def _check_vocab_size(vocab_size: int, who: str) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"{who}: vocab_size must be a positive int, got {vocab_size!r}")


def _token_counts(docs: Iterable[Sequence[int] | Tensor], vocab_size: int, name: str, who: str) -> Tensor:
    """How often each id occurs in ``docs``: a float64 ``(vocab_size,)`` tensor."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for doc in docs:
        ids = torch.as_tensor(doc, dtype=torch.long).flatten()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"{who}: a {name} token id is outside [0, {vocab_size})")
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def select_concept_tokens(
    retain_tokens: Iterable[Sequence[int] | Tensor],
    forget_tokens: Iterable[Sequence[int] | Tensor],
    vocab_size: int,
    top_k: int,
    min_forget_count: int = 5,
    retain_floor: float = 0.1,
    exclude: Iterable[int] = (),
) -> list[tuple[int, float]]:
    r"""The paper's choice of a concept's token set: the ``top_k`` tokens most over-represented in forget documents.

    Each token is scored by the ratio of its relative frequency in the forget documents to that in the retain
    documents, ``(c_forget / N_forget) / (max(c_retain, retain_floor) / N_retain)`` (``c``: occurrences, ``N``:
    all tokens of that side; a token absent from the retain documents counts ``retain_floor`` times there, as in
    the paper's ``get-optimal-words-to-mask.py``, which used 0.1). Tokens seen fewer than ``min_forget_count``
    times in the forget documents are not eligible (their ratio is noise), nor are the ids in ``exclude`` (the
    paper's hand curation: ambiguous tokens, special tokens).

    Example (route the 20 most food-specific tokens of TinyStories)::

        chosen = select_concept_tokens(retain_ids, food_story_ids, vocab_size=2048, top_k=20)
        source = TokenSetLabels(token_ids=[token for token, _ in chosen])

    Returns:
        ``top_k`` ``(token_id, ratio)`` pairs, highest ratio first (ties: lower id first).

    Raises:
        ValueError: bad arguments, ids outside ``[0, vocab_size)``, an empty side, or fewer than ``top_k``
            eligible tokens.
    """
    who = "select_concept_tokens"
    _check_vocab_size(vocab_size, who)
    for name, value, minimum in (("top_k", top_k, 1), ("min_forget_count", min_forget_count, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{who}: {name} must be an int >= {minimum}, got {value!r}")
    if not 0 < retain_floor < float("inf"):
        raise ValueError(f"{who}: retain_floor must be a positive number, got {retain_floor!r}")
    retain = _token_counts(retain_tokens, vocab_size, "retain", who)
    forget = _token_counts(forget_tokens, vocab_size, "forget", who)
    for name, counts in (("retain", retain), ("forget", forget)):
        if counts.sum() == 0:
            raise ValueError(f"{who}: the {name} documents have no tokens")
    ratio = (forget / forget.sum()) / (retain.clamp_min(retain_floor) / retain.sum())
    eligible = forget >= min_forget_count
    excluded = torch.tensor(sorted(set(exclude)), dtype=torch.long)
    if excluded.numel():
        if int(excluded.min()) < 0 or int(excluded.max()) >= vocab_size:
            raise ValueError(f"{who}: an excluded id is outside [0, {vocab_size})")
        eligible[excluded] = False
    candidates = eligible.nonzero().flatten().tolist()
    if len(candidates) < top_k:
        raise ValueError(
            f"{who}: only {len(candidates)} tokens occur at least {min_forget_count} times in the forget documents "
            f"(after exclusions); lower top_k ({top_k}) or min_forget_count"
        )
    ranked = sorted(candidates, key=lambda token: (-float(ratio[token]), token))
    return [(token, float(ratio[token])) for token in ranked[:top_k]]


class FrequencyWeightedLabels(LabelSource):
    r"""Soft per-token labels: ``1 - w[token]`` in documents flagged forget, 0 in every other document.

    ``w`` is a per-vocabulary retain weight such as :func:`token_frequency_weights`. This is the paper's
    "retain always unmasked" rule: each token of a labelled forget document is routed as much as it is
    characteristic of forget data, and retain documents (and unlabelled forget documents) are not routed.
    With ``Route("forget", "mlp", {"original": -0.75, "expanded": 1.0})`` the callback multiplies the original
    units' gradient by ``(1 - s) * 1 + s * (-0.75) = 1.75 * w - 0.75``, the paper's ERA mask.

    Example::

        weights = token_frequency_weights(retain_ids, forget_ids, vocab_size=tokenizer.vocab_size)
        source = FrequencyWeightedLabels(weights, document_key="forget")
        labels = source({"input_ids": ids, "forget": flags})      # (B, T - 1) floats in [0, 1]

    Args:
        retain_weights: ``(vocab_size,)`` weights in [0, 1].
        document_key: the batch entry holding ``(B,)`` bool/0-1 flags of the documents to route.
        token_key: the batch entry holding ``(B, T)`` token ids.
        next_token: key each position by the token it predicts (``(B, T - 1)`` labels), as the paper does.
    """

    def __init__(
        self,
        retain_weights: Tensor | Sequence[float],
        document_key: str = "forget",
        token_key: str = "input_ids",
        next_token: bool = True,
    ) -> None:
        weights = torch.as_tensor(retain_weights, dtype=torch.float32)
        if weights.dim() != 1 or not weights.numel():
            raise ValueError(
                f"FrequencyWeightedLabels: retain_weights must be a (vocab_size,) tensor, got {tuple(weights.shape)}"
            )
        if not bool(((weights >= 0) & (weights <= 1)).all()):
            raise ValueError("FrequencyWeightedLabels: retain_weights must lie in [0, 1]")
        self.forget_weights = 1 - weights
        self.document_key = document_key
        self.token_key = token_key
        self.next_token = next_token

    def __call__(self, batch: Any) -> Tensor:
        ids = _token_ids(batch, self.token_key, self.next_token, "FrequencyWeightedLabels")
        if self.document_key not in batch:
            raise KeyError(f"FrequencyWeightedLabels: the batch has no {self.document_key!r} entry")
        documents = torch.as_tensor(batch[self.document_key], device=ids.device)
        if documents.shape != ids.shape[:1]:
            raise ValueError(
                f"FrequencyWeightedLabels: batch[{self.document_key!r}] has shape {tuple(documents.shape)}, "
                f"expected ({ids.shape[0]},)"
            )
        if ids.numel() and int(ids.max()) >= self.forget_weights.numel():
            raise ValueError(
                f"FrequencyWeightedLabels: token id {int(ids.max())} is outside the "
                f"{self.forget_weights.numel()}-entry table"
            )
        return self.forget_weights.to(ids.device)[ids] * documents.to(torch.float32)[:, None]
