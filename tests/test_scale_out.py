"""Beyond DDP: FSDP2 (Lightning's ModelParallelStrategy) on 2 CPU processes equals one process, and the
strategies the callback cannot route exactly under are refused at setup with one line saying why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyClassifier, trainer_kwargs
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from safetensors.torch import load_file

from lightning_gradroute import Expansion, GradientRoutingCallback, ParameterTarget, Route, Target

SCRIPT = Path(__file__).parent / "scripts" / "model_parallel_fit.py"


@pytest.mark.timeout(400)
def test_fsdp2_on_two_processes_equals_one_process_and_saves_full_ablated_weights(tmp_path: Path) -> None:
    """Activation routing, parameter routing, an ERA expansion and RoutedAdamW under FSDP2 (each rank holds half
    of every parameter), with different labels per rank, against one unsharded process on the same global
    batches; the contracted model is gathered and saved as full tensors with the original keys."""
    for processes in (1, 2):
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--processes", str(processes), "--out", str(tmp_path / str(processes))],
            capture_output=True, text=True, timeout=360,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    single = load_file(tmp_path / "1" / "ablated" / "model.safetensors")
    sharded = load_file(tmp_path / "2" / "ablated" / "model.safetensors")
    assert sorted(sharded) == sorted(single) == [
        "embed.weight", "head.bias", "head.weight", "mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight"
    ]  # fmt: skip
    for name, value in single.items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-5, atol=1e-6, msg=name)


def routing(parameters: bool = False, expansions: bool = False) -> GradientRoutingCallback:
    targets = {"code": Target("encoder")}
    routes = [Route("forget", "code", {"0:8": 0.0})]
    if parameters:
        targets["w"] = ParameterTarget("head.weight")
        routes.append(Route("forget", "w", 0.0))
    spec = [Expansion("encoder_pair", preset="linear_pair", add=2, up=("0",), down=("1",))] if expansions else []
    return GradientRoutingCallback(targets=targets, routes=routes, expansions=spec)


def test_tensor_parallelism_is_refused(tmp_path: Path) -> None:
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, devices=2, strategy=strategy))
    with pytest.raises(ValueError, match=r"ModelParallelStrategy with tensor parallelism shards activations and "
                                         r"weights across ranks, so unit indices would address local shards"):
        routing().setup(trainer, TinyClassifier(), "fit")


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        (FSDPStrategy(), r"parameter targets are not supported under FSDPStrategy: FSDPStrategy \(FSDP1\) flattens"),
        (DeepSpeedStrategy.__new__(DeepSpeedStrategy), r"under DeepSpeedStrategy: DeepSpeed ZeRO partitions"),
    ],
    ids=["fsdp1", "deepspeed"],
)
def test_parameter_routing_and_expansions_are_refused_where_untested(strategy: object, message: str) -> None:
    trainer = SimpleNamespace(strategy=strategy)
    with pytest.raises(ValueError, match=message + r".*use ModelParallelStrategy \(FSDP2"):
        routing(parameters=True)._check_strategy(trainer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expansions are not supported"):
        routing(expansions=True)._check_strategy(trainer)  # type: ignore[arg-type]
    routing()._check_strategy(trainer)  # type: ignore[arg-type]  # activation targets alone: any strategy
