"""MNIST latent-space splitting: IDX reader, data module, routing exactness, evaluation, recipes (CLI and DDP)."""

from __future__ import annotations

import gzip
import json
import math
import sys
import urllib.error
import urllib.request
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradroute_experiments.datafiles import DATA_DIR
from lightning_gradroute import GradientRouter, GradientRoutingCallback
from lightning_gradroute.cli import GradrouteCLI
from gradroute_experiments.mnist import (
    CertificateReport,
    MNISTDataModule,
    MNISTSplitAutoencoder,
    certificate_split,
    code_magnitudes,
    correlation_penalty,
    per_digit_errors,
    read_idx,
)
from gradroute_experiments.mnist import data as mnist_data

ROOT = Path(__file__).resolve().parents[1]
DATA = DATA_DIR / "mnist"
RECIPES = ROOT / "recipes" / "mnist"
TINY = ["--model.init_args.hidden_sizes", "[16, 8]"]


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch) -> None:
    """LightningCLI warns when given args while sys.argv holds pytest's own."""
    monkeypatch.setattr(sys, "argv", ["gradroute"])


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> Path:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


# ------------------------------------------------------------------------------------------------ IDX reader
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_read_idx_round_trips_ubyte_and_int32(tmp_path: Path, name: str) -> None:
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / name, images)), images)
    ints = np.array([-5, 70000, 3], dtype=np.int32)
    out = read_idx(write_idx(tmp_path / f"i{name}", ints, type_code=0x0C))
    assert out.dtype == np.int32 and out.tolist() == [-5, 70000, 3]


def test_read_idx_checks_the_sha256(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "a.idx", np.zeros((2, 2), dtype=np.uint8))
    assert read_idx(path, mnist_data.sha256_of(path)).shape == (2, 2)
    with pytest.raises(ValueError, match=r"a\.idx: sha256 is [0-9a-f]{64}, expected 00ff"):
        read_idx(path, "00ff")


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    good = write_idx(tmp_path / "good.idx", np.zeros((4, 5), dtype=np.uint8)).read_bytes()
    (tmp_path / "short.idx").write_bytes(good[:-1])
    with pytest.raises(ValueError, match=r"declares shape \(4, 5\) \(20 bytes\) but holds 19"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "long.idx").write_bytes(good + b"\0")
    with pytest.raises(ValueError, match="holds 21"):
        read_idx(tmp_path / "long.idx")
    (tmp_path / "magic.idx").write_bytes(b"\x01\x00\x08\x01" + good[4:])
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "magic.idx")
    (tmp_path / "header.idx").write_bytes(good[:6])
    with pytest.raises(ValueError, match="declares 2 dims"):
        read_idx(tmp_path / "header.idx")
    (tmp_path / "cut.idx.gz").write_bytes(gzip.compress(good)[:-8])
    with pytest.raises(ValueError, match="cannot be read as gzip"):
        read_idx(tmp_path / "cut.idx.gz")


def test_carried_mnist_files_verify_and_load() -> None:
    images, labels = mnist_data.load_mnist(DATA, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels).tolist()) == set(range(10))


# ------------------------------------------------------------------------------------------------ data module
def test_missing_files_fail_with_one_line_naming_them(tmp_path: Path) -> None:
    dm = MNISTDataModule(str(tmp_path / "nowhere"), download=False)
    dm.prepare_data()
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "\n" not in message
    assert all(name in message for name in mnist_data.MNIST_FILES)
    assert str((tmp_path / "nowhere").resolve()) in message and "carried:mnist" in message


def test_offline_download_falls_back_to_the_missing_files_error(tmp_path: Path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dm = MNISTDataModule(str(tmp_path))
    dm.prepare_data()  # logs the failure, does not raise: setup gives the actionable message
    assert not list(tmp_path.glob("*.part"))
    with pytest.raises(FileNotFoundError, match="missing train-images-idx3-ubyte.gz"):
        dm.setup("fit")


def test_download_checks_checksums_and_tries_the_next_mirror(tmp_path: Path, monkeypatch) -> None:
    bad_mirror = tmp_path / "bad"
    bad_mirror.mkdir()
    for name in mnist_data.MNIST_FILES:
        (bad_mirror / name).write_bytes(b"not mnist")
    monkeypatch.setattr(mnist_data, "MNIST_MIRRORS", (bad_mirror.as_uri() + "/", DATA.as_uri() + "/"))
    target = tmp_path / "fetched"
    mnist_data.download_mnist(target)
    for name, digest in mnist_data.MNIST_FILES.items():
        assert mnist_data.sha256_of(target / name) == digest
    monkeypatch.setattr(mnist_data, "MNIST_MIRRORS", (bad_mirror.as_uri() + "/",))
    with pytest.raises(OSError, match="could not download train-images-idx3-ubyte.gz .*checksum mismatch"):
        mnist_data.download_mnist(tmp_path / "other")
    assert not list((tmp_path / "other").glob("*.part"))


def test_data_module_batches_are_scaled_and_labelled() -> None:
    dm = MNISTDataModule(str(DATA), batch_size=64, eval_batch_size=500)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (64, 784) and batch["image"].dtype == torch.float32
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
    assert torch.equal(batch["route_labels"], (batch["digit"] >= 5).long())
    assert len(next(iter(dm.test_dataloader()))["digit"]) == 500
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        MNISTDataModule(batch_size=0)


# ------------------------------------------------------------------------------------------------ routing
def recipe_router(*configs: str) -> GradientRouter:
    """The routing callback exactly as a recipe (plus overlays) configures it."""
    args = [a for c in configs for a in ("--config", str(RECIPES / c))]
    cli = GradrouteCLI(args=[*args, *TINY, "--trainer.logger", "false"], run=False)
    (routing,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradientRoutingCallback)]
    return routing.router


def fake_batch(seed: int = 0, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 784, generator=generator) * 2 - 1
    groups = torch.arange(n) % 2  # both groups present
    return images, groups


def paper_loss(model: MNISTSplitAutoencoder, images, groups, good_group: int, good_on_bad: float = 0.0):
    """Independent computation: the paper's ``split_encoding`` detach trick (one decoder pass per loss term).

    The "good" group trains the encoder through dims 0:16 only, the "bad" group through dims 16:32; with
    ``good_on_bad`` the paper's "Good Decoder (bad data)" term also reconstructs bad images through dims 0:16.
    """
    hp = model.hparams
    code = model.encoder(images)
    half = code.shape[1] // 2
    through_first = torch.cat([code[:, :half], code[:, half:].detach()], 1)
    through_second = torch.cat([code[:, :half].detach(), code[:, half:]], 1)
    good_decoder = model.decoders[good_group] if hp.separate_decoders else model.decoders[0]
    bad_decoder = model.decoders[1 - good_group] if hp.separate_decoders else model.decoders[0]
    good, bad = groups == good_group, groups != good_group
    mae = lambda out, rows: (out[rows] - images[rows]).abs().mean()
    loss = hp.reconstruction_weights[good_group] * mae(good_decoder(through_first), good)
    loss = loss + (hp.reconstruction_weights[1 - good_group] - good_on_bad) * mae(bad_decoder(through_second), bad)
    loss = loss + good_on_bad * mae(good_decoder(through_first), bad)
    halves = code.detach().chunk(2, 1)
    loss = loss + hp.certificate_weight * sum((c(h) - images).abs().mean() for c, h in zip(model.certificates, halves))
    loss = loss + sum(w * h.abs().mean(0).sum() for w, h in zip(hp.l1_weights, code.chunk(2, 1)))
    return loss + hp.correlation_weight * correlation_penalty(code)


def routed_grads(model, router, images, groups):
    with router.attached(model), router.route(groups):
        loss = model.compute_losses(images, groups)["loss"]
        return torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize(
    ("configs", "model_kwargs", "good_on_bad"),
    # The appendix recipes route digits 5-9 (group 1) to dims 0:16 ("good" in the paper's v1 code), 0-4 to 16:32.
    [
        (["split.yaml"], {}, 0.0),
        (["split.yaml", "appendix/02_separate_decoders.yaml"], {"separate_decoders": True}, 0.0),
        # Good(bad data)=1 with a shared decoder: digits 0-4 get loss weight 2 and gradient 0.5 / 0.5 on the halves.
        (
            ["split.yaml", "appendix/06_first_half_trained_on_all_digits.yaml"],
            {"reconstruction_weights": (2.0, 1.0), "l1_weights": (2e-2, 3e-3)},
            1.0,
        ),
    ],
)
def test_recipe_routing_equals_the_papers_detach_trick(configs, model_kwargs, good_on_bad) -> None:
    check_against_paper(configs, model_kwargs, good_group=1, good_on_bad=good_on_bad)


def test_main_figure_routing_equals_the_papers_detach_trick() -> None:
    # HEAD's main figure: digits 0-4 are "good" (dims 0:16), digits 5-9 train both halves.
    kwargs = {"reconstruction_weights": (1.0, 2.0), "l1_weights": (2e-2, 3e-3)}
    check_against_paper(["split.yaml", "main_figure.yaml"], kwargs, good_group=0, good_on_bad=1.0)


def check_against_paper(configs, model_kwargs, good_group: int, good_on_bad: float) -> None:
    torch.manual_seed(0)
    model = MNISTSplitAutoencoder(hidden_sizes=(16, 8), **model_kwargs)
    images, groups = fake_batch()
    got = routed_grads(model, recipe_router(*configs), images, groups)
    expected = torch.autograd.grad(
        paper_loss(model, images, groups, good_group, good_on_bad), list(model.parameters())
    )
    for (name, _), g, e in zip(model.named_parameters(), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for g in got)


@pytest.mark.parametrize(("group", "blocked"), [(0, slice(0, 16)), (1, slice(16, 32))])
def test_a_groups_gradient_reaches_the_encoder_only_through_its_half(group, blocked) -> None:
    torch.manual_seed(1)
    model = MNISTSplitAutoencoder(hidden_sizes=(16, 8), l1_weights=(0.0, 0.0), correlation_weight=0.0)
    images, _ = fake_batch(n=6)
    groups = torch.full((6,), group)
    names = [n for n, _ in model.named_parameters()]
    grads = dict(zip(names, routed_grads(model, recipe_router("split.yaml"), images, groups)))
    code_weight = grads["encoder.4.weight"]  # the last encoder layer: one row per code dim
    assert torch.count_nonzero(code_weight[blocked]) == 0
    kept = slice(16, 32) if blocked.start == 0 else slice(0, 16)
    assert bool((code_weight[kept].abs().sum(1) > 0).all())  # every code dim of its own half learns
    # Unrouted, the same batch trains both halves: the zeros above are the routing's doing.
    loss = model.compute_losses(images, groups)["loss"]
    assert torch.count_nonzero(torch.autograd.grad(loss, model.encoder[4].weight)[0][blocked]) > 0


def test_model_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="code_size must be an even int"):
        MNISTSplitAutoencoder(code_size=31)
    with pytest.raises(ValueError, match="l1_weights must be two non-negative numbers"):
        MNISTSplitAutoencoder(l1_weights=(1e-3,))
    with pytest.raises(ValueError, match="hidden_sizes"):
        MNISTSplitAutoencoder(hidden_sizes=())


def test_correlation_penalty_standardises_with_the_unbiased_std_as_the_reference() -> None:
    # The reference's normalize() divides by Tensor.std (Bessel-corrected); the population std would make the
    # penalty N/(N-1) stronger (8/7 at this batch). Written out with torch.std(correction=1), not the helper.
    torch.manual_seed(0)
    code = torch.randn(8, 6) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5, 0.2]) + 0.7
    standard = (code - code.mean(0)) / torch.std(code, dim=0, correction=1)
    first, second = standard[:, :3], standard[:, 3:]
    direct = torch.stack([(first[:, i] * second[:, j]).sum() / 8 for i in range(3) for j in range(3)])
    torch.testing.assert_close(correlation_penalty(code), direct.abs().mean())


# ------------------------------------------------------------------------------------------------ evaluation
def test_per_digit_errors_and_split_summary_match_a_direct_computation() -> None:
    torch.manual_seed(2)
    model = MNISTSplitAutoencoder(hidden_sizes=(16, 8)).eval()
    images = torch.rand(30, 784) * 2 - 1
    digits = torch.arange(30) % 10
    batches = [
        {"image": images[i : i + 7], "digit": digits[i : i + 7], "route_labels": (digits[i : i + 7] >= 5).long()}
        for i in range(0, 30, 7)
    ]
    errors = per_digit_errors(model, batches)
    with torch.no_grad():
        out = model(images)
    for name, prediction in zip(("decoder", "certificate_0", "certificate_1"), [out.reconstruction, *out.certificates]):
        mse = (prediction - images).pow(2).mean(1)
        expected = [mse[digits == d].mean().item() for d in range(10)]
        assert errors[name] == pytest.approx(expected, rel=1e-6)
    baseline = (images - images.mean(0)).pow(2).mean(1)
    assert errors["mean_image"] == pytest.approx([baseline[digits == d].mean().item() for d in range(10)], rel=1e-6)
    magnitudes = code_magnitudes(model, batches)
    with torch.no_grad():
        code = model.encoder(images).abs()
    for group, label in enumerate(("digits_0_4", "digits_5_9")):
        rows = (digits >= 5) == bool(group)
        assert magnitudes[label] == pytest.approx([code[rows, :16].mean().item(), code[rows, 16:].mean().item()])
    summary = certificate_split(errors, [[5, 6, 7, 8, 9], [0, 1, 2, 3, 4]])
    c0 = errors["certificate_0"]
    assert summary[0]["own_mse"] == pytest.approx(sum(c0[5:]) / 5)
    assert summary[0]["other_to_own_ratio"] == pytest.approx(sum(c0[:5]) / sum(c0[5:]))
    sevens = digits == 7
    only_sevens = per_digit_errors(
        model, [{"image": images[sevens], "digit": digits[sevens], "route_labels": digits[sevens] // 5}]
    )
    assert math.isnan(only_sevens["decoder"][0]) and not math.isnan(only_sevens["decoder"][7])


def test_certificate_report_validates_own_digits() -> None:
    with pytest.raises(ValueError, match="two disjoint non-empty lists"):
        CertificateReport(own_digits=[[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="two disjoint non-empty lists"):
        CertificateReport(own_digits=[[0, 1, 10], [2]])


# ------------------------------------------------------------------------------------------------ recipes
def run_recipe(tmp_path: Path, *configs: str, extra: list[str] | None = None) -> dict:
    """``gradroute fit`` on the recipe with ``fast_dev_run``; returns its results.json."""
    args = [a for c in configs for a in ("--config", str(RECIPES / c))]
    cli_args = ["--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path)]
    GradrouteCLI(args=["fit", *args, *cli_args, "--data.init_args.data_dir", str(DATA), *(extra or [])])
    return json.loads((tmp_path / "results.json").read_text())


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("recipe", "routed"), [("split.yaml", True), ("control.yaml", False)])
def test_quick_recipes_smoke_run_through_the_cli(tmp_path: Path, recipe: str, routed: bool) -> None:
    GradrouteCLI(
        args=[
            "fit",
            "--config",
            str(RECIPES / recipe),
            "--data.init_args.data_dir",
            str(DATA),
            "--trainer.logger.init_args.save_dir",  # the recipe's own TensorBoard logger, in tmp_path
            str(tmp_path),
            "--trainer.max_steps",
            "1",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.limit_test_batches",
            "1",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.enable_checkpointing",
            "false",
        ]
    )
    (log_dir,) = tmp_path.glob("*/version_0")
    results = json.loads((log_dir / "results.json").read_text())
    assert results["routed"] is routed
    assert set(results["per_digit_mse"]) == {"decoder", "certificate_0", "certificate_1", "mean_image"}
    assert all(len(v) == 10 for v in results["per_digit_mse"].values())
    assert [c["code_dims"] for c in results["certificates"]] == ["0:16", "16:32"]
    assert (log_dir / "mnist_per_digit_error.png").stat().st_size > 1000
    assert (log_dir / "mnist_reconstructions.png").stat().st_size > 1000
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"test/per_digit_error", "test/reconstructions"}
    assert "test/certificate_0_other_to_own_ratio" in events.Tags()["scalars"]


#: The paper's appendix settings: routed, separate decoders, reconstruction weights [0-4, 5-9], L1 per half, corr.
APPENDIX_SETTINGS = {
    "01_gradient_routing.yaml": (True, False, [1.0, 1.0], [3e-3, 3e-3], 0.1),
    "02_separate_decoders.yaml": (True, True, [1.0, 1.0], [3e-3, 3e-3], 0.1),
    "03_no_correlation_penalty.yaml": (True, False, [1.0, 1.0], [3e-3, 3e-3], 0.0),
    "04_no_regularization.yaml": (True, False, [1.0, 1.0], [0.0, 0.0], 0.0),
    "05_no_regularization_separate_decoders.yaml": (True, True, [1.0, 1.0], [0.0, 0.0], 0.0),
    "06_first_half_trained_on_all_digits.yaml": (True, False, [2.0, 1.0], [2e-2, 3e-3], 0.1),
    "07_no_routing_l1_trained_on_5_9_only.yaml": (False, False, [0.0, 1.0], [1e-3, 1e-3], 0.0),
    "08_no_routing_no_regularization_trained_on_5_9_only.yaml": (False, False, [0.0, 1.0], [0.0, 0.0], 0.0),
    "09_no_routing.yaml": (False, False, [1.0, 1.0], [3e-3, 3e-3], 0.1),
    "10_no_routing_no_regularization.yaml": (False, False, [1.0, 1.0], [0.0, 0.0], 0.0),
}


def test_the_ten_appendix_overlays_set_the_papers_settings_on_any_base() -> None:
    assert sorted(p.name for p in (RECIPES / "appendix").glob("*.yaml")) == sorted(APPENDIX_SETTINGS)
    for name, (routed, separate, reconstruction, l1, correlation) in APPENDIX_SETTINGS.items():
        for base in ("split.yaml", "control.yaml", "split_paper.yaml"):
            args = ["--config", str(RECIPES / base), "--config", str(RECIPES / "appendix" / name), *TINY]
            cli = GradrouteCLI(args=args, run=False)
            hp = cli.model.hparams
            got = (hp.separate_decoders, list(hp.reconstruction_weights), list(hp.l1_weights), hp.correlation_weight)
            assert got == (separate, reconstruction, l1, correlation), (name, base)
            kinds = [type(cb) for cb in cli.trainer.callbacks]
            assert (GradientRoutingCallback in kinds) is routed and CertificateReport in kinds, (name, base)
            assert hp.certificate_weight == 1.0 and hp.lr == 1e-3 and hp.weight_decay == 5e-5


# ------------------------------------------------------------------------------------------------ DDP
@pytest.mark.timeout(180)
def test_routed_training_under_ddp_spawn(tmp_path: Path) -> None:
    routing = recipe_router("split.yaml")
    trainer = pl.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        limit_test_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[GradientRoutingCallback(routing.targets, routing.routes, routing.label_names), CertificateReport()],
    )
    model = MNISTSplitAutoencoder(hidden_sizes=(16, 8))
    trainer.fit(model, datamodule=MNISTDataModule(str(DATA), batch_size=32, eval_batch_size=500))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["routed"] and results["scale"]["steps"] == 2 and results["scale"]["test_images"] == 500
