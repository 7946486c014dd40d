"""``gradroute`` config errors read like the library's: one line with the YAML key path and the culprit, a hint, exit
code 2 (each case printed 46-126 lines before, the culprit after line 26-73); ``--help`` and ``--print_config`` are
LightningCLI's, and ``JSONARGPARSE_DEBUG=true`` shows jsonargparse's full report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import RECIPES

from lightning_gradroute.cli import ConfigError, main

TOY = RECIPES / "toy" / "split.yaml"
ERA = RECIPES / "tinystories" / "era.yaml"
HINT = "hint: 'gradroute fit --help' lists the options; JSONARGPARSE_DEBUG=true shows the full report"


def broken(tmp_path: Path, recipe: Path, old: str, new: str) -> str:
    """A copy of ``recipe`` with ``old`` replaced by ``new``."""
    text = recipe.read_text()
    assert old in text
    path = tmp_path / recipe.name
    path.write_text(text.replace(old, new))
    return str(path)


CASES = {
    "misspelt-target-key": (
        lambda tmp: ["--config", broken(tmp, TOY, "{modules: net.0}", "{modlues: net.0}")],
        "trainer.callbacks[0].init_args.targets.hidden.modlues: Target does not accept 'modlues'; did you mean "
        "'modules'?",
    ),
    "bad-units": (
        lambda tmp: ["--config", broken(tmp, TOY, "{modules: net.0}", '{modules: net.0, units: "0:x"}')],
        "trainer.callbacks[0].init_args.targets.hidden: Target 'net.0': units '0:x' are not 'all', 'expanded', "
        "'original', a slice like '0:16' or a list like '0,3'",
    ),
    "units-of-a-wrong-type": (
        lambda tmp: ["--config", broken(tmp, TOY, "{modules: net.0}", "{modules: net.0, units: 3.5}")],
        "trainer.callbacks[0].init_args.targets.hidden.units: got 3.5, expected one of str, int, ",
    ),
    "route-to-no-target": (
        lambda tmp: ["--config", broken(tmp, TOY, "{label: forget, target: hidden,", "{label: forget, target: hiden,")],
        "trainer.callbacks[0].init_args: Route 'forget' -> 'hiden': unknown target; targets are ['hidden']",
    ),
    "unknown-preset": (
        lambda tmp: ["--config", broken(tmp, ERA, "preset: gpt_neo_mlp", "preset: gpt_neo_mpl")],
        "trainer.callbacks[0].init_args.expansions[0]: Expansion 'model.transformer.h.*.mlp': unknown preset "
        "'gpt_neo_mpl'; presets are ['gpt2_attn', ",
    ),
    "missing-data-file": (
        lambda tmp: ["--config", str(TOY), "--data", str(tmp / "data.yaml")],
        "data: file '{tmp}/data.yaml' does not exist (nor is it a class path)",
    ),
    "misspelt-class": (
        lambda tmp: ["--config", broken(tmp, TOY, "toy.TwoTaskRegressor", "toy.TwoTaskRegresor")],
        "model: module 'gradroute_experiments.toy' has no attribute 'TwoTaskRegresor'",
    ),
    "not-an-int": (lambda tmp: ["--config", str(TOY), "--trainer.max_epochs", "x"], "trainer.max_epochs: got x, "),
    "pattern-matching-nothing": (  # raised in the callback's setup, during fit
        lambda tmp: ["--config", broken(tmp, TOY, "{modules: net.0}", "{modules: net.9}"), "--trainer.logger", "false"],
        "target 'hidden': pattern 'net.9' matches no module of TwoTaskRegressor; closest names: net.2, ",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_config_error_is_one_line_naming_the_key_and_the_culprit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    monkeypatch.chdir(tmp_path)
    args, culprit = CASES[case]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args(tmp_path), "--trainer.fast_dev_run", "true", "--final_model.enabled", "false"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-2].startswith("gradroute fit: " + culprit.format(tmp=tmp_path)), lines[-2]
    assert lines[-1] == HINT
    assert len(lines) <= 4 or case == "pattern-matching-nothing"  # that one follows the Trainer's own log lines


def test_jsonargparse_debug_shows_the_full_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JSONARGPARSE_DEBUG", "true")
    args, _ = CASES["misspelt-target-key"]
    with pytest.raises(ConfigError) as error:
        main(["fit", *args(tmp_path)])
    assert "Option 'modlues' is not accepted" in str(error.value.__cause__)


def test_help_and_print_config_are_lightning_clis(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: ") and "--trainer.callbacks CALLBACKS" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(TOY), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert exit_info.value.code == 0
    assert printed["trainer"]["callbacks"][0]["init_args"]["targets"]["hidden"]["modules"] == "net.0"


@pytest.mark.timeout(120)
def test_the_console_script_prints_the_line_and_exits_2(tmp_path: Path) -> None:
    args, culprit = CASES["route-to-no-target"]
    project = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(project), str(project / "experiments")])}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_gradroute.cli", "fit", *args(tmp_path)],
        capture_output=True, text=True, timeout=110, env=env, cwd=tmp_path,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) <= 4, result.stderr[-3000:]
    assert lines[-2] == "gradroute fit: " + culprit
