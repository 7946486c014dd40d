"""One routed ERA fit under ModelParallelStrategy (FSDP2, ``fully_shard`` in ``configure_model``) on 2 CPU
processes, or on one process without sharding, for ``tests/test_scale_out.py``.

Lightning's ModelParallelStrategy relaunches this script for every rank (it cannot run inside pytest), so the test
runs it as a subprocess: ``python model_parallel_fit.py --processes 2 --out DIR``; ``--checkpoint`` recomputes
the sharded pair in backward (``torch.utils.checkpoint``, non-reentrant). The callback writes the
ablated (contracted, gathered to full tensors) weights to ``DIR/ablated/model.safetensors`` on rank 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.utils.checkpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import MixinTokenModel, RoutedDataModule, token_columns, trainer_kwargs  # noqa: E402

from lightning_gradroute import (  # noqa: E402
    Expansion,
    GradientRoutingCallback,
    ParameterTarget,
    Route,
    RoutedSGD,
    Target,
)


class ShardedTokenModel(MixinTokenModel):
    """``embed -> encoder Linear -> GELU -> head`` with the encoder pair sharded as one FSDP2 unit."""

    def __init__(self, checkpoint: bool = False) -> None:
        super().__init__(normalization="global")
        self.checkpoint = checkpoint
        self.mlp = nn.Sequential(self.encoder, self.act, nn.Linear(16, 16))
        del self.encoder, self.act

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.checkpoint:
            return self.head(torch.utils.checkpoint.checkpoint(self.mlp, x, use_reentrant=False))
        return self.head(self.mlp(x))

    def configure_model(self) -> None:
        if self._device_mesh is None or getattr(self, "sharded", False):
            return
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.mlp, mesh=mesh)
        fully_shard(self, mesh=mesh)
        self.sharded = True

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # SGD with momentum: linear in the gradient, so rounding differences between the sharded and the single run
        # stay rounding (Adam divides by the gradient's own size and turns them into whole steps where it is ~0).
        return RoutedSGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, choices=(1, 2), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same kernels in both runs, whatever the machine's cores
    routing = GradientRoutingCallback(
        targets={"act": Target("mlp.1"), "up": ParameterTarget("mlp.0.**.weight", dim=0)},
        routes=[Route("forget", "act", {"original": -0.75, "expanded": 1.0}), Route("forget", "up", {"original": 0.0})],
        expansions=[Expansion("mlp", preset="linear_pair", add=4, up=("0",), down=("2",), between=("1",),
                              output_init="match")],  # fmt: skip
        save_ablated=str(args.out),
    )
    torch.manual_seed(0)
    model = ShardedTokenModel(args.checkpoint)
    distributed = {}
    if args.processes == 2:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        distributed = dict(accelerator="cpu", devices=2, strategy=strategy, use_distributed_sampler=False)
    trainer = pl.Trainer(callbacks=[routing], **trainer_kwargs(args.out, accumulate_grad_batches=2, **distributed))
    trainer.fit(model, RoutedDataModule(token_columns(), batch_size=4 // args.processes, shard_global_batches=True))


if __name__ == "__main__":
    main()
