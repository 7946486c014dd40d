"""The SLURM launch example: its ``srun`` line, with the sizes SLURM exports, builds a Trainer whose cluster
environment is SLURM's and whose world is every task of the job, for every paper-scale recipe."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import RECIPES, recipe_cli_args
from lightning.fabric.plugins.environments import SLURMEnvironment

from lightning_gradroute.cli import GradrouteCLI

SBATCH = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "gradroute.sbatch"
PAPER_RECIPES = sorted(RECIPES.rglob("*paper*.yaml"))
JOB = {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NTASKS": "8", "SLURM_JOB_NAME": "gradroute",
       "SLURM_JOB_ID": "1234", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
       "SLURM_NODELIST": "node[1-2]"}  # fmt: skip


def srun_arguments() -> list[str]:
    """The ``gradroute fit`` arguments of the script's srun line, with SLURM's variables substituted."""
    text = SBATCH.read_text()
    line = re.search(r"^srun gradroute (fit .*?)\"\$@\"$", text.replace("\\\n", " "), flags=re.M | re.S)
    assert line is not None, "the script has no `srun gradroute fit ... \"$@\"` line"
    words = shlex.split(line.group(1))[1:]
    assert words[:2] == ["--config", "$config"]
    words = words[2:]  # the recipe comes separately
    return [re.sub(r"\$(\w+)", lambda m: JOB[m.group(1)], w) for w in words]


def test_the_script_is_valid_bash_and_requeues_before_the_time_limit() -> None:
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True).returncode == 0
    assert "#SBATCH --signal=SIGUSR1@" in SBATCH.read_text() and "#SBATCH --requeue" in SBATCH.read_text()


@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=[str(p.relative_to(RECIPES)) for p in PAPER_RECIPES])
def test_paper_recipes_build_a_slurm_trainer_over_every_task(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in JOB.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["gradroute"])
    pairs = dict(zip(srun_arguments()[::2], srun_arguments()[1::2]))
    assert pairs["--trainer.accelerator"] == "gpu"
    pairs["--trainer.accelerator"] = "cpu"  # no GPU here; everything else as on the cluster
    flags = [f"{flag}={value}" for flag, value in pairs.items()]
    cli = GradrouteCLI(args=[*recipe_cli_args(recipe), *flags, f"--trainer.default_root_dir={tmp_path}"], run=False)
    environment = cli.trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment)
    assert (cli.trainer.world_size, cli.trainer.num_nodes, cli.trainer.global_rank) == (8, 2, 5)
