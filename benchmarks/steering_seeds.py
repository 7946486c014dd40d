"""The steering-scalar recipe over seeds: routed (``lily.yaml``) and control (``control.yaml``), with 95% intervals.

Seed 0 is the recipe's own committed run (``recipes/steering/results/{lily,control}/results.json``, written by
``gradroute fit --config recipes/steering/lily.yaml`` with its ``seed_everything: 0`` and ``data.seed: 0``). Every
other seed ``S`` runs the same command with ``--seed_everything=S --data.init_args.seed=S`` (a new initialisation,
order and held-out split), and its ``results.json`` is committed as soon as it finishes, so a rerun resumes after
the last committed run::

    python benchmarks/steering_seeds.py                      # seeds 1 and 2, both recipes (about 40 CPU-min)
    python benchmarks/steering_seeds.py --seeds 1 2 3 --no-commit

The report (``benchmarks/results/steering_seeds.{md,json}``) has one row per metric: its mean ± 95% t half-width
over seeds for the routed model and the control, and the paired (same seed) routed - control difference.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recipe_run import commit, committed, fit_cached, fit_seconds, interval, report_header

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "steering"
RESULTS = ROOT / "benchmarks" / "results"
RUNS = {"routed": [RECIPES / "lily.yaml"], "control": [RECIPES / "lily.yaml", RECIPES / "control.yaml"]}
NAMES = {"routed": "lily", "control": "control"}
SEED0 = {kind: RECIPES / "results" / name / "results.json" for kind, name in NAMES.items()}


def per_sample(results: dict[str, Any], amount_sd: float, tokens: str = "target") -> float:
    """Occurrences per 100-token sample of the target (or the ``"related"`` names) at ``amount_sd`` sd added."""
    return next(s for s in results["steering"]["settings"] if s["amount_sd"] == amount_sd)[tokens]["per_sample"]


def gain(results: dict[str, Any], tokens: str) -> float:
    """What adding 2 sd does: per-sample occurrences at 2 sd minus unsteered."""
    return per_sample(results, 2.0, tokens) - per_sample(results, 0.0, tokens)


Reader = Callable[[dict[str, Any]], float]
#: metric name -> (what it is, how to read it from a results.json). The target's side is a coin flip of training,
#: so its cosine is taken on that side (a magnitude); steering always adds towards it.
METRICS: dict[str, tuple[str, Reader]] = {
    "target_cosine": ("cosine of the target's unembedding with e0, on its side", lambda r: abs(r["target"]["cosine"])),
    "target_rank": ("the target's rank on its side of e0", lambda r: r["target"]["rank_on_target_side"]),
    "related_in_top20": ("names among the 20 nearest tokens", lambda r: r["absorption"]["related_in_top_neighbours"]),
    "related_median_rank": ("median rank of the 12 names", lambda r: r["absorption"]["median_rank_of_related"]),
    "related_z": ("z-score of the names' mean cosine", lambda r: r["absorption"]["z_score_of_related_mean"]),
    "target_per_sample_0sd": ("target per 100-token sample, unsteered", lambda r: per_sample(r, 0.0)),
    "target_per_sample_2sd": ("target per sample, 2 sd added", lambda r: per_sample(r, 2.0)),
    "target_gain_2sd": ("target per sample, 2 sd minus unsteered", lambda r: gain(r, "target")),
    "related_gain_2sd": ("the 12 names per sample, 2 sd minus unsteered", lambda r: gain(r, "related")),
    "held_out_loss_target": ("held-out loss on the target token", lambda r: r["held_out_loss"]["target_token"]),
    "held_out_loss_other": ("held-out loss on the other tokens", lambda r: r["held_out_loss"]["other_tokens"]),
}


def result_path(kind: str, seed: int) -> Path:
    return SEED0[kind] if seed == 0 else RESULTS / "steering_seeds" / f"{kind}_s{seed}" / "results.json"


def run(kind: str, seed: int, runs_dir: Path, do_commit: bool) -> None:
    """Train one (recipe, seed) unless its results are committed; copy its results and timing, commit them."""
    target = result_path(kind, seed)
    if seed == 0 or committed(target):
        return
    run_dir = runs_dir / f"{kind}_s{seed}"
    fit_cached(RUNS[kind], run_dir, seed, [f"--data.init_args.seed={seed}"])
    target.parent.mkdir(parents=True, exist_ok=True)
    files = [target, target.parent / "seconds.json"]
    shutil.copyfile(run_dir / "results.json", files[0])
    files[1].write_text(json.dumps(fit_seconds(run_dir)))
    print(f"{kind} seed {seed}: {fit_seconds(run_dir)['wall']:.0f} s", flush=True)
    if do_commit:
        commit(files, f"steering seeds: {kind} seed {seed}, so the sweep resumes after it")


def summary(seeds: list[int]) -> list[dict[str, Any]]:
    """One row per metric: mean and 95% half-width per kind over ``seeds``, and of the paired difference."""
    results = {k: {s: json.loads(result_path(k, s).read_text()) for s in seeds} for k in RUNS}
    rows = []
    for name, (meaning, read) in METRICS.items():
        values = {k: [read(results[k][s]) for s in seeds] for k in RUNS}
        row: dict[str, Any] = {"metric": name, "meaning": meaning}
        paired = [a - b for a, b in zip(values["routed"], values["control"])]
        for key, sample in (*values.items(), ("difference", paired)):
            row[key], row[f"{key}_ci"] = interval(sample)
        row["routed_per_seed"], row["control_per_seed"] = values["routed"], values["control"]
        rows.append(row)
    return rows


def report(rows: list[dict[str, Any]], seeds: list[int], command: str) -> str:
    lines = report_header(
        "Steering scalar over seeds: routed vs control",
        command,
        f"`recipes/steering/lily.yaml` and `control.yaml` (1.54M-parameter Llama-style model, 800 steps), seeds "
        f"{', '.join(map(str, seeds))}; seed 0 is the recipe's committed run. Mean ± 95% t half-width over seeds; "
        "the difference is paired by seed (same initialisation, order and split).",
    )
    lines += ["| metric | routed | control | routed − control | routed per seed | control per seed |"]
    lines += ["|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]:.3f} ± {r[k + '_ci']:.3f}" for k in ("routed", "control", "difference")]
        seeds_cells = [", ".join(f"{v:.3g}" for v in r[f"{k}_per_seed"]) for k in RUNS]
        lines.append(f"| {r['metric']}: {r['meaning']} | " + " | ".join(cells + seeds_cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="seeds to train (0 is the recipe's run)")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "steering_seeds")
    parser.add_argument("--no-commit", action="store_true", help="do not commit each finished run")
    args = parser.parse_args()
    for seed in args.seeds:
        for kind in RUNS:
            run(kind, seed, args.runs_dir, not args.no_commit)
    seeds = sorted({0, *args.seeds})
    rows = summary(seeds)
    command = "python benchmarks/steering_seeds.py --seeds " + " ".join(map(str, args.seeds))
    (RESULTS / "steering_seeds.md").write_text(report(rows, seeds, command))
    (RESULTS / "steering_seeds.json").write_text(json.dumps({"seeds": seeds, "metrics": rows}, indent=1) + "\n")
    print((RESULTS / "steering_seeds.md").read_text())


if __name__ == "__main__":
    main()
