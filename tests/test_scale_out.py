"""Beyond DDP: FSDP2 (Lightning's ModelParallelStrategy) on 2 CPU processes equals one process, and the
strategies the callback cannot route exactly under are refused at setup with one line saying why."""

from __future__ import annotations

import os
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
    """Activation routing, parameter routing, an ERA expansion and RoutedSGD under FSDP2 (each rank holds half
    of every parameter), with different labels per rank, against one unsharded process on the same global
    batches; the contracted model is gathered and saved as full tensors with the original keys. Again with the
    sharded, routed pair under activation checkpointing."""
    env = {k: v for k, v in os.environ.items() if k != "PL_GLOBAL_SEED"}  # a seed left by an earlier test reseeds
    runs = {"1": ["--processes", "1"], "2": ["--processes", "2"], "2_ckpt": ["--processes", "2", "--checkpoint"]}
    for run, flags in runs.items():
        result = subprocess.run([sys.executable, str(SCRIPT), *flags, "--out", str(tmp_path / run)],
                                capture_output=True, text=True, timeout=360, env=env)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    single = load_file(tmp_path / "1" / "ablated" / "model.safetensors")
    assert sorted(single) == [
        "embed.weight", "head.bias", "head.weight", "mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight"
    ]  # fmt: skip
    for run in ("2", "2_ckpt"):  # sharded; sharded with the routed pair recomputed in backward
        sharded = load_file(tmp_path / run / "ablated" / "model.safetensors")
        assert sorted(sharded) == sorted(single)
        for name, value in single.items():
            where = f"{run} {name}"
            torch.testing.assert_close(sharded[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, w=where: f"{w}: {m}")


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


# Aten ops that make the host wait for an accelerator (value reads, data-dependent output sizes).
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique", "_unique2", "unique_dim"}


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_a_routed_step_after_the_first_makes_no_host_device_sync(monkeypatch: pytest.MonkeyPatch, soft: bool) -> None:
    """Run the steps as on an accelerator (the label checks' sync decision patched) and record every aten op of
    the second step: none of them may read a value on the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lightning_gradroute import GradientRouter
    from lightning_gradroute.labels import label_counts

    class RecordOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops.append(func._overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr("lightning_gradroute.labels.syncs_are_costly", lambda tensor: True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Linear(4, 6), torch.nn.GELU(), torch.nn.Linear(6, 3))
    router = GradientRouter(
        {"act": Target("2"), "w": ParameterTarget("1.weight"), "emb": ParameterTarget("0.weight", dim=0)},
        [Route("forget", "act", {"0:3": -0.5}), Route("forget", "w", {"3:": 0.0}), Route("forget", "emb", {":2": 0.0})],
    )

    def step(labels: torch.Tensor) -> None:
        with router.route(labels):
            model(torch.randint(0, 7, (2, 5))).pow(2).sum().backward()
        label_counts(router.current_labels if router.current_labels is not None else labels, 2)

    draw = (lambda: torch.rand(2, 5)) if soft else (lambda: torch.randint(0, 2, (2, 5)))
    with router.attached(model):
        step(draw())  # the first batch: full checks (clear errors), allowed to sync
        with RecordOps() as recorded:
            step(draw())
    assert recorded.ops and not SYNC_OPS.intersection(recorded.ops), sorted(SYNC_OPS.intersection(recorded.ops))


def test_device_side_label_checks_still_stop_bad_labels() -> None:
    from lightning_gradroute.labels import check_labels

    with pytest.raises(RuntimeError, match=r"routing labels must be valid indices 0..1"):
        check_labels(torch.tensor([0, 2]), ["retain", "forget"], full=False)  # on the CPU it raises at once
    with pytest.raises(RuntimeError, match=r"soft routing labels must lie in \[0, 1\]"):
        check_labels(torch.tensor([0.5, 1.5]), ["retain", "forget"], full=False)


def _sharded_adamw_step(rank: int, store_path: str, out_path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_gradroute import RoutedAdamW
    from lightning_gradroute.param_routing import RoutedParameter

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        full, grad = adamw_case()
        param = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        param.grad = distribute_tensor(grad, mesh, [Shard(0)])
        route = RoutedParameter(["retain", "forget"], "w", ParameterTarget("w"), "w", param, 0, torch.ones(2, 6))
        route.register()
        allowed = torch.tensor([True, False, True, True, False, False]) if rank == 0 else torch.zeros(6, dtype=bool)
        route.record(allowed, None)  # rank 1 saw no item allowed anywhere: the OR over ranks decides
        RoutedAdamW([param], lr=0.1, weight_decay=0.1).step()
        route.unregister()
        value = param.full_tensor()
        if rank == 0:
            torch.save(value, out_path)
    finally:
        dist.destroy_process_group()


def adamw_case() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)


@pytest.mark.timeout(120)
def test_routed_adamw_on_fsdp2_shards_equals_the_unsharded_step(tmp_path: Path) -> None:
    """Rows 0:3 live on rank 0, rows 3:6 on rank 1: the allowed units are OR-reduced, then cut to each shard."""
    import torch.multiprocessing as mp

    from lightning_gradroute import RoutedAdamW
    from lightning_gradroute.param_routing import RoutedParameter

    mp.spawn(_sharded_adamw_step, args=(str(tmp_path / "store"), str(tmp_path / "out.pt")), nprocs=2)
    full, grad = adamw_case()
    param = torch.nn.Parameter(full.clone())
    param.grad = grad.clone()
    route = RoutedParameter(["retain", "forget"], "w", ParameterTarget("w"), "w", param, 0, torch.ones(2, 6))
    route.register()
    try:
        route.record(torch.tensor([True, False, True, True, False, False]), None)
        RoutedAdamW([param], lr=0.1, weight_decay=0.1).step()
    finally:
        route.unregister()
    sharded = torch.load(tmp_path / "out.pt")
    assert torch.equal(sharded, param.detach())  # the same elementwise ops on the same values
    assert torch.equal(sharded[[1, 4, 5]], full[[1, 4, 5]]) and not torch.equal(sharded[[0, 2, 3]], full[[0, 2, 3]])
