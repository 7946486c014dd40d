"""Every test leaves the process as it found it: the ``gradroute`` CLI flushes denormal floats, and Lightning's
``seed_everything`` leaves ``PL_GLOBAL_SEED`` in the environment, from which processes spawned later reseed.

Every ``ddp_spawn`` worker ends cleanly: see :class:`helpers.EndCleanly`."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import torch.multiprocessing

from helpers import EndCleanly


@pytest.fixture(autouse=True)
def restore_process_state() -> Iterator[None]:
    seed = os.environ.get("PL_GLOBAL_SEED")
    yield
    torch.set_flush_denormal(False)
    if seed is None:
        os.environ.pop("PL_GLOBAL_SEED", None)
    else:
        os.environ["PL_GLOBAL_SEED"] = seed


@pytest.fixture(autouse=True)
def spawned_workers_end_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    start = torch.multiprocessing.start_processes  # what Lightning's ddp_spawn launcher calls

    def start_processes(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        return start(EndCleanly(fn), *args, **kwargs)

    monkeypatch.setattr(torch.multiprocessing, "start_processes", start_processes)
