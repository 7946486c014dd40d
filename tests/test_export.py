"""``SaveFinalModel``: the final model of a fit (after the routing callback's ablation) is written once and loads
back with the documented loaders: ``load_from_checkpoint``, ``AutoModelForCausalLM`` and ``AutoTokenizer``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from era_models import VOCAB, NeoLM, token_batch
from helpers import RECIPES, RoutedDataModule, recipe_cli_args, trainer_kwargs
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_gradroute import Expansion, GradientRoutingCallback, Route, SaveFinalModel, Target
from lightning_gradroute.cli import GradrouteCLI

SPEC = Expansion("model.transformer.h.*.mlp", preset="gpt_neo_mlp", add=4)
WORDS = ["<eos>", *(f"w{i}" for i in range(1, VOCAB))]


def era_routing() -> GradientRoutingCallback:
    return GradientRoutingCallback(
        targets={"mlp": Target("model.transformer.h.*.mlp.act")},
        routes=[Route(label="forget", target="mlp", weights={"original": 0.0, "expanded": 1.0})],
        save_ablated=False,
    )


class TextDataModule(RoutedDataModule):
    """Token batches with a word-level ``tokenizers.Tokenizer`` whose ``<eos>`` is ``eos_id``, as text data has."""

    eos_id = 0

    def __init__(self, columns: dict[str, torch.Tensor], batch_size: int) -> None:
        super().__init__(columns, batch_size)
        self.tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<eos>"))
        self.tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()


def data() -> dict[str, torch.Tensor]:
    return token_batch(8, torch.randint(0, 2, (8, 6), generator=torch.Generator().manual_seed(1)))


class LoggedSaveFinalModel(SaveFinalModel):
    """Appends its rank to ``<directory>.writes`` whenever a rank asks the strategy to save a checkpoint (which
    ``trainer.save_checkpoint`` does on every rank)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        strategy, log = trainer.strategy, Path(f"{self.directory}.writes")
        save = strategy.save_checkpoint

        def logged(checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            with log.open("a") as f:
                f.write(f"{trainer.global_rank}\n")
            save(checkpoint, path, storage_options)

        strategy.save_checkpoint = logged  # type: ignore[method-assign]


def test_contracted_era_model_is_saved_and_loads_with_every_loader(tmp_path: Path) -> None:
    module = NeoLM(expansions=[SPEC.to_dict()])  # the mixin expands in configure_model
    saver = SaveFinalModel()
    trainer = pl.Trainer(callbacks=[era_routing(), saver], **trainer_kwargs(tmp_path, max_steps=2))
    trainer.fit(module, TextDataModule(data(), batch_size=4))
    final = tmp_path.resolve() / "final"
    assert saver.directory == final
    trained = module.state_dict()
    assert "model.transformer.h.0.mlp.c_fc.new_units.weight" not in trained  # contracted before saving

    # Lightning: the mixin expands in configure_model and contracts again for a contracted checkpoint.
    loaded = NeoLM.load_from_checkpoint(final / "model.ckpt", map_location="cpu")
    assert loaded.state_dict().keys() == trained.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, trained[key]), key
    tensors = load_file(final / "model.safetensors")  # tied weights once (safetensors' save_model)
    assert len(tensors) >= len(trained) - 1 and all(torch.equal(v, trained[k]) for k, v in tensors.items())

    # Hugging Face: the inner GPT-Neo with the data module's tokenizer (eos and pad from its eos_id).
    tokenizer = AutoTokenizer.from_pretrained(final / "hf" / "model")
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<eos>", "<eos>")
    ids = tokenizer("w3 w1 w7 w2", return_tensors="pt").input_ids
    assert ids.tolist() == [[3, 1, 7, 2]]
    hf_model = AutoModelForCausalLM.from_pretrained(final / "hf" / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, module.model.eval()(ids).logits)


def test_disabled_writes_nothing_and_it_must_come_after_the_routing_callback(tmp_path: Path) -> None:
    trainer = pl.Trainer(callbacks=[SaveFinalModel(enabled=False)], **trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(NeoLM(), TextDataModule(data(), batch_size=4))
    assert not (tmp_path / "final").exists()
    trainer = pl.Trainer(callbacks=[SaveFinalModel(), era_routing()], **trainer_kwargs(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match="list it after the GradientRoutingCallback"):
        trainer.fit(NeoLM(expansions=[SPEC.to_dict()]), TextDataModule(data(), batch_size=4))


def test_the_cli_appends_it_after_the_configs_callbacks_and_can_turn_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["gradroute"])
    args = recipe_cli_args(RECIPES / "toy" / "split.yaml")
    callbacks = GradrouteCLI(args=args, run=False).trainer.callbacks
    saver = next(cb for cb in callbacks if isinstance(cb, SaveFinalModel))
    routing = next(cb for cb in callbacks if isinstance(cb, GradientRoutingCallback))
    assert saver.enabled and callbacks.index(saver) > callbacks.index(routing)
    off = GradrouteCLI(args=[*args, "--final_model.enabled=false"], run=False).trainer.callbacks
    assert not next(cb for cb in off if isinstance(cb, SaveFinalModel)).enabled


@pytest.mark.timeout(180)
def test_ddp_spawn_rank_zero_writes_once_and_it_loads(tmp_path: Path) -> None:
    module = NeoLM(expansions=[SPEC.to_dict()])
    trainer = pl.Trainer(
        callbacks=[era_routing(), LoggedSaveFinalModel()],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_steps=2),
    )
    trainer.fit(module, TextDataModule(data(), batch_size=2))
    final = tmp_path.resolve() / "final"
    assert Path(f"{final}.writes").read_text() == "0\n"
    loaded = NeoLM.load_from_checkpoint(final / "model.ckpt", map_location="cpu")
    for key, value in module.state_dict().items():  # the main process holds rank 0's contracted weights
        assert torch.equal(loaded.state_dict()[key], value), key
    assert AutoTokenizer.from_pretrained(final / "hf" / "model").eos_token == "<eos>"
