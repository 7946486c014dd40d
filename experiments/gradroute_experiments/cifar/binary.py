"""CIFAR-100 in its standard binary format (no pickle): reader, archive check and extraction, fetch.

The binary version (https://www.cs.toronto.edu/~kriz/cifar.html, "CIFAR-100 binary version (suitable for C
programs)") is ``cifar-100-binary.tar.gz`` holding ``cifar-100-binary/train.bin`` (50,000 images) and
``test.bin`` (10,000). Each record is 3,074 bytes: the coarse label (0-19), the fine label (0-99), then
3,072 pixel bytes, the red, green and blue 32x32 planes in row-major order.

A ``data_dir`` is ready when it holds ``cifar-100-binary/train.bin`` and ``test.bin`` (what extracting the
archive there gives). :func:`prepare_cifar100` fills it from the archive, which it downloads when it is not
there, checking the archive's published md5 before extracting anything.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradroute_experiments.download import fetch, file_digest

__all__ = [
    "CIFAR100_ARCHIVE",
    "CIFAR100_FILES",
    "CIFAR100_MD5",
    "CIFAR100_RECORDS",
    "CIFAR100_URL",
    "cifar100_missing",
    "load_cifar100",
    "prepare_cifar100",
    "read_cifar_binary",
]

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
CIFAR100_ARCHIVE = "cifar-100-binary.tar.gz"
#: The md5 the dataset's page publishes for the archive (168,513,733 bytes).
CIFAR100_MD5 = "03b5dce01913d631647c71ecec9e9cb8"
#: The files a data_dir needs, relative to it, per split.
CIFAR100_FILES = {"train": "cifar-100-binary/train.bin", "test": "cifar-100-binary/test.bin"}
#: Records per split of the original files.
CIFAR100_RECORDS = {"train": 50_000, "test": 10_000}
#: Label bytes of a CIFAR-100 record and their ranges: coarse (20 superclasses), fine (100 classes).
CIFAR100_LABELS = (20, 100)
IMAGE_BYTES = 3 * 32 * 32


def read_cifar_binary(
    path: str | os.PathLike, label_ranges: Sequence[int] = CIFAR100_LABELS, records: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read a CIFAR binary file into ``(images, labels)``: uint8 ``(N, 3, 32, 32)`` and ``(N, len(label_ranges))``.

    Args:
        path: the ``.bin`` file.
        label_ranges: how many label bytes lead each record and the number of values each may take
            (CIFAR-100: ``(20, 100)``, coarse then fine; CIFAR-10: ``(10,)``).
        records: if given, the number of records the file must hold.

    Raises:
        ValueError: the file is not a whole number of records (truncated or not CIFAR), holds another number of
            records than ``records``, or a label is out of its range.
    """
    path = Path(path)
    record = len(label_ranges) + IMAGE_BYTES
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise ValueError(
            f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records (truncated or not "
            f"a CIFAR binary file with {len(label_ranges)} label byte(s))"
        )
    rows = raw.reshape(-1, record)
    if records is not None and len(rows) != records:
        raise ValueError(f"{path}: holds {len(rows)} records, expected {records} (truncated or another file)")
    labels = rows[:, : len(label_ranges)].astype(np.int64)
    for i, limit in enumerate(label_ranges):
        bad = np.flatnonzero(labels[:, i] >= limit)
        if bad.size:
            raise ValueError(
                f"{path}: label byte {i} of record {bad[0]} is {labels[bad[0], i]}, outside 0-{limit - 1} "
                f"({bad.size} records out of range; not a CIFAR file with these labels)"
            )
    return rows[:, len(label_ranges) :].reshape(-1, 3, 32, 32), labels


def cifar100_missing(data_dir: str | os.PathLike) -> list[str]:
    """The files of :data:`CIFAR100_FILES` that ``data_dir`` lacks."""
    return [name for name in CIFAR100_FILES.values() if not (Path(data_dir) / name).is_file()]


def prepare_cifar100(data_dir: str | os.PathLike, download: bool = True) -> None:
    """Make ``data_dir`` hold the binary files: extract them from the archive, downloading it first if needed.

    Raises:
        ValueError: the archive's md5 is not the published one.
        OSError: the archive is missing and could not be downloaded.
    """
    data_dir = Path(data_dir)
    if not cifar100_missing(data_dir):
        return
    archive = data_dir / CIFAR100_ARCHIVE
    if not archive.is_file():
        if not download:
            return
        fetch([CIFAR100_URL], archive, CIFAR100_MD5, algorithm="md5", timeout=60.0)
    elif (actual := file_digest(archive, "md5")) != CIFAR100_MD5:
        raise ValueError(
            f"{archive}: md5 is {actual}, expected {CIFAR100_MD5}; the archive is corrupt or not the original"
        )
    with tarfile.open(archive) as tar:
        members = [tar.getmember(name) for name in CIFAR100_FILES.values()]
        # The md5 above pins the archive; where this Python has it (3.10.12+, 3.11.4+), the "data" filter also
        # refuses links and paths outside data_dir.
        safe: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(data_dir, members=members, **safe)


def load_cifar100(data_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images, fine_labels)`` of a split (``"train"`` or ``"test"``): uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``."""
    if split not in CIFAR100_FILES:
        raise ValueError(f"CIFAR-100 split must be 'train' or 'test', got {split!r}")
    images, labels = read_cifar_binary(Path(data_dir) / CIFAR100_FILES[split], CIFAR100_LABELS, CIFAR100_RECORDS[split])
    return images, labels[:, 1]
