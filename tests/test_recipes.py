"""Every YAML recipe under ``recipes/`` parses with the ``gradroute`` CLI, runs ``fast_dev_run`` on CPU from an
unrelated working directory, and leaves its final model where the README says, loadable.

A recipe that is an overlay names its base on a line ``# base: <file next to it or relative to recipes/>``; it is
composed as ``--config base --config overlay``. A recipe may add smoke-test-only arguments (for example a
smaller data source, so a paper-scale recipe runs offline) on lines ``# smoke-args: --data.init_args.x 1`` (split like
a shell command line: quote values with spaces).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import RECIPES, recipe_cli_args
from lightning.pytorch import LightningModule

from lightning_gradroute.cli import GradrouteCLI
from lightning_gradroute.era import hf_folders
from lightning_gradroute.export import SaveFinalModel

ALL_YAMLS = sorted(RECIPES.rglob("*.yaml"))
PROJECT_PACKAGES = ("lightning_gradroute", "gradroute_experiments")


def test_there_are_recipes() -> None:
    assert len(ALL_YAMLS) >= 2


def check_final_model(model: LightningModule, final: Path) -> None:
    """``final/model.ckpt`` loads into the recipe's module class with the trained weights; every HF model inside
    loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` from its folder and gives the trained module's logits."""
    loaded = type(model).load_from_checkpoint(final / "model.ckpt", map_location="cpu")
    trained = model.state_dict()
    assert loaded.state_dict().keys() == trained.keys()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0, msg=f"{key} differs in model.ckpt")
    for name, folder in hf_folders(model, final):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.eos_token is not None and tokenizer.pad_token == tokenizer.eos_token
        ids = tokenizer("Once upon a time there was", return_tensors="pt").input_ids
        hf_model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf_model(ids).logits, model.get_submodule(name).eval()(ids).logits)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", ALL_YAMLS, ids=[str(p.relative_to(RECIPES)) for p in ALL_YAMLS])
def test_recipe_parses_and_runs_fast_dev_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["gradroute"])  # LightningCLI warns when pytest's own argv is present
    work = tmp_path / "elsewhere"  # no recipe may read a path relative to the working directory
    work.mkdir()
    monkeypatch.chdir(work)
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
    cli = GradrouteCLI(args=["fit", *recipe_cli_args(path), *smoke])
    callbacks = cli.trainer.callbacks
    saver = next(cb for cb in callbacks if isinstance(cb, SaveFinalModel))
    # After every callback of the recipe (routing, evaluations), so it saves what they leave.
    ours = [i for i, cb in enumerate(callbacks) if type(cb).__module__.split(".")[0] in PROJECT_PACKAGES]
    assert callbacks.index(saver) == max(ours)
    assert saver.directory == tmp_path.resolve() / "final"
    check_final_model(cli.model, saver.directory)
