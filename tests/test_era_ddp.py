"""ERA under ``strategy="ddp_spawn"`` with 2 CPU processes on a tiny HF GPT-Neo.

Expansion happens in ``setup`` before DDP wraps the model and before ``configure_optimizers``: every new
parameter is in the optimizer and all-reduced, so both ranks (fed different data and different routing labels)
end bit-identical. Contraction in ``on_fit_end`` lets the main process, whose model was never expanded, load
rank 0's result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from era_models import HIDDEN, NeoLM, token_batch
from helpers import RoutedDataModule, trainer_kwargs
from lightning.pytorch.callbacks import Callback

from lightning_gradroute import Expansion, GradientRoutingCallback, Route, Target, ablate_state_dict, expand

SPEC = Expansion("model.transformer.h.*.mlp", preset="gpt_neo_mlp", add=4)
C_FC_NEW = "model.transformer.h.0.mlp.c_fc.new_units.weight"


class RankDump(Callback):
    """Each rank saves its optimizer's parameter count and its (expanded) weights at fit start and train end."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.dump: dict[str, Any] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
        self.dump["optimizer_numel"] = sum(p.numel() for p in params)
        self.dump["module_numel"] = sum(p.numel() for p in pl_module.parameters())
        self.dump["wrapped"] = type(trainer.strategy.model).__name__
        self.dump["start"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dump["end"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(self.dump, self.out_dir / f"rank{trainer.global_rank}.pt")


@pytest.mark.timeout(180)
def test_ddp_spawn_expands_before_wrapping_keeps_ranks_identical_and_recovers_contracted(tmp_path: Path) -> None:
    labels = torch.randint(0, 2, (16, 6), generator=torch.Generator().manual_seed(1))
    data = token_batch(16, labels)
    routing = GradientRoutingCallback(
        targets={"mlp": Target("model.transformer.h.*.mlp.act")},
        routes=[Route(label="forget", target="mlp", weights={"original": -0.75, "expanded": 1.0})],
        expansions=[SPEC],
    )
    module = NeoLM()
    trainer = pl.Trainer(
        callbacks=[routing, RankDump(tmp_path)],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_steps=2),
    )
    trainer.fit(module, RoutedDataModule(data, batch_size=4))

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for dump in ranks:
        assert dump["wrapped"] == "DistributedDataParallel"
        assert dump["optimizer_numel"] == dump["module_numel"]  # every new parameter is optimised
        assert dump["start"][C_FC_NEW].shape == (SPEC.add, HIDDEN)
        assert not torch.equal(dump["end"][C_FC_NEW], dump["start"][C_FC_NEW])  # new units trained
    for name, value in ranks[0]["end"].items():
        assert torch.equal(ranks[1]["end"][name], value), name  # all-reduced, including the new parameters

    # The main process never ran setup: its model is unexpanded and now holds rank 0's contracted weights.
    record = expand(NeoLM(), [SPEC])
    expected = ablate_state_dict(ranks[0]["end"], record)
    assert module.state_dict().keys() == expected.keys()
    for name, value in module.state_dict().items():
        assert torch.equal(value, expected[name]), name
