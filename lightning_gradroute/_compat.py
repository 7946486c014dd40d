"""The one place that touches Lightning internals; everything else uses public API.

Each function here names the private object it reads and has its own test (``tests/test_compat.py``), so a
Lightning release that moves it fails that test, not a user's run.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

__all__ = ["launched_by_multiprocessing"]


def launched_by_multiprocessing(trainer: pl.Trainer) -> bool:
    """Whether ``trainer``'s strategy starts its processes with ``multiprocessing`` (``ddp_spawn``,
    ``ddp_fork``, ``ddp_notebook``), whose main process gets the trained weights back into its own, unchanged
    model object (so the model's shapes must not differ from the main process's when fit ends)."""
    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)
