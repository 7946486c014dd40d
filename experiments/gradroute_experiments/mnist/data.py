"""MNIST from the original IDX files, checksum-verified, as a LightningDataModule with routing labels.

The four ``.gz`` files ship with the package (``carried:mnist``). Nothing downloads at import time; when files
are missing, ``prepare_data`` fetches them from a public mirror if the machine is online, and otherwise
``setup`` stops with one line naming the files and where to put them.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, StackDataset
from typing_extensions import override

from gradroute_experiments.datafiles import data_path
from gradroute_experiments.download import fetch, sha256_of

__all__ = [
    "MNIST_FILES",
    "MNIST_MIRRORS",
    "MNISTDataModule",
    "digit_groups",
    "download_mnist",
    "load_mnist",
    "missing_files",
    "read_idx",
    "sha256_of",
]

#: The original files and their sha256 sums (the same as in ``data/mnist/README.md``).
MNIST_FILES: Mapping[str, str] = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: Public mirrors tried in order (the same files as LeCun's original page, which no longer serves them reliably).
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# IDX type codes (third byte of the magic number) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike, sha256: str | None = None) -> np.ndarray:
    """Read an IDX file (gzipped if the name ends in ``.gz``) into a numpy array of its declared shape.

    Args:
        path: the file.
        sha256: if given, the file's bytes (as stored, i.e. compressed) must have this sha256.

    Raises:
        ValueError: the checksum differs, the magic number is not IDX, or the data is shorter or longer than
            the header says.
    """
    path = Path(path)
    if sha256 is not None and (actual := sha256_of(path)) != sha256:
        raise ValueError(f"{path}: sha256 is {actual}, expected {sha256}; the file is corrupt or not the original")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip raises these for truncated or non-gzip data
        raise ValueError(f"{path}: cannot be read as {'gzip' if opener is gzip.open else 'IDX'}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header declares {ndim} dims but the file has only {len(raw)} bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX header declares shape {shape} ({expected} bytes) but holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def missing_files(data_dir: str | os.PathLike) -> list[str]:
    return [name for name in MNIST_FILES if not (Path(data_dir) / name).is_file()]


def download_mnist(data_dir: str | os.PathLike, timeout: float = 30.0) -> None:
    """Fetch the missing files into ``data_dir`` from :data:`MNIST_MIRRORS`, checking each checksum.

    Raises:
        OSError: no mirror could deliver a file (offline, or a wrong file served).
    """
    for name in missing_files(data_dir):
        fetch([mirror + name for mirror in MNIST_MIRRORS], Path(data_dir) / name, MNIST_FILES[name], timeout=timeout)


def load_mnist(data_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)`` of a split (``"train"`` or ``"test"``) as uint8 ``(N, 28, 28)`` and ``(N,)``."""
    if split not in _SPLIT_FILES:
        raise ValueError(f"MNIST split must be 'train' or 'test', got {split!r}")
    images_file, labels_file = (Path(data_dir) / name for name in _SPLIT_FILES[split])
    images = read_idx(images_file, MNIST_FILES[images_file.name])
    labels = read_idx(labels_file, MNIST_FILES[labels_file.name])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"MNIST {split}: images {images.shape} and labels {labels.shape} do not pair up")
    return images, labels


def digit_groups(digits: Tensor) -> Tensor:
    """The routing label of each digit: 0 for digits 0-4, 1 for digits 5-9 (the paper's two groups)."""
    return (digits >= 5).long()


class MNISTDataModule(pl.LightningDataModule):
    """MNIST for the latent-space splitting experiment.

    Batches are dicts: ``image`` (``(B, 784)`` float, pixels scaled to [-1, 1] as in the paper), ``digit``
    (``(B,)``) and ``route_labels`` (``(B,)``: 0 for digits 0-4, 1 for digits 5-9, the label names
    ``["digits_0_4", "digits_5_9"]`` of the routing callback). MNIST has no validation split and the paper trains
    on all 60,000 training images, so the validation loop runs on the test set; it is only monitored, nothing
    is selected on it.

    Example::

        dm = MNISTDataModule(batch_size=256)              # the carried MNIST
        trainer.fit(model, datamodule=dm)

    Args:
        data_dir: folder holding the four original ``.gz`` IDX files; None: the carried copy (``carried:mnist``,
            :func:`~gradroute_experiments.datafiles.data_path`).
        batch_size: training batch size (the paper: 2048).
        eval_batch_size: batch size of the validation / test loaders.
        num_workers: DataLoader workers (the data is in memory; 0 is usually fastest).
        download: fetch missing files in ``prepare_data`` when the machine is online.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 2048,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
        download: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MNISTDataModule: {name} must be a positive int, got {value!r}")
        if num_workers < 0:
            raise ValueError(f"MNISTDataModule: num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.data_dir = data_path(data_dir, default="mnist")
        self.datasets: dict[str, StackDataset] = {}

    @override
    def prepare_data(self) -> None:
        if not self.hparams.download or not missing_files(self.data_dir):
            return
        try:
            download_mnist(self.data_dir)
        except OSError as err:
            rank_zero_info(f"MNIST download failed: {err}")

    @override
    def setup(self, stage: str) -> None:
        if missing := missing_files(self.data_dir):
            raise FileNotFoundError(
                f"MNIST: missing {', '.join(missing)} in {self.data_dir.resolve()}; put the four original IDX .gz "
                f"files there (the package carries them in carried:mnist; public copies at {MNIST_MIRRORS[0]})"
            )
        for split in ("train", "test"):
            if split not in self.datasets:
                images, digits = load_mnist(self.data_dir, split)
                pixels = torch.from_numpy(images.reshape(len(images), -1)).float().div_(255.0)
                digit = torch.from_numpy(digits).long()
                self.datasets[split] = StackDataset(
                    image=pixels.sub_(0.5).div_(0.5), digit=digit, route_labels=digit_groups(digit)
                )

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.batch_size, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)
