"""``benchmarks/recipe_seeds.py``: a recipe and its control over seeds, resumable from committed runs, with paired
intervals (issue 21)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import recipe_seeds  # noqa: E402


def test_every_experiment_names_existing_recipes_and_reads_the_committed_seed_zero() -> None:
    for name, experiment in recipe_seeds.EXPERIMENTS.items():
        assert set(experiment.configs) == {"routed", "control"}, name
        assert all(path.is_file() for paths in experiment.configs.values() for path in paths), name
        if experiment.seed0:
            rows = recipe_seeds.summary(name, [0])
            assert [r["metric"] for r in rows] == list(experiment.metrics)
            assert all(r["difference"] == pytest.approx(r["routed"] - r["control"]) for r in rows)


def test_runs_skip_what_is_committed_commit_each_run_and_pair_by_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = recipe_seeds.Experiment(
        configs={"routed": [Path("r.yaml")], "control": [Path("c.yaml")]},
        metrics={"x": ("a value", lambda r: r["x"])},
        scale="tiny",
        default_seeds=(0, 1, 2),
    )
    monkeypatch.setitem(recipe_seeds.EXPERIMENTS, "fake", experiment)
    monkeypatch.setattr(recipe_seeds, "RESULTS", tmp_path / "results")
    done: set[Path] = set()
    trained: list[tuple[list[Path], int, list[str]]] = []

    def fake_fit(configs: list[Path], run_dir: Path, seed: int, extra: list[str]) -> dict[str, Any]:
        trained.append((configs, seed, extra))
        run_dir.mkdir(parents=True, exist_ok=True)
        # routed = control + 1 + seed / 10, so the paired difference has a spread
        x = seed * 2.0 + (1.0 + seed / 10 if configs[0].name == "r.yaml" else 0.0)
        (run_dir / "results.json").write_text(json.dumps({"x": x}))
        (run_dir / "seconds.json").write_text(json.dumps({"wall": 1.0, "cpu": 1.0}))
        return {"x": x}

    monkeypatch.setattr(recipe_seeds, "fit_cached", fake_fit)
    monkeypatch.setattr(recipe_seeds, "committed", lambda path: path in done)
    monkeypatch.setattr(recipe_seeds, "commit", lambda paths, message: done.update(paths))
    recipe_seeds.run("fake", "routed", 0, tmp_path / "runs", do_commit=True)
    recipe_seeds.main(["fake", "--runs-dir", str(tmp_path / "runs")])
    assert [(c[0].name, s) for c, s, _ in trained] == [("r.yaml", 0), ("c.yaml", 0), ("r.yaml", 1), ("c.yaml", 1),
                                                        ("r.yaml", 2), ("c.yaml", 2)]  # fmt: skip
    assert trained[0][2] == ["--data.init_args.seed=0"] and len(done) == 12  # results + seconds per run
    report = json.loads((tmp_path / "results" / "fake_seeds.json").read_text())
    (row,) = report["metrics"]
    assert report["seeds"] == [0, 1, 2] and row["routed_per_seed"] == [1.0, 3.1, 5.2]
    assert row["difference"] == pytest.approx(1.1) and row["difference_ci"] == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert "| x: a value |" in (tmp_path / "results" / "fake_seeds.md").read_text()
