"""CIFAR-10 from an archive of JPEG files, ``<split>/<class name>/NNNN.jpg``: the project's offline stand-in.

``data/cifar10/cifar10_jpg_subset.tar.gz`` (its README gives origin, licence and checksum) holds the first 2,000
training and the first 500 test images of each class of the JPEG re-encoding of CIFAR-10. Pillow decodes them
(32x32 RGB). Decoding the archive takes a few seconds; each archive is decoded once per process.
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from gradroute_experiments.download import sha256_of

__all__ = ["CIFAR10_CLASSES", "CIFAR10_JPEG_ARCHIVE", "CIFAR10_JPEG_SHA256", "load_cifar10_jpeg", "read_jpeg_archive"]

#: Class names in CIFAR-10's label order (label ``i`` is ``CIFAR10_CLASSES[i]``).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_JPEG_ARCHIVE = "cifar10_jpg_subset.tar.gz"
#: sha256 of the carried archive (the same as in ``data/cifar10/README.md``).
CIFAR10_JPEG_SHA256 = "7e40db69122408a1ff77c1e254bc784a02a43224cc705f41c24b6f708006d936"


@functools.lru_cache(maxsize=2)
def _decode(path: str, mtime_ns: int, size: int, classes: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    splits: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            parts = member.name.split("/")
            if len(parts) != 3 or not parts[2].lower().endswith(".jpg") or parts[1] not in classes:
                raise ValueError(f"{path}: member {member.name!r} is not <split>/<one of {list(classes)}>/<name>.jpg")
            file = tar.extractfile(member)
            assert file is not None  # a regular member always has a file object
            try:
                with Image.open(io.BytesIO(file.read())) as image:
                    if image.format != "JPEG" or image.size != (32, 32):
                        raise ValueError(f"a {image.format} image of size {image.size}, not a 32x32 JPEG")
                    pixels = np.asarray(image.convert("RGB"))
            except (OSError, ValueError) as err:
                raise ValueError(f"{path}: member {member.name!r} cannot be read as a 32x32 JPEG: {err}") from None
            images, labels = splits.setdefault(parts[0], ([], []))
            images.append(pixels)
            labels.append(classes.index(parts[1]))
    decoded = {}
    for split, (images, labels) in splits.items():
        array = np.stack(images).transpose(0, 3, 1, 2).copy()  # (N, 3, 32, 32), as the binary format
        label_array = np.array(labels, dtype=np.int64)
        array.flags.writeable = label_array.flags.writeable = False  # shared by every caller of the cache
        decoded[split] = (array, label_array)
    return decoded


def read_jpeg_archive(
    path: str | os.PathLike, split: str, classes: tuple[str, ...] = CIFAR10_CLASSES, sha256: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of a split of a tar(.gz) of ``<split>/<class>/<name>.jpg`` files, in archive order.

    Args:
        path: the archive.
        split: the top-level folder to read (``"train"``, ``"test"``).
        classes: the class folder names; label ``i`` is ``classes[i]``.
        sha256: if given, the archive's bytes must have this sha256.

    Returns:
        uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)`` arrays, read-only (the decoded archive is cached).

    Raises:
        ValueError: a checksum mismatch, a member outside the layout, an image that is not a 32x32 JPEG, or a
            split the archive does not have.
    """
    path = Path(path)
    if sha256 is not None and (actual := sha256_of(path)) != sha256:
        raise ValueError(f"{path}: sha256 is {actual}, expected {sha256}; the file is corrupt or not the original")
    stat = path.stat()
    decoded = _decode(str(path.resolve()), stat.st_mtime_ns, stat.st_size, tuple(classes))
    if split not in decoded:
        raise ValueError(f"{path}: no {split!r} images; the archive has splits {sorted(decoded)}")
    return decoded[split]


def load_cifar10_jpeg(data_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of a split of the carried archive in ``data_dir``, checksum-verified."""
    return read_jpeg_archive(Path(data_dir) / CIFAR10_JPEG_ARCHIVE, split, CIFAR10_CLASSES, CIFAR10_JPEG_SHA256)
