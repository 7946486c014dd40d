"""Parameter routing in a real Trainer: DDP equivalence with different labels per rank (ddp_spawn, 2 CPU
processes), and ERA with parameter routing and the routed optimizer (expand, route, contract)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from era_models import NeoLM, token_batch
from helpers import DDP, MixinTokenModel, RoutedDataModule, token_columns, trainer_kwargs
from lightning.pytorch.callbacks import Callback

from lightning_gradroute import Expansion, GradientRoutingCallback, ParameterTarget, Route, RoutedAdamW, Target


class RoutedAdamWTokenModel(MixinTokenModel):
    """:class:`MixinTokenModel` with the routed AdamW (weight decay on, so a leak would show)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return RoutedAdamW(self.parameters(), lr=0.05, weight_decay=0.1)


def parameter_routing() -> GradientRoutingCallback:
    return GradientRoutingCallback(
        targets={
            "encoder": ParameterTarget("encoder.weight", dim=0),
            "embed": ParameterTarget("embed.weight", dim=1),
            "code": Target("encoder"),  # an activation route beside them
        },
        routes=[
            Route("forget", "encoder", {"0:8": 0.0, "8:12": -0.5}),
            Route("forget", "embed", {"4:": 0.0}),
            Route("retain", "code", {"12:": 0.5}),
        ],
    )


class SaveParams(Callback):
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters()}
        torch.save(params, self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.timeout(150)
def test_ddp_with_different_labels_per_rank_equals_one_process_on_the_global_batch(tmp_path: Path) -> None:
    results = {}
    for processes in (1, 2):
        torch.manual_seed(0)
        model = RoutedAdamWTokenModel(normalization="global")
        directory = tmp_path / str(processes)
        directory.mkdir()
        trainer = pl.Trainer(
            callbacks=[parameter_routing(), SaveParams(directory)],
            **trainer_kwargs(directory, accumulate_grad_batches=2, **(DDP if processes == 2 else {})),
        )
        trainer.fit(model, RoutedDataModule(token_columns(), batch_size=4 // processes, shard_global_batches=True))
        results[processes] = [torch.load(directory / f"rank{r}.pt") for r in range(processes)]
    (single,), ranks = results[1], results[2]
    for name, value in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs across ranks"
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6, msg=name)


class NeoRoutedAdamW(NeoLM):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return RoutedAdamW(self.parameters(), lr=0.01, weight_decay=0.1)


class Before(Callback):
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.final = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_era_with_parameter_routing_keeps_the_original_mlp_exactly_where_forget_data_trains(tmp_path: Path) -> None:
    """Expand every MLP, let forget tokens change only the new neurons (parameter routing, AdamW with weight
    decay), train on forget data only, contract: the original MLP weights never moved, bit for bit."""
    mlp = "model.transformer.h.*.mlp"
    routing = GradientRoutingCallback(
        targets={
            "up": ParameterTarget(f"{mlp}.c_fc.**.weight", dim=0),  # c_fc.weight and c_fc.new_units.weight
            "up_bias": ParameterTarget(f"{mlp}.c_fc.**.bias"),
            "down": ParameterTarget(f"{mlp}.c_proj.**.weight", dim=1),
        },
        routes=[Route("forget", "up", {"original": 0.0}), Route("forget", "up_bias", {"original": 0.0}),
                Route("forget", "down", {"original": 0.0})],  # fmt: skip
        expansions=[Expansion(mlp, preset="gpt_neo_mlp", add=4, output_init="match")],
    )
    snapshots = Before()
    module = NeoRoutedAdamW()
    data = token_batch(8, torch.ones(8, 6, dtype=torch.long))  # every token is forget
    trainer = pl.Trainer(callbacks=[routing, snapshots], **trainer_kwargs(tmp_path, max_steps=3))
    trainer.fit(module, RoutedDataModule(data, batch_size=4))
    for name, before in snapshots.params.items():
        moved = not torch.equal(snapshots.final[name], before)
        if ".new_units." in name or ".mlp." not in name:
            assert moved, name  # new neurons and everything outside the MLPs learned from the forget data
        elif name.endswith(("c_fc.weight", "c_fc.bias", "c_proj.weight")):
            assert not moved, name  # the original neurons did not, not even by weight decay or momentum
    assert not any(hasattr(m, "new_units") for m in module.modules())  # contracted at fit end


def test_a_yaml_config_builds_activation_and_parameter_targets_side_by_side() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(GradientRoutingCallback, "routing")
    config = parser.parse_string(
        """
        routing:
          targets:
            up: {params: "model.transformer.h.*.mlp.c_fc.weight", dim: 0}
            act: {modules: "model.transformer.h.*.mlp.act"}
          routes:
            - {label: forget, target: up, weights: {"0:8": 0.0}}
            - {label: forget, target: act, weights: {"8:": 0.5}}
        """
    )
    routing = parser.instantiate(config).routing
    assert routing.router.targets == {
        "up": ParameterTarget("model.transformer.h.*.mlp.c_fc.weight", dim=0),
        "act": Target("model.transformer.h.*.mlp.act"),
    }
