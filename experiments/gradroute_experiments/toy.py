"""A two-task regression that shows localisation in a minute on a CPU: the smallest real routed run.

Each example belongs to task ``retain`` or ``forget`` (its routing label) and asks for a different function of
the same input. Routing sends the forget task's gradient only into hidden units ``32:64`` of the first layer
and the retain task's only into ``0:32``. After training, zero-ablating units ``32:64`` should destroy the
forget task and spare the retain task; without routing (the control recipe) it hurts both.

    gradroute fit --config recipes/toy/split.yaml
"""

from __future__ import annotations

import json
import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradroute.mixin import GradientRoutingMixin

__all__ = ["TwoTaskData", "TwoTaskRegressor", "AblationReport"]


class TwoTaskData(pl.LightningDataModule):
    """``x ~ N(0, I)``; retain target ``sin(a.x)``, forget target ``cos(b.x)``; the task id is an input too."""

    def __init__(self, num_train: int = 8192, num_val: int = 2048, dim: int = 8, batch_size: int = 64, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()

    def _split(self, n: int, gen: torch.Generator, directions: Tensor) -> TensorDataset:
        x = torch.randn(n, self.hparams.dim, generator=gen)
        task = torch.randint(0, 2, (n,), generator=gen)
        proj = (x * directions[task]).sum(-1)
        y = torch.where(task == 0, torch.sin(2 * proj), torch.cos(2 * proj))
        inputs = torch.cat([x, nn.functional.one_hot(task, 2).float()], dim=-1)
        return TensorDataset(inputs, y, task)

    def setup(self, stage: str) -> None:
        gen = torch.Generator().manual_seed(self.hparams.seed)
        directions = nn.functional.normalize(torch.randn(2, self.hparams.dim, generator=gen), dim=-1)
        self.train_set = self._split(self.hparams.num_train, gen, directions)
        self.val_set = self._split(self.hparams.num_val, gen, directions)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1024)


class TwoTaskRegressor(GradientRoutingMixin, pl.LightningModule):
    """MLP ``(dim + 2) -> hidden -> 1``; routing targets the hidden layer (``net.0``)."""

    def __init__(self, dim: int = 8, hidden: int = 64, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(dim + 2, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    def _step(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        x, y, task = batch
        return self.routed_loss((self(x) - y) ** 2, task)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch)

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class AblationReport(pl.Callback):
    """At fit end: per-task validation MSE with all hidden units, and with each unit group of ``module`` zeroed.

    Writes ``results.json`` into the run's log dir and prints where it is. With routing, zeroing the forget
    task's units should hurt the forget task more than the retain task, and the other way round; compare with
    the control recipe.
    """

    def __init__(self, module: str = "net.0", unit_groups: dict[str, str] | None = None) -> None:
        groups = unit_groups or {"retain_units": "0:32", "forget_units": "32:64"}
        self.module = module
        self.unit_groups = {name: slice(*(int(v) for v in units.split(":"))) for name, units in groups.items()}

    @torch.no_grad()
    def _task_mse(self, pl_module: TwoTaskRegressor, x: Tensor, y: Tensor, task: Tensor) -> dict[str, float]:
        err = (pl_module(x) - y) ** 2
        return {name: err[task == i].mean().item() for i, name in enumerate(pl_module.routing_labels)}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, TwoTaskRegressor)
        x, y, task = trainer.datamodule.val_set.tensors  # type: ignore[attr-defined]
        pl_module.eval()
        results: dict[str, Any] = {"val_mse": self._task_mse(pl_module, x, y, task)}
        for name, units in self.unit_groups.items():

            def zero_units(module: nn.Module, args: Any, output: Tensor, units: slice = units) -> Tensor:
                output = output.clone()
                output[..., units] = 0
                return output

            handle = pl_module.get_submodule(self.module).register_forward_hook(zero_units)
            results[f"val_mse_without_{name}"] = self._task_mse(pl_module, x, y, task)
            handle.remove()
        if trainer.is_global_zero:
            out_dir = trainer.log_dir or trainer.default_root_dir
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, "results.json")
            with open(path, "w") as f:
                json.dump(results, f, indent=2)
            print(f"results: {path}\n{json.dumps(results, indent=2)}")
