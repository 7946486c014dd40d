"""The one place that touches framework internals; everything else uses public API.

Each function here names the private object it reads and has its own test (``tests/test_compat.py``), so a
Lightning or PyTorch release that moves it fails that test, not a user's run.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

__all__ = [
    "dump_weights",
    "function_mode_active",
    "in_backward",
    "launched_by_multiprocessing",
    "local_slice",
    "state_key",
    "strategy_family",
    "tensor_parallel_size",
]


def launched_by_multiprocessing(trainer: pl.Trainer) -> bool:
    """Whether ``trainer``'s strategy starts its processes with ``multiprocessing`` (``ddp_spawn``,
    ``ddp_fork``, ``ddp_notebook``), whose main process gets the trained weights back into its own, unchanged
    model object (so the model's shapes must not differ from the main process's when fit ends)."""
    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


def state_key(callback: pl.Callback, **kwargs: object) -> str:
    """A ``state_key`` derived from ``kwargs``, in the format of Lightning's own callbacks (its protected
    ``Callback._generate_state_key``: ``"ClassName{'arg': value}"``)."""
    return callback._generate_state_key(**kwargs)


def strategy_family(strategy: Strategy) -> str:
    """``"single"``, ``"ddp"``, ``"model_parallel"`` (FSDP2 / tensor parallel), ``"fsdp"`` (FSDP1),
    ``"deepspeed"`` or ``"other"``."""
    for family, kind in (("deepspeed", DeepSpeedStrategy), ("fsdp", FSDPStrategy), ("ddp", DDPStrategy),
                         ("model_parallel", ModelParallelStrategy), ("single", SingleDeviceStrategy)):  # fmt: skip
        if isinstance(strategy, kind):
            return family
    return "other"


def tensor_parallel_size(strategy: Strategy) -> int:
    """The tensor-parallel degree of a ``ModelParallelStrategy`` (its private ``_tensor_parallel_size``, which
    may still be ``"auto"`` before the device mesh exists: then read from the mesh, or 1 for one device)."""
    size = getattr(strategy, "_tensor_parallel_size", 1)
    if size == "auto":
        mesh = getattr(strategy, "_device_mesh", None)
        size = mesh["tensor_parallel"].size() if mesh is not None else 1
    return int(size)


def local_slice(param: Tensor, dim: int) -> tuple[int, int] | None:
    """For a ``DTensor`` parameter sharded on ``dim``, the ``[start, stop)`` of the global indices along ``dim``
    this rank holds (``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``); ``None`` when
    ``dim`` is not sharded here (or the parameter is a plain tensor).

    Raises:
        ValueError: a placement other than ``Shard`` or ``Replicate`` (e.g. ``Partial``).
    """
    if not isinstance(param, DTensor):
        return None
    if not all(isinstance(p, Shard) or p.is_replicate() for p in param.placements):
        raise ValueError(f"a parameter with placements {param.placements} cannot be routed per unit")
    if not any(isinstance(p, Shard) and p.dim == dim for p in param.placements):
        return None
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return offset[dim], offset[dim] + shape[dim]


def dump_weights(trainer: pl.Trainer) -> dict:
    """The weights-only checkpoint ``trainer.save_checkpoint(path, weights_only=True)`` writes, built on this rank
    alone (its private ``_checkpoint_connector.dump_checkpoint``): ``save_checkpoint`` adds a barrier, which would
    make the other ranks wait for rank-0-only work."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=True)


def in_backward() -> bool:
    """Whether this thread is running an autograd backward pass now (``torch._C._current_graph_task_id``, -1
    outside one): where activation checkpointing recomputes a forward."""
    return torch._C._current_graph_task_id() != -1


def function_mode_active(mode: object) -> bool:
    """Whether ``mode`` is on this thread's ``TorchFunctionMode`` stack now
    (``torch.overrides._get_current_function_mode_stack``). The autograd engine runs backward without the modes
    that were entered when backward was called."""
    return any(m is mode for m in torch.overrides._get_current_function_mode_stack())
