"""Every YAML recipe under ``recipes/`` parses with the ``gradroute`` CLI and runs ``fast_dev_run`` on CPU.

A recipe that is an overlay names its base on a line ``# base: <file next to it or relative to recipes/>``; it is
composed as ``--config base --config overlay``. A recipe may add smoke-test-only arguments (for example a
smaller data source, so a paper-scale recipe runs offline) on lines ``# smoke-args: --data.init_args.x 1`` (split like
a shell command line: quote values with spaces).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import RECIPES, recipe_cli_args

from lightning_gradroute.cli import GradrouteCLI

ALL_YAMLS = sorted(RECIPES.rglob("*.yaml"))


def test_there_are_recipes() -> None:
    assert len(ALL_YAMLS) >= 2


@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", ALL_YAMLS, ids=[str(p.relative_to(RECIPES)) for p in ALL_YAMLS])
def test_recipe_parses_and_runs_fast_dev_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["gradroute"])  # LightningCLI warns when pytest's own argv is present
    smoke = [
        "--trainer.fast_dev_run=true",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        "--trainer.strategy=auto",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    # Parse first (catches YAML/type errors with jsonargparse's message), then run one train and val batch.
    cli = GradrouteCLI(args=[*recipe_cli_args(path), *smoke], run=False)
    assert cli.trainer.fast_dev_run
    GradrouteCLI(args=["fit", *recipe_cli_args(path), *smoke])
