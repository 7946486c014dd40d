"""Turning a batch into routing labels.

Labels are integers (an index into the router's label names) or floats in [0, 1] (soft labels: the degree to
which an item belongs to label 1 rather than label 0), of shape ``(B,)`` per example or ``(B, T)`` per token.

By default the callback reads ``batch[label_key]``. Anything else (labels computed from token ids, a keyword
list, a frequency table) is a :class:`LabelSource`: an importable class, so it can be named in a YAML recipe
with ``class_path`` / ``init_args``. Label sources for text (token sets, the paper's frequency-weighted soft
labels, keyword documents) are in :mod:`lightning_gradroute.text_labels`.

:func:`partial_oversight` labels only a random fraction of the items of a kind (the paper's oversight levels).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BatchKey",
    "LabelSource",
    "check_labels",
    "label_counts",
    "label_membership",
    "partial_oversight",
    "syncs_are_costly",
]


class LabelSource(ABC):
    """Maps a training batch to routing labels. Subclass it, implement :meth:`__call__` and pass an instance as
    ``GradientRoutingCallback(label_source=...)`` (YAML: ``label_source: {class_path: mypackage.HighDigits}``).

    Example (tuple batches ``(x, y)`` without labels; digits 5-9 get the second label)::

        >>> class HighDigits(LabelSource):
        ...     def __call__(self, batch):
        ...         x, y = batch[:2]
        ...         return (y >= 5).long()
        >>> HighDigits()((torch.zeros(3, 8), torch.tensor([1, 7, 5])))
        tensor([0, 1, 1])

    Labels the batch carries need none: :class:`BatchKey` (the callback's ``label_key``) reads them, ``2`` for
    batches ``(x, y, labels)`` (a ``training_step`` that unpacks ``x, y, labels = batch`` keeps working).
    """

    @abstractmethod
    def __call__(self, batch: Any) -> Tensor:
        """Return the labels for ``batch``: integer ``(B,)``/``(B, T)`` or float soft labels in [0, 1]."""


class BatchKey(LabelSource):
    """Read labels from the batch: ``batch[key]`` for mappings, ``batch[index]`` for tuples and lists.

    Args:
        key: a mapping key (``"route_labels"``) or a position in a tuple batch (``2`` for ``(x, y, labels)``).
        remove: pop the labels out of a dict batch before ``training_step`` sees it (useful when the step
            does ``model(**batch)``).
    """

    def __init__(self, key: str | int = "route_labels", remove: bool = False) -> None:
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise ValueError(f"BatchKey: key must be a str or an int, got {key!r}")
        self.key = key
        self.remove = remove

    def __call__(self, batch: Any) -> Tensor:
        if isinstance(batch, Mapping):
            if self.key not in batch:
                raise KeyError(f"routing labels: batch has no key {self.key!r} (keys: {sorted(map(str, batch))})")
            return batch.pop(self.key) if self.remove and isinstance(batch, dict) else batch[self.key]
        if isinstance(batch, Sequence) and isinstance(self.key, int):
            if not -len(batch) <= self.key < len(batch):
                raise KeyError(f"routing labels: batch has {len(batch)} elements, no index {self.key}")
            return batch[self.key]
        raise KeyError(f"routing labels: cannot take {self.key!r} from a batch of type {type(batch).__name__}")


def syncs_are_costly(tensor: Tensor) -> bool:
    """Whether reading a value of ``tensor`` on the host would stall a device queue (any accelerator)."""
    return tensor.device.type != "cpu"


def check_labels(labels: Any, label_names: Sequence[str], full: bool | None = None) -> Tensor:
    """Validate routing labels and return them as an int64 (hard) or floating (soft) tensor.

    Shape and dtype are checked always (metadata, free). The value ranges need the values: ``full=True`` checks
    them on the host, with a one-line error naming the bad labels, which on an accelerator waits for the device;
    ``full=False`` enqueues a device-side assertion instead (``torch._assert_async``): no host sync, and a bad
    label still stops the run, as a device-side assertion error carrying the same message. ``None``: full on the
    CPU, device-side on accelerators (the router checks the first batch in full, later ones device-side).

    Raises:
        ValueError: wrong type, shape, dtype, an unknown label index, or soft labels outside [0, 1].
    """
    if not isinstance(labels, Tensor):
        raise ValueError(f"routing labels must be a tensor, got {type(labels).__name__}")
    if labels.dim() not in (1, 2):
        raise ValueError(
            f"routing labels must have shape (B,) per example or (B, T) per token, got {tuple(labels.shape)}"
        )
    if labels.dtype == torch.bool:
        labels = labels.long()
    full = not syncs_are_costly(labels) if full is None else full
    if labels.is_floating_point():
        if len(label_names) != 2:
            raise ValueError(
                f"soft (float) routing labels interpolate between two labels; this router has {len(label_names)}: "
                f"{list(label_names)}"
            )
        valid = (labels >= 0) & (labels <= 1)
        if not full:
            torch._assert_async(valid.all(), "soft routing labels must lie in [0, 1]")
        elif labels.numel() and not bool(valid.all()):
            raise ValueError(
                f"soft routing labels must lie in [0, 1]; got values in [{labels.min().item()}, {labels.max().item()}]"
            )
        return labels
    if labels.is_complex() or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"routing labels must be integer, bool or float, got dtype {labels.dtype}")
    valid = (labels >= 0) & (labels < len(label_names))
    if not full:
        message = f"routing labels must be valid indices 0..{len(label_names) - 1} for {list(label_names)}"
        torch._assert_async(valid.all(), message)
    elif labels.numel() and not bool(valid.all()):
        bad = labels[~valid].unique().tolist()
        raise ValueError(
            f"routing labels {bad} are unknown: valid indices are 0..{len(label_names) - 1} for {list(label_names)}"
        )
    return labels.long()


def label_membership(labels: Tensor, num_labels: int) -> Tensor:
    """How much each item belongs to each label, ``(*labels.shape, num_labels)``: one-hot for integer labels,
    ``(1 - s, s)`` for soft labels ``s``. (A comparison, not ``F.one_hot``, which reads the labels' maximum on
    the host.)"""
    if labels.is_floating_point():
        return torch.stack([1 - labels, labels], dim=-1)
    indices = torch.arange(num_labels, device=labels.device)
    return (labels.unsqueeze(-1) == indices).to(torch.get_default_dtype())


def label_counts(labels: Tensor, num_labels: int) -> Tensor:
    """Items per label (float64; soft labels count fractionally), computed on the labels' device without a host
    sync (``torch.bincount`` reads the maximum on the host)."""
    if labels.is_floating_point():
        second = labels.sum(dtype=torch.float64)
        return torch.stack([labels.numel() - second, second])
    counts = torch.zeros(num_labels, dtype=torch.float64, device=labels.device)
    return counts.index_add_(0, labels.flatten(), torch.ones(labels.numel(), dtype=torch.float64, device=labels.device))


def partial_oversight(is_forget: Tensor | Sequence[bool], fraction: float, seed: int = 0) -> Tensor:
    """Which items carry a forget label when only ``fraction`` of the forget items are labelled.

    Exactly ``floor(fraction * n_forget)`` forget items, drawn uniformly at random with ``seed``, are labelled;
    the others (and every retain item) are not, so they train as retain. The draw is one seeded permutation, so
    for a fixed seed the labelled set grows monotonically with ``fraction`` (oversight levels are nested).

    Returns:
        A bool tensor of the same length as ``is_forget``.
    """
    flags = torch.as_tensor(is_forget)
    if flags.dim() != 1 or not (flags.dtype == torch.bool or not flags.is_floating_point()):
        raise ValueError(f"partial_oversight: is_forget must be a 1-d bool sequence, got shape {tuple(flags.shape)}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"partial_oversight: fraction must be in [0, 1], got {fraction!r}")
    forget_index = flags.bool().nonzero().flatten()
    generator = torch.Generator().manual_seed(seed)
    order = forget_index[torch.randperm(forget_index.numel(), generator=generator)]
    labelled = torch.zeros(flags.numel(), dtype=torch.bool)
    labelled[order[: math.floor(fraction * forget_index.numel() + 1e-9)]] = True
    return labelled
