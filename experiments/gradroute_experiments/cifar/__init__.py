"""CIFAR representation splitting with certificates (Cloud et al. 2024, CIFAR-100 experiment; ``recipes/cifar``)."""

from gradroute_experiments.cifar.binary import load_cifar100, prepare_cifar100, read_cifar_binary
from gradroute_experiments.cifar.data import CIFARDataModule
from gradroute_experiments.cifar.evaluate import (
    CertificateAccuracyReport,
    accuracy_by_group,
    certificate_split,
    encoding_magnitudes,
    per_class_accuracy,
)
from gradroute_experiments.cifar.jpeg import CIFAR10_CLASSES, load_cifar10_jpeg, read_jpeg_archive
from gradroute_experiments.cifar.model import CIFARSplitResNet

__all__ = [
    "CIFAR10_CLASSES",
    "CIFARDataModule",
    "CIFARSplitResNet",
    "CertificateAccuracyReport",
    "accuracy_by_group",
    "certificate_split",
    "encoding_magnitudes",
    "load_cifar10_jpeg",
    "load_cifar100",
    "per_class_accuracy",
    "prepare_cifar100",
    "read_cifar_binary",
    "read_jpeg_archive",
]
