"""Tune the TinyStories RMU baseline on a held-out split and report every setting (issue 21: RMU was inert).

Runs ``gradroute fit --config recipes/tinystories/base.yaml --config recipes/tinystories/rmu_tuning.yaml`` (plain
training, then :class:`~gradroute_experiments.tinystories.rmu_tuning.RMUTuning`'s grid on copies of the model) and
writes ``benchmarks/results/rmu_tuning.{md,json}``: each setting's forget and retain loss increase on the tuning
split (attack-pool forget stories, coherence-validation retain stories; not the comparison's test sets) and the
chosen setting, which ``recipes/tinystories/rmu.yaml`` then uses.

    python benchmarks/rmu_tuning.py                     # seed 0, about 30 CPU-min
    python benchmarks/rmu_tuning.py --render-only       # the report (and the choice) from the committed json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

from recipe_run import ROOT, commit, fit_timed, report_header

import yaml

from gradroute_experiments.tinystories.rmu_tuning import RULE, choose

RECIPES = [ROOT / "recipes" / "tinystories" / "base.yaml", ROOT / "recipes" / "tinystories" / "rmu_tuning.yaml"]
COMMAND = "python benchmarks/rmu_tuning.py"


def run(seed: int, run_dir: Path) -> dict[str, Any]:
    """Train and tune (unless ``run_dir`` holds the result); the tuning json with the run's seconds."""
    path = run_dir / "rmu_tuning.json"
    if not path.exists():
        cli_args = [arg for config in RECIPES for arg in ("--config", str(config))]
        cli_args += [f"--seed_everything={seed}", f"--data.init_args.seed={seed}", "--trainer.logger=false"]
        cli_args += [f"--trainer.default_root_dir={run_dir}"]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        seconds = fit_timed(cli_args, run_dir, env=env)
        tuning = json.loads(path.read_text())
        path.write_text(json.dumps({**tuning, "seed": seed, "seconds": seconds}, indent=2))
    return json.loads(path.read_text())


def report(tuning: dict[str, Any]) -> str:
    base, chosen = tuning["base"], tuning["chosen"]
    scale = (
        f"plain training as `recipes/tinystories/base.yaml` (seed {tuning['seed']}), then "
        f"{len(tuning['settings'])} RMU settings on copies of the trained model, "
        f"{tuning['seconds']['cpu'] / 60:.0f} CPU-min in all. Tuning split: {tuning['tuning_split']['forget']}; "
        f"{tuning['tuning_split']['retain']}. Base losses there: forget {base['forget']:.4f}, retain "
        f"{base['retain']:.4f}."
    )
    lines = [*report_header("TinyStories RMU tuning", COMMAND, scale)]
    if chosen is None:
        lines.append(f"No setting kept the retain increase within {tuning['retain_budget']} nats.")
    else:
        lines.append(
            f"Chosen ({RULE.format(budget=tuning['retain_budget'])}): "
            f"layer {chosen['layer']}, {chosen['steps']} steps, steering {chosen['steering_coef']:.1f}, alpha "
            f"{chosen['alpha']:g}, lr {chosen['lr']:g}: forget +{chosen['forget_increase']:.4f}, retain "
            f"{chosen['retain_increase']:+.4f} nats."
        )
    lines += [
        "",
        "Every setting, by forget increase (nats on the tuning split). 'Selectivity' is forget increase minus retain "
        "increase: RMU that damages forget and retain stories alike has none.",
        "",
        "| layer | steps | steering | alpha | lr | forget increase | retain increase | selectivity | forget MSE | "
        "retain MSE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(tuning["settings"], key=lambda r: -r["forget_increase"]):
        lines.append(
            f"| {row['layer']} | {row['steps']} | {row['steering_coef']:.1f} | {row['alpha']:g} | {row['lr']:g} | "
            f"{row['forget_increase']:+.4f} | {row['retain_increase']:+.4f} | "
            f"{row['forget_increase'] - row['retain_increase']:+.4f} | {row['final_forget_mse']:.3g} | "
            f"{row['final_retain_mse']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "rmu_tuning")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the report from <out>'s json")
    parser.add_argument("--no-commit", action="store_true", help="do not commit the results")
    args = parser.parse_args(argv)
    saved, table = args.out / "rmu_tuning.json", args.out / "rmu_tuning.md"
    if not args.render_only:
        tuning = run(args.seed, args.runs_dir / f"s{args.seed}")
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.runs_dir / f"s{args.seed}" / "rmu_tuning.json", saved)
    tuning = json.loads(saved.read_text())
    # The choice follows the recipe's budget and RMUTuning's rule (both may change after a grid ran; see its docs).
    budget = yaml.safe_load(RECIPES[1].read_text())["trainer"]["callbacks"][0]["init_args"]["retain_budget"]
    chosen = choose(tuning["settings"], budget)
    tuning |= {"retain_budget": budget, "rule": RULE.format(budget=budget), "chosen": chosen}
    saved.write_text(json.dumps(tuning, indent=2))
    table.write_text(report(tuning))
    print(table.read_text())
    if not args.no_commit and not args.render_only:
        commit([saved, table], "RMU tuning on the held-out split: every setting and the choice")


if __name__ == "__main__":
    main()
