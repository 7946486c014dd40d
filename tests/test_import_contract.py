"""The import contract of the two packages (``[tool.importlinter]`` in ``pyproject.toml``): the core
(``lightning_gradroute``) never imports the experiments (``gradroute_experiments``), every experiment stands on the
experiments' shared layer, and no experiment imports another. Checked with import-linter, on the real packages and
on a small tree that breaks each rule (so the check itself is shown to fail where it must)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(config: Path, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(config)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_packages_keep_the_contract(tmp_path: Path) -> None:
    result = lint_imports(ROOT / "pyproject.toml", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_the_layers_list_every_module_of_the_experiments_package() -> None:
    """Exhaustive layers: every top-level module or package of ``gradroute_experiments`` is in one layer."""
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][1]
    listed = {name.strip() for layer in contract["layers"] for name in layer.split("|")}
    package = ROOT / "experiments" / "gradroute_experiments"
    present = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    present |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert listed == present


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


CORE, LAYERS = "The core never imports the experiments", "Experiments stand on the shared layer"


@pytest.mark.parametrize(
    ("broken", "files"),
    [
        (CORE, {"lightning_gradroute/router.py": "import gradroute_experiments.mnist\n"}),
        (LAYERS, {"gradroute_experiments/two_language/data.py": "from gradroute_experiments.tinystories import x\n"}),
        (LAYERS, {"gradroute_experiments/text/web_text.py": "import gradroute_experiments.tinystories\n"}),
        (None, {"gradroute_experiments/tinystories/data.py": "import gradroute_experiments.datafiles\n"}),
    ],
    ids=["core imports an experiment", "experiment imports an experiment", "shared imports an experiment", "allowed"],
)
def test_the_contract_fails_on_each_kind_of_offence(tmp_path: Path, broken: str | None, files: dict[str, str]) -> None:
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][1]
    modules = [name.strip() for layer in contract["layers"] for name in layer.split("|")]
    tree = {"lightning_gradroute/__init__.py": "", "lightning_gradroute/router.py": "",
            "gradroute_experiments/__init__.py": ""}  # fmt: skip
    for name in modules:  # every listed module exists, as a package (so that sub-modules can be written)
        tree[f"gradroute_experiments/{name}/__init__.py"] = ""
    for name, text in files.items():
        module = name.removeprefix("gradroute_experiments/").removesuffix(".py")
        if "/" not in module and name.startswith("gradroute_experiments/"):  # a module file replaces its package
            del tree[f"gradroute_experiments/{module}/__init__.py"]
            tree[f"gradroute_experiments/{module}/__init__.py"] = text
        else:
            tree[name] = text
    _write(tmp_path / "src", tree)
    result = lint_imports(ROOT / "pyproject.toml", tmp_path, pythonpath=tmp_path / "src")
    report = " ".join(result.stdout.split())
    if broken is None:
        assert result.returncode == 0 and "2 kept, 0 broken" in report, report
    else:
        assert result.returncode != 0 and "1 kept, 1 broken" in report and f"{broken}" in report.split("Broken")[-1]
