"""Routing under DDP (``ddp_spawn``, 2 CPU processes, gloo): ranks stay in sync, no hang, equal to one process.

Each rank trains on its own slice of every global batch (``RoutedDataModule(shard_global_batches=True)`` with
``use_distributed_sampler=False``), so the routing masks differ per rank, and one rank never sees forget data.
Rank-divergent autograd graphs would hang DDP rather than fail, hence the timeouts.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import DDP, MixinTokenModel, RoutedDataModule, SaveRankState, rank_states, token_columns, trainer_kwargs

from lightning_gradroute import GradientRoutingCallback, Route, Target


def routing() -> GradientRoutingCallback:
    return GradientRoutingCallback(
        targets={"code": Target("encoder")},
        routes=[Route(label="forget", target="code", weights={"0:8": 0.0, "8:12": -0.75})],
        log_grad_norms=True,
    )


@pytest.mark.timeout(120)
def test_ranks_stay_identical_without_hang_and_equal_one_process_on_the_global_batch(tmp_path: Path) -> None:
    # One 2-process fit and one 1-process fit on the same global batches, with gradient accumulation and the
    # mixin's global loss normalization (per-rank counts differ, so "local" would not match).
    results = {}
    for processes in (1, 2):
        torch.manual_seed(0)
        model = MixinTokenModel(normalization="global")
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        directory = tmp_path / str(processes)
        directory.mkdir()
        distributed = DDP if processes == 2 else {}
        trainer = pl.Trainer(
            callbacks=[routing(), SaveRankState(directory)],
            **trainer_kwargs(directory, accumulate_grad_batches=2, **distributed),
        )
        trainer.fit(model, RoutedDataModule(token_columns(), batch_size=4 // processes, shard_global_batches=True))
        results[processes] = (rank_states(directory) if processes == 2 else [], trainer.callback_metrics, model)

    ranks, ddp_logged, _ = results[2]
    _, single_logged, single = results[1]
    # The masks really differed per rank: rank 0 saw forget tokens, rank 1 none (and did not hang).
    assert ranks[0]["label_totals"][1] > 0
    assert ranks[1]["label_totals"][1] == 0.0
    for name, param in single.named_parameters():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), f"{name} differs across ranks"
        assert not torch.equal(param.detach(), initial[name]), f"{name} did not train"
        torch.testing.assert_close(ranks[0]["params"][name], param.detach(), rtol=1e-5, atol=1e-6)
    for key in ("train/loss_retain", "train/loss_forget"):
        assert torch.isfinite(ddp_logged[key])
        torch.testing.assert_close(ddp_logged[key], single_logged[key], rtol=1e-5, atol=1e-6)
    # Gradient telemetry of the last batch: summed over ranks and averaged like DDP's gradients, it equals one
    # process's; the forget tokens send nothing into the blocked units.
    norms = {k: v for k, v in ddp_logged.items() if k.startswith("gradroute/grad_norm/code/")}
    assert len(norms) == 6 and norms["gradroute/grad_norm/code/forget/0:8"] == 0
    assert norms["gradroute/grad_norm/code/forget/8:12"] > 0 and norms["gradroute/grad_norm/code/retain/all"] > 0
    for key, value in norms.items():
        torch.testing.assert_close(value, single_logged[key], rtol=1e-5, atol=1e-9)
