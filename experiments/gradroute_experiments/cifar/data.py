"""CIFAR-100 (binary format) or the carried CIFAR-10 JPEG subset as a LightningDataModule with routing labels.

``dataset="cifar100"`` reads the standard binary files from ``data_dir`` (default: ``cifar100`` in the carried data folder, :mod:`gradroute_experiments.datafiles`); when they
are missing, ``prepare_data`` extracts them from ``cifar-100-binary.tar.gz`` in ``data_dir``, downloading it
first if the machine is online, and otherwise ``setup`` stops with one line naming the files and where to put
them. ``dataset="cifar10_jpeg"`` reads the archive the package carries (``carried:cifar10``) (offline).

Routing labels are class groups: ``class_groups[g]`` lists the classes whose images carry label ``g``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, StackDataset, default_collate
from typing_extensions import override

from gradroute_experiments.cifar.binary import (
    CIFAR100_ARCHIVE,
    CIFAR100_URL,
    cifar100_missing,
    load_cifar100,
    prepare_cifar100,
)
from gradroute_experiments.datafiles import data_path
from gradroute_experiments.cifar.jpeg import CIFAR10_JPEG_ARCHIVE, load_cifar10_jpeg
from lightning_gradroute.targets import Units, unit_indices

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "BatchTransform", "CIFARDataModule", "resolve_class_groups"]

#: The normalisation the paper uses for CIFAR-100 too (CIFAR-10's per-channel mean and std).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
_DATASETS = {"cifar100": (100, "cifar100"), "cifar10_jpeg": (10, "cifar10")}


class BatchTransform:
    """Collate dict items into a batch and turn uint8 images into normalised floats.

    With ``augment``, each image is first zero-padded by 4 pixels and randomly cropped back to 32x32, then
    flipped horizontally with probability 1/2 (the paper's ``RandomCrop(32, padding=4)`` and
    ``RandomHorizontalFlip``), all drawn from torch's global generator.
    """

    def __init__(self, augment: bool) -> None:
        self.augment = augment

    def __call__(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        batch = default_collate(items)
        images = batch["image"].float().div_(255.0)
        if self.augment:
            images = self.crop_and_flip(images)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (CIFAR_MEAN, CIFAR_STD))
        batch["image"] = images.sub_(mean).div_(std)
        return batch

    @staticmethod
    def crop_and_flip(images: Tensor, padding: int = 4) -> Tensor:
        n, channels, height, width = images.shape
        padded = F.pad(images, (padding, padding, padding, padding))
        rows = torch.randint(0, 2 * padding + 1, (n, 1)) + torch.arange(height)
        cols = torch.randint(0, 2 * padding + 1, (n, 1)) + torch.arange(width)
        flip = torch.rand(n) < 0.5
        cols = torch.where(flip.unsqueeze(1), cols.flip(1), cols)
        index = (
            torch.arange(n).view(n, 1, 1, 1),
            torch.arange(channels).view(1, channels, 1, 1),
            rows.view(n, 1, height, 1),
            cols.view(n, 1, 1, width),
        )
        return padded[index]


class CIFARDataModule(pl.LightningDataModule):
    """CIFAR for the representation-splitting experiment.

    Batches are dicts: ``image`` (``(B, 3, 32, 32)`` float, normalised with :data:`CIFAR_MEAN` / :data:`CIFAR_STD`;
    training images randomly cropped and flipped), ``label`` (the class, ``(B,)``) and ``route_labels`` (the
    class's group, ``(B,)``). CIFAR has no validation split and the paper trains on all training images, so the
    validation loop runs on the test set; it is only monitored, nothing is selected on it.

    Example::

        dm = CIFARDataModule("cifar10_jpeg", class_groups=["0:5", "5:10"], batch_size=64)
        trainer.fit(model, datamodule=dm)

    Args:
        dataset: ``"cifar100"`` (standard binary files, 50,000 / 10,000 images) or ``"cifar10_jpeg"`` (the
            carried subset: 2,000 training and 500 test images per class).
        data_dir: folder of the files; default ``carried:cifar100`` or ``carried:cifar10`` (:func:`~gradroute_experiments.datafiles.data_path`).
        class_groups: for each routing label, its classes (``"0:50"``, ``"3"``, ``[1, 9]``...); every class in
            exactly one group. Default: the first and the second half of the classes.
        batch_size: training batch size (the paper: 128).
        eval_batch_size: batch size of the validation / test loaders.
        num_workers: DataLoader workers (the data is in memory; 0 is usually fastest on few cores).
        augment: random crop and flip of training images.
        download: (CIFAR-100) fetch the archive in ``prepare_data`` when files are missing and the machine is online.
    """

    def __init__(
        self,
        dataset: Literal["cifar100", "cifar10_jpeg"] = "cifar100",
        data_dir: str | None = None,
        class_groups: Sequence[Units] | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        num_workers: int = 0,
        augment: bool = True,
        download: bool = True,
    ) -> None:
        super().__init__()
        if dataset not in _DATASETS:
            raise ValueError(f"CIFARDataModule: dataset must be one of {sorted(_DATASETS)}, got {dataset!r}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CIFARDataModule: {name} must be a positive int, got {value!r}")
        if num_workers < 0:
            raise ValueError(f"CIFARDataModule: num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.num_classes, default_dir = _DATASETS[dataset]
        self.data_dir = data_path(data_dir, default=default_dir)
        half = self.num_classes // 2
        self.class_groups = resolve_class_groups(class_groups or [f"0:{half}", f"{half}:"], self.num_classes)
        self.group_of_class = torch.empty(self.num_classes, dtype=torch.long)
        for g, classes in enumerate(self.class_groups):
            self.group_of_class[classes] = g
        self.datasets: dict[str, StackDataset] = {}

    def _missing(self) -> list[str]:
        if self.hparams.dataset == "cifar100":
            return cifar100_missing(self.data_dir)
        return [] if (self.data_dir / CIFAR10_JPEG_ARCHIVE).is_file() else [CIFAR10_JPEG_ARCHIVE]

    @override
    def prepare_data(self) -> None:
        if self.hparams.dataset != "cifar100" or not self._missing():
            return
        try:
            prepare_cifar100(self.data_dir, download=self.hparams.download)
        except OSError as err:
            rank_zero_info(f"CIFAR-100 download failed: {err}")

    @override
    def setup(self, stage: str) -> None:
        if missing := self._missing():
            where = self.data_dir.resolve()
            if self.hparams.dataset == "cifar100":
                raise FileNotFoundError(
                    f"CIFAR-100: missing {', '.join(missing)} in {where}; extract the binary version "
                    f"{CIFAR100_ARCHIVE} ({CIFAR100_URL}) there, or put the archive there, or run online with download"
                )
            raise FileNotFoundError(
                f"CIFAR-10 JPEG: missing {', '.join(missing)} in {where}; the package carries it in carried:cifar10"
            )
        load = load_cifar100 if self.hparams.dataset == "cifar100" else load_cifar10_jpeg
        for split in ("train", "test"):
            if split not in self.datasets:
                images, labels = load(self.data_dir, split)
                label = torch.from_numpy(np.array(labels))
                self.datasets[split] = StackDataset(
                    image=torch.from_numpy(np.array(images)), label=label, route_labels=self.group_of_class[label]
                )

    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=train,
            collate_fn=BatchTransform(augment=train and self.hparams.augment),
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.batch_size, train=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, train=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, train=False)


def resolve_class_groups(groups: Sequence[Units], num_classes: int) -> list[list[int]]:
    """Class lists of each group; raises unless there are >= 2 groups and every class is in exactly one."""
    resolved = []
    for group in groups:
        try:
            resolved.append(unit_indices(group, num_classes, where=f"CIFARDataModule class group {group!r}"))
        except ValueError as err:  # a malformed string fails in int() with a message that names no group
            message = (
                str(err) if str(err).startswith("CIFARDataModule") else f"CIFARDataModule class group {group!r}: {err}"
            )
            raise ValueError(f"{message} (write classes as '0:50', '3', '1,9' or a list of ints)") from None
    flat = sorted(c for g in resolved for c in g)
    if len(resolved) < 2 or flat != list(range(num_classes)):
        raise ValueError(
            f"CIFARDataModule: class_groups {list(groups)!r} must be >= 2 groups holding each of the {num_classes} "
            "classes exactly once"
        )
    return resolved
