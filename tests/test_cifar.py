"""CIFAR representation splitting: binary and JPEG readers, data module, routing exactness, evaluation, DDP, recipes."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import RoutedDataModule, trainer_kwargs
from lightning.pytorch.callbacks import Callback
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradroute_experiments.datafiles import DATA_DIR
from lightning_gradroute import GradientRouter, GradientRoutingCallback
from lightning_gradroute.cli import GradrouteCLI
from gradroute_experiments.cifar import (
    CIFAR10_CLASSES,
    CertificateAccuracyReport,
    CIFARDataModule,
    CIFARSplitResNet,
    read_cifar_binary,
    read_jpeg_archive,
)
from gradroute_experiments.cifar import binary as cifar_binary
from gradroute_experiments.cifar.data import CIFAR_MEAN, CIFAR_STD, BatchTransform
from gradroute_experiments.cifar.jpeg import CIFAR10_JPEG_ARCHIVE, CIFAR10_JPEG_SHA256

ROOT = Path(__file__).resolve().parents[1]
JPEG_DIR = DATA_DIR / "cifar10"
RECIPES = ROOT / "recipes" / "cifar"
#: A tiny model whose encoding has the 128 channels of the CPU recipes (so their routes apply unchanged).
TINY = {"widths": (4, 8, 16, 128), "blocks": (1, 1, 1, 2), "split_at": 4}


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch) -> None:
    """LightningCLI warns when given args while sys.argv holds pytest's own (conftest.py undoes the CLI's other
    process-wide changes)."""
    monkeypatch.setattr(sys, "argv", ["gradroute"])


# ------------------------------------------------------------------------------------------------ binary format
def write_cifar100(path: Path, images: np.ndarray, coarse: np.ndarray, fine: np.ndarray) -> Path:
    """Records of the binary version: coarse label byte, fine label byte, R, G and B planes (row-major)."""
    rows = np.concatenate([coarse[:, None], fine[:, None], images.reshape(len(images), -1)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(rows.astype(np.uint8).tobytes())
    return path


def fake_cifar100(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fine = np.arange(n) % 100
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), fine // 5, fine


def cifar100_dir(root: Path, monkeypatch, n_train: int = 200, n_test: int = 100) -> Path:
    """A data_dir with small binary files (the expected record counts patched to theirs)."""
    for split, n in (("train", n_train), ("test", n_test)):
        write_cifar100(root / cifar_binary.CIFAR100_FILES[split], *fake_cifar100(n, seed=n))
    monkeypatch.setattr(cifar_binary, "CIFAR100_RECORDS", {"train": n_train, "test": n_test})
    return root


def archive_of(data_dir: Path, out: Path) -> str:
    """Pack data_dir's binary files as the official archive does; returns its md5."""
    with tarfile.open(out, "w:gz") as tar:
        for name in cifar_binary.CIFAR100_FILES.values():
            tar.add(data_dir / name, arcname=name)
    return hashlib.md5(out.read_bytes()).hexdigest()


def test_read_cifar_binary_gives_channel_planes_and_both_labels(tmp_path: Path) -> None:
    images, coarse, fine = fake_cifar100(7)
    path = write_cifar100(tmp_path / "a.bin", images, coarse, fine)
    got_images, labels = read_cifar_binary(path, records=7)
    assert got_images.shape == (7, 3, 32, 32) and got_images.dtype == np.uint8
    assert np.array_equal(got_images, images)
    assert labels.tolist() == np.stack([coarse, fine], 1).tolist()
    raw = path.read_bytes()
    assert list(raw[2 : 2 + 1024]) == got_images[0, 0].flatten().tolist()  # record 0: labels, then the red plane
    assert list(raw[3074 + 2 + 2048 : 3074 + 2 + 3072]) == got_images[1, 2].flatten().tolist()  # record 1, blue


def test_read_cifar_binary_rejects_truncated_files_and_wrong_counts(tmp_path: Path) -> None:
    good = write_cifar100(tmp_path / "good.bin", *fake_cifar100(4)).read_bytes()
    (tmp_path / "cut.bin").write_bytes(good[:-1])
    with pytest.raises(ValueError, match=r"cut\.bin: 12295 bytes is not a whole number of 3074-byte CIFAR records"):
        read_cifar_binary(tmp_path / "cut.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="0 bytes is not a whole number"):
        read_cifar_binary(tmp_path / "empty.bin")
    (tmp_path / "short.bin").write_bytes(good[: 3 * 3074])  # cut at a record boundary: only the count tells
    with pytest.raises(ValueError, match=r"short\.bin: holds 3 records, expected 4"):
        read_cifar_binary(tmp_path / "short.bin", records=4)


@pytest.mark.parametrize(("byte", "value", "message"), [(1, 100, "outside 0-99"), (0, 20, "outside 0-19")])
def test_read_cifar_binary_rejects_labels_out_of_range(tmp_path: Path, byte: int, value: int, message: str) -> None:
    images, coarse, fine = fake_cifar100(5)
    (coarse if byte == 0 else fine)[2] = value
    path = write_cifar100(tmp_path / "a.bin", images, coarse, fine)
    with pytest.raises(ValueError, match=rf"label byte {byte} of record 2 is {value}, {message} \(1 records"):
        read_cifar_binary(path)


def test_archive_md5_is_checked_before_anything_is_extracted(tmp_path: Path, monkeypatch) -> None:
    source = cifar100_dir(tmp_path / "source", monkeypatch)
    target = tmp_path / "target"
    target.mkdir()
    md5 = archive_of(source, target / cifar_binary.CIFAR100_ARCHIVE)
    with pytest.raises(
        ValueError, match=rf"md5 is {md5}, expected {cifar_binary.CIFAR100_MD5}; the archive is corrupt"
    ):
        cifar_binary.prepare_cifar100(target)
    assert cifar_binary.cifar100_missing(target) == list(cifar_binary.CIFAR100_FILES.values())
    monkeypatch.setattr(cifar_binary, "CIFAR100_MD5", md5)
    cifar_binary.prepare_cifar100(target)
    for split in ("train", "test"):
        assert np.array_equal(
            cifar_binary.load_cifar100(target, split)[0], cifar_binary.load_cifar100(source, split)[0]
        )


def test_fetch_when_online_checks_the_md5(tmp_path: Path, monkeypatch) -> None:
    source = cifar100_dir(tmp_path / "source", monkeypatch)
    md5 = archive_of(source, tmp_path / "served.tar.gz")
    monkeypatch.setattr(cifar_binary, "CIFAR100_URL", (tmp_path / "served.tar.gz").as_uri())
    with pytest.raises(OSError, match=r"could not download cifar-100-binary\.tar\.gz \(file:.*checksum mismatch\)"):
        cifar_binary.prepare_cifar100(tmp_path / "wrong")  # the published md5 is not the fixture's
    assert not list((tmp_path / "wrong").iterdir())  # no .part, no archive
    monkeypatch.setattr(cifar_binary, "CIFAR100_MD5", md5)
    dm = CIFARDataModule("cifar100", data_dir=str(tmp_path / "fetched"), batch_size=16)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 200 and len(dm.datasets["test"]) == 100


def test_missing_files_offline_fail_with_one_line_naming_them(tmp_path: Path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dm = CIFARDataModule("cifar100", data_dir=str(tmp_path / "nowhere"))
    dm.prepare_data()  # logs the failed download, does not raise: setup gives the actionable message
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "\n" not in message
    assert "cifar-100-binary/train.bin, cifar-100-binary/test.bin" in message
    assert str((tmp_path / "nowhere").resolve()) in message and cifar_binary.CIFAR100_URL in message
    with pytest.raises(FileNotFoundError, match=rf"missing {CIFAR10_JPEG_ARCHIVE} in .*carries it in carried:cifar10$"):
        CIFARDataModule("cifar10_jpeg", data_dir=str(tmp_path)).setup("fit")


def test_cifar100_batches_are_normalised_and_labelled_by_group(tmp_path: Path, monkeypatch) -> None:
    data_dir = cifar100_dir(tmp_path, monkeypatch)
    dm = CIFARDataModule("cifar100", data_dir=str(data_dir), batch_size=32, eval_batch_size=50)
    dm.setup("fit")
    assert dm.num_classes == 100 and dm.class_groups == [list(range(50)), list(range(50, 100))]
    batch = next(iter(dm.test_dataloader()))
    images, _, fine = fake_cifar100(100, seed=100)
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    torch.testing.assert_close(batch["image"] * std + mean, torch.from_numpy(images[:50]).float() / 255)
    assert batch["label"].tolist() == fine[:50].tolist()
    assert torch.equal(batch["route_labels"], (batch["label"] >= 50).long())
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape == (32, 3, 32, 32) and train["image"].dtype == torch.float32
    assert torch.equal(train["route_labels"], (train["label"] >= 50).long())


# ------------------------------------------------------------------------------------------------ JPEG subset
def test_carried_jpeg_subset_matches_its_readme_and_decodes() -> None:
    archive = JPEG_DIR / CIFAR10_JPEG_ARCHIVE
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == CIFAR10_JPEG_SHA256
    assert CIFAR10_JPEG_SHA256 in (JPEG_DIR / "README.md").read_text().replace("\n", "")
    train_images, train_labels = read_jpeg_archive(archive, "train", sha256=CIFAR10_JPEG_SHA256)
    test_images, test_labels = read_jpeg_archive(archive, "test")
    assert train_images.shape == (20_000, 3, 32, 32) and test_images.shape == (5_000, 3, 32, 32)
    assert np.bincount(train_labels).tolist() == [2000] * 10 and np.bincount(test_labels).tolist() == [500] * 10
    with tarfile.open(archive) as tar:  # an independent decode of one file: test/cat/0007.jpg
        member = tar.extractfile("test/cat/0007.jpg")
        expected = np.asarray(Image.open(io.BytesIO(member.read())).convert("RGB")).transpose(2, 0, 1)
    index = 3 * 500 + 7  # members in name order: classes in label order, files by number
    assert test_labels[index] == CIFAR10_CLASSES.index("cat") and np.array_equal(test_images[index], expected)


def jpeg_bytes(color: tuple[int, int, int], size: tuple[int, int] = (32, 32), kind: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, kind)
    return out.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_read_jpeg_archive_labels_by_folder_and_rejects_bad_members(tmp_path: Path) -> None:
    good = {"train/ship/0.jpg": jpeg_bytes((0, 0, 255)), "train/cat/0.jpg": jpeg_bytes((255, 0, 0))}
    images, labels = read_jpeg_archive(write_tar(tmp_path / "good.tar.gz", good), "train")
    assert labels.tolist() == [8, 3] and abs(int(images[1, 0].mean()) - 255) <= 2 and images[1, 2].mean() < 3
    with pytest.raises(ValueError, match=r"no 'test' images; the archive has splits \['train'\]"):
        read_jpeg_archive(tmp_path / "good.tar.gz", "test")
    with pytest.raises(ValueError, match="sha256 is .*, expected 00"):
        read_jpeg_archive(tmp_path / "good.tar.gz", "train", sha256="00")
    bad = {
        "class.tar.gz": {"train/wolf/0.jpg": jpeg_bytes((1, 2, 3))},
        "png.tar.gz": {"train/cat/0.jpg": jpeg_bytes((1, 2, 3), kind="PNG")},
        "size.tar.gz": {"train/cat/0.jpg": jpeg_bytes((1, 2, 3), size=(16, 16))},
        "junk.tar.gz": {"train/cat/0.jpg": b"not an image"},
    }
    messages = ["is not <split>/<one of", "a PNG image", r"size \(16, 16\)", "cannot be read as a 32x32 JPEG"]
    for (name, members), message in zip(bad.items(), messages):
        with pytest.raises(ValueError, match=message):
            read_jpeg_archive(write_tar(tmp_path / name, members), "train")


def test_crop_and_flip_is_a_shifted_window_of_the_zero_padded_image() -> None:
    torch.manual_seed(0)
    images = torch.rand(64, 3, 32, 32)
    out = BatchTransform.crop_and_flip(images)
    padded = F.pad(images, (4, 4, 4, 4))
    windows = {(dy, dx) for dy in range(9) for dx in range(9)}
    flips = []
    for image, result in zip(padded, out):
        matches = [
            (dy, dx, flip)
            for dy, dx in windows
            for flip in (False, True)
            if torch.equal(result, image[:, dy : dy + 32, dx : dx + 32].flip(2 if flip else ()))
        ]
        assert matches, "an augmented image is no crop of the padded image"
        flips.append(matches[0][2])
    assert 10 < sum(flips) < 54  # both flipped and unflipped images occur


def test_class_groups_must_partition_the_classes() -> None:
    assert CIFARDataModule("cifar10_jpeg").class_groups == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    groups = CIFARDataModule("cifar10_jpeg", class_groups=[[1], "0,2,3,4,5,6,7,8,9"]).class_groups
    assert groups == [[1], [0, 2, 3, 4, 5, 6, 7, 8, 9]]
    for bad in (["0:5", "4:10"], ["0:5", "6:10"], ["0:10"]):
        with pytest.raises(ValueError, match="must be >= 2 groups holding each of the 10 classes exactly once"):
            CIFARDataModule("cifar10_jpeg", class_groups=bad)
    with pytest.raises(ValueError, match=r"class group \[5, 6, 7, 8, 9, 10\]: unit indices \[10\] are out of range"):
        CIFARDataModule("cifar10_jpeg", class_groups=["0:5", [5, 6, 7, 8, 9, 10]])
    with pytest.raises(ValueError, match=r"class group '0,2:10': units '0,2:10' are not .* \(write classes as"):
        CIFARDataModule("cifar10_jpeg", class_groups=["1", "0,2:10"])
    with pytest.raises(ValueError, match="dataset must be one of"):
        CIFARDataModule("cifar10")


# ------------------------------------------------------------------------------------------------ routing
def recipe_router(recipe: str) -> GradientRouter:
    """The routing callback exactly as a recipe configures it."""
    cli = GradrouteCLI(args=["--config", str(RECIPES / recipe), "--trainer.logger", "false"], run=False)
    (routing,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradientRoutingCallback)]
    return routing.router


def tiny_model(recipe: str, **overrides) -> CIFARSplitResNet:
    """The recipe's model arguments on the tiny architecture."""
    cli = GradrouteCLI(args=["--config", str(RECIPES / recipe), "--trainer.logger", "false"], run=False)
    kwargs = {**{k: v for k, v in cli.model.hparams.items() if not k.startswith("_")}, **TINY, **overrides}
    torch.manual_seed(0)
    return CIFARSplitResNet(**kwargs)


def fake_batch(groups: list[int], num_classes: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(len(groups), 3, 32, 32, generator=generator),
        "label": torch.randint(0, num_classes, (len(groups),), generator=generator),
        "route_labels": torch.tensor(groups),
    }


def routed_grads(model: CIFARSplitResNet, router: GradientRouter, batch) -> list[torch.Tensor]:
    with router.attached(model), router.route(batch["route_labels"]):
        loss = model.compute_losses(model(batch["image"]), batch["label"], batch["route_labels"])["loss"]
        return list(torch.autograd.grad(loss, list(model.parameters())))


def objective(model: CIFARSplitResNet, batch, encoding, logits) -> torch.Tensor:
    """The model's objective written out: per-group mean CE, certificates on detached blocks, L1, scale."""
    hp = model.hparams
    ce = F.cross_entropy(logits, batch["label"], reduction="none")
    groups = batch["route_labels"]
    main = sum(w * ce[groups == g].mean() for g, w in enumerate(hp.group_weights) if (groups == g).any())
    blocks = [[int(c) for c in b] for b in model.certificate_indices()]
    certificates = sum(
        F.cross_entropy(h(encoding.detach()[:, b]), batch["label"]) for h, b in zip(model.certificates, blocks)
    )
    l1 = encoding.abs().sum(1).mean()
    return hp.loss_scale * (main + hp.certificate_weight * certificates + hp.l1_weight * l1)


def masked_grads(model: CIFARSplitResNet, batch, mask: torch.Tensor) -> list[torch.Tensor]:
    """Independent computation: the encoding entering the main head in the delta form with a per-image mask."""
    encoding = model.encoder(batch["image"])
    entering = encoding.detach() + mask[:, :, None, None] * (encoding - encoding.detach())
    loss = objective(model, batch, encoding, model.decoder(entering))
    return list(torch.autograd.grad(loss, list(model.parameters())))


def assert_grads_equal(model: CIFARSplitResNet, got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for (name, _), g, e in zip(model.named_parameters(), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    assert all(g.abs().sum() > 0 for g in got[:3])  # the stem trains


# The recipes' intended masks, written out per group: 1 where an image's gradient may reach the encoding.
HALVES = torch.cat([torch.ones(64), torch.zeros(64)]), torch.cat([torch.zeros(64), torch.ones(64)])
SMALL_BLOCK = torch.cat([torch.ones(16), torch.zeros(112)]), torch.ones(128)


@pytest.mark.parametrize(("recipe", "masks"), [("split.yaml", HALVES), ("imbalance.yaml", SMALL_BLOCK)])
def test_recipe_routing_equals_an_independent_per_image_mask(recipe: str, masks) -> None:
    # Train mode: BatchNorm in the heads normalises with batch statistics, coupling the images of a batch.
    model = tiny_model(recipe)
    batch = fake_batch([0, 1, 1, 0, 1, 1, 1, 0])
    got = routed_grads(model, recipe_router(recipe), batch)
    mask = torch.stack([masks[g] for g in batch["route_labels"]])
    assert_grads_equal(model, got, masked_grads(model, batch, mask))


def test_routing_equals_the_papers_detach_trick_where_images_are_independent() -> None:
    """The reference code's two passes: [top, bot.detach()] for classes 0-4, [top.detach(), bot] for 5-9.

    In eval mode (BatchNorm on running statistics) each image's output depends on that image alone, and the
    callback's per-image routing equals the paper's per-loss detach trick. In train mode they differ by design:
    the paper's loss of group 0 also reaches group 1's images (through the batch statistics of the heads'
    BatchNorm) on channels 0:64; per-image routing keeps every gradient an image receives on its own channels.
    """
    model = tiny_model("split.yaml", l1_weight=0.05)
    batch = fake_batch([0, 1, 1, 0, 1, 0], seed=3)

    def paper_grads() -> list[torch.Tensor]:
        encoding = model.encoder(batch["image"])
        top = torch.cat([encoding[:, :64], encoding[:, 64:].detach()], 1)
        bot = torch.cat([encoding[:, :64].detach(), encoding[:, 64:]], 1)
        logits = torch.where((batch["route_labels"] == 0)[:, None], model.decoder(top), model.decoder(bot))
        return list(torch.autograd.grad(objective(model, batch, encoding, logits), list(model.parameters())))

    router = recipe_router("split.yaml")
    model.eval()
    assert_grads_equal(model, routed_grads(model, router, batch), paper_grads())
    model.train()
    code = [n for n, _ in model.named_parameters()].index("encoder.code.weight")
    assert not torch.allclose(routed_grads(model, router, batch)[code], paper_grads()[code], rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    ("recipe", "group", "blocked"),
    [("split.yaml", 0, slice(64, 128)), ("split.yaml", 1, slice(0, 64)), ("imbalance.yaml", 0, slice(16, 128))],
)
def test_a_groups_gradient_reaches_the_encoding_only_through_its_channels(recipe: str, group: int, blocked) -> None:
    model = tiny_model(recipe, l1_weight=0.0)
    batch = fake_batch([group] * 6, seed=1)
    names = [n for n, _ in model.named_parameters()]
    code = dict(zip(names, routed_grads(model, recipe_router(recipe), batch)))["encoder.code.weight"]  # row: channel
    assert torch.count_nonzero(code[blocked]) == 0
    kept = torch.ones(128, dtype=torch.bool)
    kept[blocked] = False
    assert bool((code[kept].abs().sum(1) > 0).all())  # every channel the group may use learns
    loss = model.compute_losses(model(batch["image"]), batch["label"], batch["route_labels"])["loss"]
    assert torch.count_nonzero(torch.autograd.grad(loss, model.encoder.code.weight)[0][blocked]) > 0  # unrouted


def test_routing_leaves_the_forward_pass_bit_identical() -> None:
    model = tiny_model("split.yaml")
    batch = fake_batch([0, 1, 0, 1])
    with torch.no_grad():
        plain = model(batch["image"])
    router = recipe_router("split.yaml")
    with router.attached(model), router.route(batch["route_labels"]):
        routed = model(batch["image"])
        routed.logits.sum().backward()  # the router checks that the routed site received a gradient
    assert torch.equal(routed.logits, plain.logits) and torch.equal(routed.encoding, plain.encoding)


def test_model_validates_its_arguments_and_the_datamodule() -> None:
    with pytest.raises(ValueError, match=r"split_at must be an int in \[1, 4\]"):
        CIFARSplitResNet(**{**TINY, "split_at": 5}, certificate_channels=("0:64", "64:128"))
    with pytest.raises(ValueError, match="certificate_channels .* overlap"):
        CIFARSplitResNet(**TINY, certificate_channels=("0:65", "64:128"))
    with pytest.raises(ValueError, match="out of range"):
        CIFARSplitResNet(**TINY, certificate_channels=("0:64", "64:129"))
    with pytest.raises(ValueError, match="group_weights needs one entry per group"):
        CIFARSplitResNet(**TINY, group_weights=(1.0,), certificate_channels=("0:64", "64:128"))
    model = CIFARSplitResNet(**TINY, num_classes=10, certificate_channels=("0:64", "64:128"))
    model.trainer = SimpleNamespace(datamodule=CIFARDataModule("cifar10_jpeg", class_groups=["0:2", "2:4", "4:10"]))
    with pytest.raises(ValueError, match="name 2 groups but the datamodule's class_groups has 3"):
        model.setup("fit")
    model.trainer = SimpleNamespace(datamodule=CIFARDataModule("cifar100"))
    with pytest.raises(ValueError, match="num_classes=10 but the datamodule has 100 classes"):
        model.setup("fit")


# ------------------------------------------------------------------------------------------------ evaluation
class LabelByTrainModePredictions(Callback):
    """Runs before the report: relabels the test images with the model's train-mode predictions (BatchNorm on
    batch statistics), so that an evaluation in train mode would score 100%, and snapshots every buffer."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.training = pl_module.training
        self.buffers = {n: b.clone() for n, b in pl_module.named_buffers()}
        dm = trainer.datamodule
        pl_module.train()
        with torch.no_grad():
            predicted = torch.cat([pl_module(b["image"]).logits.argmax(1) for b in dm.test_dataloader()])
        for name, buffer in pl_module.named_buffers():  # undo this forward's BatchNorm updates
            buffer.copy_(self.buffers[name])
        pl_module.train(self.training)
        dm.datasets["test"].datasets["label"].copy_(predicted)
        dm.datasets["test"].datasets["route_labels"].copy_(dm.group_of_class[predicted])


def test_report_evaluates_in_eval_mode_and_leaves_batchnorm_untouched(tmp_path: Path, monkeypatch) -> None:
    data_dir = cifar100_dir(tmp_path / "data", monkeypatch, n_train=64, n_test=100)
    dm = CIFARDataModule("cifar100", data_dir=str(data_dir), batch_size=16, eval_batch_size=40)
    model = CIFARSplitResNet(widths=(4, 8, 8, 16), blocks=(1, 1, 1, 1), split_at=3, certificate_channels=("0:4", "4:8"))
    relabel = LabelByTrainModePredictions()
    trainer = pl.Trainer(
        callbacks=[relabel, CertificateAccuracyReport()], **trainer_kwargs(tmp_path, max_steps=3, limit_test_batches=2)
    )
    trainer.fit(model, datamodule=dm)
    assert all(torch.equal(b, relabel.buffers[n]) for n, b in model.named_buffers())  # no train-mode forward
    assert model.training == relabel.training
    batches = list(dm.test_dataloader())[:2]
    labels = torch.cat([b["label"] for b in batches])
    model.eval()
    with torch.no_grad():
        outputs = [model(b["image"]) for b in batches]
    results = json.loads((tmp_path / "results.json").read_text())
    for name, pick in (("decoder", lambda o: o.logits), ("certificate_1", lambda o: o.certificates[1])):
        correct = (torch.cat([pick(o) for o in outputs]).argmax(1) == labels).double()
        expected = [correct[labels == c].mean().item() if (labels == c).any() else None for c in range(100)]
        got = [
            None if math.isnan(v) else v for v in results["per_class_accuracy"][name]
        ]  # NaN: class not in the batches
        assert got == pytest.approx(expected)
    decoder = [v for v in results["per_class_accuracy"]["decoder"] if not math.isnan(v)]
    assert sum(decoder) < len(decoder)  # a train-mode evaluation would have scored every class 1.0
    assert results["scale"]["test_images"] == 80 and results["scale"]["steps"] == 3
    first_group = set(range(50))
    for entry in results["certificates"]:
        own = [v for c, v in enumerate(results["per_class_accuracy"][f"certificate_{entry['certificate']}"])
               if not math.isnan(v) and (c in first_group) == (entry["certificate"] == 0)]  # fmt: skip
        assert entry["own_accuracy"] == pytest.approx(np.mean(own))


# ------------------------------------------------------------------------------------------------ DDP
class GroupedData(RoutedDataModule):
    """:class:`RoutedDataModule` with the class groups the report reads: classes 0-4 and 5-9."""

    num_classes = 10
    class_groups: ClassVar[list[list[int]]] = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def ddp_columns() -> dict[str, torch.Tensor]:
    """One global batch of 8: rank 0 gets four images of group 0, rank 1 two of each group."""
    groups = [0, 0, 0, 0, 1, 0, 1, 0]
    batch = fake_batch(groups, seed=5)
    batch["label"] = torch.tensor([0, 3, 1, 4, 7, 2, 9, 4])
    return batch


@pytest.mark.timeout(180)
def test_routed_training_under_ddp_spawn_equals_the_mean_of_per_rank_routed_gradients(tmp_path: Path) -> None:
    model = tiny_model("split.yaml")
    initial = copy.deepcopy(model)
    trainer = pl.Trainer(
        callbacks=[GradientRoutingCallback(**recipe_callback_args("split.yaml")), CertificateAccuracyReport()],
        **trainer_kwargs(
            tmp_path,
            max_steps=1,
            limit_test_batches=1,
            accelerator="cpu",
            devices=2,
            strategy="ddp_spawn",
            use_distributed_sampler=False,
        ),
    )
    trainer.fit(model, GroupedData(ddp_columns(), batch_size=4, shard_global_batches=True))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["routed"] and results["scale"]["steps"] == 1
    # Expected: each rank's routed gradient on its own slice (its own BatchNorm statistics), averaged, one SGD step.
    columns, router = ddp_columns(), recipe_router("split.yaml")
    grads = [routed_grads(initial, router, {k: v[r * 4 : (r + 1) * 4] for k, v in columns.items()}) for r in range(2)]
    hp = initial.hparams
    optimizer = torch.optim.SGD(initial.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    for param, g0, g1 in zip(initial.parameters(), *grads):
        param.grad = (g0 + g1) / 2
    optimizer.step()
    for (name, expected), got in zip(initial.named_parameters(), model.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def recipe_callback_args(recipe: str) -> dict:
    router = recipe_router(recipe)
    return {"targets": router.targets, "routes": router.routes, "labels": router.label_names}


# ------------------------------------------------------------------------------------------------ recipes
@pytest.mark.timeout(120)
def test_quick_recipe_writes_results_figure_and_tensorboard(tmp_path: Path) -> None:
    GradrouteCLI(
        args=[
            "fit",
            "--config",
            str(RECIPES / "split.yaml"),
            "--trainer.logger.init_args.save_dir",  # the recipe's own TensorBoard logger, in tmp_path
            str(tmp_path),
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.limit_test_batches",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            "--data.init_args.eval_batch_size",
            "50",  # 100 test images of class 0 (the test set is ordered by class)
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.enable_checkpointing",
            "false",
        ]
    )
    (log_dir,) = tmp_path.glob("*/version_0")
    results = json.loads((log_dir / "results.json").read_text())
    assert results["routed"] is True and results["scale"]["test_images"] == 100
    assert [g["name"] for g in results["groups"]] == ["classes_0_4", "classes_5_9"]
    assert set(results["accuracy_by_group"]) == {"decoder", "certificate_0", "certificate_1"}
    assert [c["channels"] for c in results["certificates"]] == ["0:64", "64:128"]
    assert all(len(v) == 10 for v in results["per_class_accuracy"].values())
    assert (log_dir / "cifar_accuracy_by_group.png").stat().st_size > 1000
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["test/accuracy_by_group"]
    scalars = set(events.Tags()["scalars"])
    assert {"test/certificate_0_own_accuracy", "test/decoder_accuracy_classes_0_4"} <= scalars
    assert "val/certificate_1_accuracy_classes_5_9" in scalars


def test_recipes_configure_the_papers_and_the_cpu_experiments() -> None:
    def parse(recipe: str):
        cli = GradrouteCLI(args=["--config", str(RECIPES / recipe), "--trainer.logger", "false"], run=False)
        routers = [cb.router for cb in cli.trainer.callbacks if isinstance(cb, GradientRoutingCallback)]
        return cli.model.hparams, cli.datamodule, routers

    hp, dm, (router,) = parse("split_paper.yaml")
    assert (list(hp.widths), list(hp.blocks), hp.split_at, hp.num_classes) == (
        [64, 128, 256, 512],
        [3, 4, 6, 3],
        15,
        100,
    )
    assert (hp.l1_weight, hp.loss_scale, hp.lr, hp.momentum, hp.weight_decay, hp.lr_interval) == (
        0.03, 0.25, 0.1, 0.9, 5e-4, "epoch"
    )  # fmt: skip
    assert dm.hparams.dataset == "cifar100" and dm.hparams.batch_size == 128 and dm.class_groups[0] == list(range(50))
    assert [(r.label, r.weights) for r in router.routes] == [
        ("classes_0_49", {"256:512": 0.0}),
        ("classes_50_99", {"0:256": 0.0}),
    ]
    hp, _, routers = parse("control_paper.yaml")
    assert not routers and hp.l1_weight == 0.0 and hp.split_at == 15
    for routed, control in (("split.yaml", "control.yaml"), ("imbalance.yaml", "imbalance_control.yaml")):
        routed_hp, routed_dm, (router,) = parse(routed)
        control_hp, control_dm, none = parse(control)
        assert not none and control_hp.l1_weight == 0.0
        assert {**routed_hp, "l1_weight": 0.0} == dict(control_hp)
        assert routed_dm.class_groups == control_dm.class_groups and routed_dm.hparams.dataset == "cifar10_jpeg"
        assert router.label_names == list(routed_hp.group_names)
