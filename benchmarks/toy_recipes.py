"""The toy two-task recipes, routed and control, over seeds: the top-level README's toy table.

    python benchmarks/toy_recipes.py     # seeds 0 1 2, about 10 s of CPU per run; writes results/toy_recipes.{md,json}

Each run is ``gradroute fit --config recipes/toy/<split|control>.yaml --seed_everything S`` (cached by its
``results.json`` under ``runs/toy_recipes/``); the report gives each task's validation MSE after zeroing one half
of the routed hidden layer, mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from recipe_run import ROOT, fit_cached, fit_seconds, report_header, summarise

RECIPES = {"split": "routed (`split.yaml`)", "control": "control (`control.yaml`)"}
ZEROED = {
    "val_mse_without_retain_units": "zero units 0:32 (retain's)",
    "val_mse_without_forget_units": "zero units 32:64 (forget's)",
}
TASKS = ("retain", "forget")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "toy_recipes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "toy_recipes")
    args = parser.parse_args()
    recipe = lambda name: [ROOT / "recipes" / "toy" / f"{name}.yaml"]
    runs = {name: [fit_cached(recipe(name), args.runs_dir / f"{name}_s{s}", s) for s in args.seeds] for name in RECIPES}
    cpu = [fit_seconds(args.runs_dir / f"{name}_s{s}")["cpu"] for name in RECIPES for s in args.seeds]
    header = "| run | " + " | ".join(f"{label} → {task}" for label in ZEROED.values() for task in TASKS) + " |"
    lines = [
        *report_header(
            "Toy two-task recipes",
            f"python benchmarks/toy_recipes.py --seeds {' '.join(map(str, args.seeds))}",
            f"recipes/toy (6 epochs), seeds {args.seeds}; {min(cpu):.0f}-{max(cpu):.0f} s of CPU time per run",
        ),
        "Validation MSE of each task after zeroing one half of the routed hidden layer, per seed and mean ± std "
        "over seeds (the seed draws the initialisation and the batch order; the data is the same).",
        "",
        header,
        "|" + "---|" * (1 + 2 * len(ZEROED)),
    ]
    for name, label in RECIPES.items():
        values = [[r[key][task] for r in runs[name]] for key in ZEROED for task in TASKS]
        for i, seed in enumerate(args.seeds):
            lines.append(f"| {label}, seed {seed} | " + " | ".join(f"{v[i]:.2f}" for v in values) + " |")
        cells = " | ".join("{:.2f} ± {:.2f}".format(*summarise(v)) for v in values)
        lines.append(f"| {label}, mean ± std | {cells} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"seeds": args.seeds, "runs": runs}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
