"""The Lightning internals the library reads (``lightning_gradroute._compat``) still mean what they did, and the
core imports without the experiments' dependencies."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from lightning.pytorch.callbacks import EarlyStopping

from lightning_gradroute._compat import launched_by_multiprocessing, state_key


@pytest.mark.parametrize(
    ("strategy", "devices", "expected"),
    [("ddp_spawn", 2, True), ("ddp_fork", 2, True), ("ddp", 2, False), ("auto", 1, False)],
)
def test_launched_by_multiprocessing(tmp_path: Any, strategy: str, devices: int, expected: bool) -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, default_root_dir=tmp_path, logger=False)
    assert launched_by_multiprocessing(trainer) is expected


def test_state_key_is_lightnings_own_format() -> None:
    stopping = EarlyStopping("val/loss", mode="max")
    assert state_key(stopping, monitor="val/loss", mode="max") == stopping.state_key


EXTRAS = ("matplotlib", "mpl_toolkits", "pil", "pillow", "tensorboard", "transformers", "tokenizers", "datasets")


def test_the_core_needs_no_experiment_dependencies(tmp_path: Path) -> None:
    """``pip install lightning-gradroute`` is lean: plotting, TensorBoard and HF libraries are extras. A Python
    without ``site`` sees a copy of site-packages (symlinks) lacking them, and the core still works."""
    view = tmp_path / "site-packages"
    view.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name.split("-")[0].split(".")[0].lower() not in EXTRAS:
            (view / entry.name).symlink_to(entry)
    code = (
        "import importlib.util, torch, lightning_gradroute as gr\n"
        "assert importlib.util.find_spec('matplotlib') is None and importlib.util.find_spec('transformers') is None\n"
        "from lightning_gradroute import cli, evaluation, text_labels\n"
        "mlp = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))\n"
        "model = torch.nn.Sequential(mlp)\n"
        "gr.expand(model, [gr.Expansion('0', preset='linear_pair', add=2, up=('0',), down=('2',))])\n"
        "router = gr.GradientRouter({'h': gr.Target('0.0')}, [gr.Route('forget', 'h', {'expanded': 0.0})])\n"
        "with router.attached(model, gr.expansion_record(model).unit_groups), router.route(torch.tensor([1])):\n"
        "    model(torch.randn(1, 3)).sum().backward()\n"
        "gr.save_ablated(gr.contract(model), sys.argv[1])\n"
        "print('ok')\n"
    )
    project = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{view}{os.pathsep}{project}"}
    result = subprocess.run(
        [sys.executable, "-S", "-c", "import sys\n" + code, str(tmp_path / "ablated")],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_strategy_family_and_tensor_parallel_size(tmp_path: Path) -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    from lightning_gradroute._compat import strategy_family, tensor_parallel_size

    def family(**kwargs: Any) -> str:
        trainer = pl.Trainer(accelerator="cpu", default_root_dir=tmp_path, logger=False, **kwargs)
        return strategy_family(trainer.strategy)

    assert family(devices=1) == "single" and family(devices=2, strategy="ddp_spawn") == "ddp"
    parallel = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    assert family(devices=2, strategy=parallel) == "model_parallel" and tensor_parallel_size(parallel) == 2
    assert strategy_family(FSDPStrategy()) == "fsdp"
    assert strategy_family(DeepSpeedStrategy.__new__(DeepSpeedStrategy)) == "deepspeed"


def test_local_slice_of_a_sharded_parameter(tmp_path: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Shard, distribute_tensor

    from lightning_gradroute._compat import local_slice

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)])
        assert local_slice(sharded, 0) == (0, 6) and local_slice(sharded, 1) is None
        assert local_slice(torch.randn(6, 4), 0) is None
        with pytest.raises(ValueError, match=r"placements \(Partial\(sum\),\) cannot be routed per unit"):
            local_slice(distribute_tensor(torch.randn(6, 4), mesh, [Partial()]), 0)
    finally:
        dist.destroy_process_group()


def test_dump_weights_is_what_save_checkpoint_writes_with_weights_only(tmp_path: Path) -> None:
    import torch
    from helpers import RoutedDataModule, TinyClassifier, example_data, trainer_kwargs

    from lightning_gradroute._compat import dump_weights

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(TinyClassifier(), RoutedDataModule(example_data(4, [0, 1, 0, 1]), batch_size=2))
    trainer.save_checkpoint(tmp_path / "public.ckpt", weights_only=True)
    public, ours = torch.load(tmp_path / "public.ckpt", weights_only=False), dump_weights(trainer)
    assert ours.keys() == public.keys() and "optimizer_states" not in ours
    assert all(torch.equal(ours["state_dict"][k], v) for k, v in public["state_dict"].items())


def test_in_backward_and_function_mode_active_see_what_checkpointing_recomputation_sees() -> None:
    import torch
    from torch.overrides import TorchFunctionMode

    from lightning_gradroute._compat import function_mode_active, in_backward

    class Passing(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            return func(*args, **(kwargs or {}))

    mode, seen = Passing(), []
    x = torch.randn(3, requires_grad=True)
    with mode:
        assert function_mode_active(mode) and not in_backward()
        y = x * 2
        y.register_hook(lambda g: seen.append((in_backward(), function_mode_active(mode))))
        y.sum().backward()
    assert seen == [(True, False)]  # backward runs without the mode its caller had entered
    assert not function_mode_active(mode)
