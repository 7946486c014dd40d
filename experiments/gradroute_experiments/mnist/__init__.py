"""MNIST autoencoder latent-space splitting with certificates (Cloud et al. 2024, §4.1; ``recipes/mnist``)."""

from gradroute_experiments.mnist.data import MNISTDataModule, read_idx
from gradroute_experiments.mnist.evaluate import (
    CertificateReport,
    certificate_split,
    code_magnitudes,
    per_digit_errors,
)
from gradroute_experiments.mnist.model import MNISTSplitAutoencoder, correlation_penalty

__all__ = [
    "CertificateReport",
    "MNISTDataModule",
    "MNISTSplitAutoencoder",
    "certificate_split",
    "code_magnitudes",
    "correlation_penalty",
    "per_digit_errors",
    "read_idx",
]
