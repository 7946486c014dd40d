"""The ERA lifecycle in a real Trainer on a tiny HF GPT-Neo: expand in setup, route, ablate in on_fit_end.

Exactness: routed gradients equal an independent hand-masked computation, and with forget weight 0 on the
original neurons of the last block, their input weights get exactly the retain tokens' gradient (and none at
all from an all-forget batch). Resume equality, load_from_checkpoint, saved ablated weights (safetensors and HF
``from_pretrained`` with the original config) and the bad-input errors are checked too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import transformers
from era_models import NEURONS, NeoLM, token_batch
from helpers import GradCapture, RoutedDataModule, fresh_copy, hand_masked_grads, trainer_kwargs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import load_file, load_model

from lightning_gradroute import (
    Expansion,
    GradientRoutingCallback,
    Phase,
    Route,
    Target,
    expand,
    expansion_record,
)
from lightning_gradroute.cli import main

ADD = 4
C_FC = "model.transformer.h.1.mlp.c_fc.weight"  # the original neurons' input weights, never resized
C_FC_NEW = "model.transformer.h.1.mlp.c_fc.new_units.weight"  # the new neurons' input weights


def era(
    add: int = ADD,
    ablate: str | None = "contract",
    save_ablated: bool | str = False,
    layers: str = "*",
    expansions: list[Expansion] | None = None,
) -> GradientRoutingCallback:
    return GradientRoutingCallback(
        targets={"mlp": Target(f"model.transformer.h.{layers}.mlp.act")},
        routes=[Route(label="forget", target="mlp", weights={"original": 0.0, "expanded": 1.0})],
        expansions=[Expansion("model.transformer.h.*.mlp", preset="gpt_neo_mlp", add=add)]
        if expansions is None
        else expansions,
        ablate=ablate,  # type: ignore[arg-type]
        save_ablated=save_ablated,
    )


def mixed_data(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    labels = torch.randint(0, 2, (n, 6), generator=torch.Generator().manual_seed(seed + 1))
    return token_batch(n, labels, seed)


class Snapshots(Callback):
    """Model state before every training batch and at ``on_train_end`` (before ablation)."""

    def __init__(self) -> None:
        self.before_batch: list[dict[str, torch.Tensor]] = []
        self.final: dict[str, torch.Tensor] = {}
        self.optimizer_params = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.optimizer_params = sum(p.numel() for g in trainer.optimizers[0].param_groups for p in g["params"])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.before_batch.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.final = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def fit(module: pl.LightningModule, callbacks: list[Callback], data: dict, tmp_path: Path, **kw: Any) -> pl.Trainer:
    ckpt_path = kw.pop("ckpt_path", None)
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **kw))
    trainer.fit(module, RoutedDataModule(data, batch_size=4), ckpt_path=ckpt_path)
    return trainer


def test_routed_gradients_are_exact_and_original_neurons_learn_nothing_from_forget_tokens(tmp_path: Path) -> None:
    data = mixed_data()
    data["route_labels"][4:] = 1  # the second batch is all forget
    module, grads, snaps = NeoLM(), GradCapture(), Snapshots()
    fit(module, [era(layers="1", ablate=None), grads, snaps], data, tmp_path, max_steps=2)
    assert snaps.optimizer_params == sum(p.numel() for p in module.parameters())  # expansion before the optimizer

    # Independent computation on a hook-free expanded copy holding the weights before step 1.
    reference = NeoLM()
    expand(reference, era().expansions)
    reference.load_state_dict(snaps.before_batch[0])
    reference = fresh_copy(reference)
    batch = {k: v[:4] for k, v in data.items()}
    forget = batch["route_labels"].bool()[..., None]
    mask = torch.ones(4, 6, NEURONS + ADD)
    mask[..., :NEURONS] = torch.where(forget, 0.0, 1.0)
    expected = hand_masked_grads(reference, "model.transformer.h.1.mlp.act", mask,
                                 lambda: reference.item_losses(batch).mean())
    for name, grad in expected.items():
        torch.testing.assert_close(grads.grads[0][name], grad, rtol=1e-5, atol=1e-7, msg=name)

    # The original neurons' input weights get exactly the retain tokens' share of the gradient ...
    losses = reference.item_losses(batch)
    retain_only = (losses * (~forget[..., 0])).sum() / losses.numel()
    (g,) = torch.autograd.grad(retain_only, reference.get_parameter(C_FC))
    torch.testing.assert_close(grads.grads[0][C_FC], g, rtol=1e-5, atol=1e-7)
    # ... and nothing from an all-forget batch (plain SGD: the weights stay bit-identical), unlike the new neurons.
    assert torch.count_nonzero(grads.grads[1][C_FC]) == 0
    assert torch.equal(snaps.final[C_FC], snaps.before_batch[1][C_FC])
    assert torch.count_nonzero(grads.grads[1][C_FC_NEW]) > 0


def test_fit_contracts_and_saves_weights_loadable_with_the_original_config(tmp_path: Path) -> None:
    module, snaps, routing = NeoLM(), Snapshots(), era(save_ablated=True)
    fit(module, [routing, snaps], mixed_data(), tmp_path, max_steps=2)
    assert not any(hasattr(m, "new_units") for m in module.modules())
    assert expansion_record(module) is None and routing.phase is Phase.CONTRACTED
    assert set(snaps.final) - set(module.state_dict()) == {k for k in snaps.final if ".new_units." in k}
    for name, value in module.state_dict().items():  # contraction keeps the trained original parameters
        assert torch.equal(value, snaps.final[name]), name
    assert snaps.final[C_FC_NEW].shape == (ADD, 16)

    saved = NeoLM(seed=1)
    load_model(saved, str(tmp_path / "ablated" / "model.safetensors"))
    hf = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "ablated" / "hf" / "model")
    ids = mixed_data()["x"]
    with torch.no_grad():
        logits = module.model(ids).logits
        assert torch.equal(saved.model(ids).logits, logits)
        assert torch.equal(hf(ids).logits, logits)


@pytest.mark.parametrize("ablate", ["zero", None])
def test_zero_and_no_ablation_keep_the_expanded_shapes(tmp_path: Path, ablate: str | None) -> None:
    module, snaps, routing = NeoLM(), Snapshots(), era(ablate=ablate, save_ablated=True)
    fit(module, [routing, snaps], mixed_data(), tmp_path, max_steps=1)
    new = module.get_parameter(C_FC_NEW)
    assert new.shape == (ADD, 16) and expansion_record(module) is not None
    assert torch.equal(module.get_parameter(C_FC), snaps.final[C_FC])
    if ablate == "zero":
        assert routing.phase is Phase.ZEROED and torch.count_nonzero(new) == 0
        assert (tmp_path / "ablated" / "model.safetensors").exists()
        assert not (tmp_path / "ablated" / "hf").exists()  # new units do not fit the original config
    else:
        assert routing.phase is Phase.EXPANDED and torch.equal(new, snaps.final[C_FC_NEW])
        assert not (tmp_path / "ablated").exists()


def test_resume_mid_era_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    data = mixed_data()
    straight, straight_cb = NeoLM(), era()
    fit(straight, [straight_cb], data, tmp_path / "a", max_epochs=2)

    ckpt_dir = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)
    fit(NeoLM(), [era(), checkpoint], data, tmp_path / "b", max_epochs=1, enable_checkpointing=True)
    (ckpt,) = ckpt_dir.glob("*.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    assert saved["gradroute"]["phase"] == "expanded" and saved["state_dict"][C_FC_NEW].shape == (ADD, 16)

    resumed, resumed_cb = NeoLM(seed=7), era()  # other initial weights: everything must come from the checkpoint
    fit(resumed, [resumed_cb], data, tmp_path / "c", max_epochs=2, ckpt_path=ckpt)
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert resumed_cb.state_dict() == straight_cb.state_dict()

    loaded = NeoLM.load_from_checkpoint(ckpt)  # the mixin rebuilds the expanded shapes before loading
    assert expansion_record(loaded) is not None
    for name, value in saved["state_dict"].items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_mixin_expansion_from_hparams_and_load_of_a_contracted_checkpoint(tmp_path: Path) -> None:
    spec = Expansion("model.transformer.h.*.mlp", preset="gpt_neo_mlp", add=ADD)
    module = NeoLM(expansions=[spec.to_dict()])
    routing = era(expansions=[])  # the module expands itself in configure_model; routes still see the groups
    trainer = fit(module, [routing], mixed_data(), tmp_path, max_steps=1)
    assert routing.phase is Phase.CONTRACTED and not hasattr(module.model.transformer.h[1].mlp.c_fc, "new_units")
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    loaded = NeoLM.load_from_checkpoint(tmp_path / "after.ckpt")  # configure_model expands, the ckpt contracts
    assert expansion_record(loaded) is None
    for name, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_expanded_units_without_an_expansion_fail_at_setup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"units 'original' need an expansion of this module"):
        fit(NeoLM(), [era(expansions=[])], mixed_data(), tmp_path, max_steps=1)


def test_resuming_with_another_expansion_is_a_clear_error(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    fit(NeoLM(), [era(), checkpoint], mixed_data(), tmp_path, max_epochs=1, enable_checkpointing=True)
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    with pytest.raises(ValueError, match=r"NeoLM: the checkpoint was trained with expansions \[model.transformer.h"
                       r".\*.mlp \+4 \(gpt_neo_mlp\)\], this run has \[model.transformer.h.\*.mlp \+6"):
        fit(NeoLM(), [era(add=6)], mixed_data(), tmp_path, max_epochs=2, ckpt_path=ckpt)

    class PlainNeo(NeoLM):  # without the mixin's on_load_checkpoint, loading the state dict catches it
        def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            pass

    with pytest.raises(RuntimeError, match=r"size mismatch for model.transformer.h.0.mlp.c_fc.new_units.weight"):
        fit(PlainNeo(), [era(add=6)], mixed_data(), tmp_path, max_epochs=2, ckpt_path=ckpt)
    per_layer = [Expansion(f"model.transformer.h.{i}.mlp", preset="gpt_neo_mlp", add=ADD) for i in (0, 1)]
    with pytest.raises(ValueError, match=r"GradientRoutingCallback: the checkpoint was trained with expansions "
                       r"\[model.transformer.h.\*.mlp \+4 \(gpt_neo_mlp\)\], this run has \[model.transformer.h.0"):
        fit(PlainNeo(), [era(expansions=per_layer)], mixed_data(), tmp_path, max_epochs=2, ckpt_path=ckpt)


def test_keeping_expanded_shapes_under_ddp_spawn_is_refused_at_setup(tmp_path: Path) -> None:
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2))
    with pytest.raises(ValueError, match=r"ablate='zero' keeps the expanded shapes.*use ablate='contract'"):
        era(ablate="zero").setup(trainer, NeoLM(), "fit")


def test_constructor_rejects_bad_ablate_and_expansions() -> None:
    with pytest.raises(ValueError, match=r"ablate mode must be one of \['contract', 'zero', 'dedicated'\], got 'del"):
        era(ablate="delete")
    with pytest.raises(ValueError, match="expansions must be Expansion objects"):
        era(expansions=["transformer.h.*.mlp"])  # type: ignore[list-item]


def test_gradroute_ablate_command_contracts_a_saved_checkpoint(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    fit(NeoLM(), [era(), checkpoint], mixed_data(), tmp_path, max_epochs=1, enable_checkpointing=True)
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    expanded = torch.load(ckpt, weights_only=False)["state_dict"]

    main(["ablate", "--checkpoint", str(ckpt), "--output", str(tmp_path / "ablated.ckpt")])
    loaded = NeoLM.load_from_checkpoint(tmp_path / "ablated.ckpt")
    assert expansion_record(loaded) is None and not any(hasattr(m, "new_units") for m in loaded.modules())
    assert torch.equal(loaded.get_parameter(C_FC), expanded[C_FC]) and C_FC_NEW in expanded
    main(["ablate", "--checkpoint", str(ckpt), "--output", str(tmp_path / "w.safetensors")])
    weights_only = NeoLM(seed=3)
    weights_only.load_state_dict(load_file(tmp_path / "w.safetensors"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in weights_only.state_dict().items())

    with pytest.raises(ValueError, match=r"ablated.ckpt is already ablated \(phase 'contracted'\)"):
        main(["ablate", "--checkpoint", str(tmp_path / "ablated.ckpt"), "--output", str(tmp_path / "again.ckpt")])
    torch.save({"state_dict": expanded}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="has no checkpoint\\['gradroute'\\]; it was not saved mid-ERA"):
        main(["ablate", "--checkpoint", str(tmp_path / "plain.ckpt"), "--output", str(tmp_path / "x.ckpt")])
