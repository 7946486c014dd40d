"""Every test leaves the process as it found it: the ``gradroute`` CLI flushes denormal floats, and Lightning's
``seed_everything`` leaves ``PL_GLOBAL_SEED`` in the environment, from which processes spawned later reseed."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def restore_process_state() -> Iterator[None]:
    seed = os.environ.get("PL_GLOBAL_SEED")
    yield
    torch.set_flush_denormal(False)
    if seed is None:
        os.environ.pop("PL_GLOBAL_SEED", None)
    else:
        os.environ["PL_GLOBAL_SEED"] = seed
