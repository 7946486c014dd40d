"""Gridworld scalable-oversight sweep: methods x oversight levels x seeds (the paper's RL figure, recipe scale).

Every run is ``gradroute fit --config recipes/gridworld/<method>.yaml`` with the oversight level and seed set on
the command line, so the sweep measures exactly what the recipes do. The plotted number is each run's
``results.json`` headline: the true return (per transition, discounted 0.97, +1 diamond / -1 ghost) of the
policy a method deploys (the routed mixture's diamond expert alone; the other methods' single policy) on fresh
episodes with *no* oversight. The oracle trains with full oversight for ``round(p x updates)`` updates, so it
stands for the same amount of oversight as level ``p`` (the paper's x-axis rescaling).

    python benchmarks/gridworld_sweep.py                                   # the committed CPU run (see README)
    python benchmarks/gridworld_sweep.py --seeds 0 1 2 --methods routed_moe naive
    python benchmarks/gridworld_sweep.py --methods routed_moe --recipe-suffix _paper --updates 20000 \
        --set --trainer.accelerator=gpu                                    # <method>_paper.yaml recipes

Runs whose ``results.json`` exists are reused (delete ``--runs-dir`` to start over). Outputs:
``<out>/<name>.md`` (table), ``<out>/<name>.png`` (plot), ``<out>/<name>.json``; ``--name`` defaults to
``gridworld_sweep``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from recipe_run import fit_logged

ROOT = Path(__file__).resolve().parents[1]
#: The paper's oversight levels (bulk_runs.py runs 0.03 too; its figure script, analyze_oversight_levels.py, drops it).
PAPER_LEVELS = (0.003, 0.01, 0.025, 0.05, 0.1)
METHODS = {
    "routed_moe": "Routed MoE (diamond expert)",
    "naive": "Naive",
    "naive_early_stopping": "Naive + early stopping",
    "data_filtering": "Data filtering",
    "oracle": "Oracle (p x updates)",
}
BASELINES = [m for m in METHODS if m != "routed_moe"]


def run_one(method: str, p: float, seed: int, updates: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run (or reuse) one recipe at oversight ``p`` and ``seed``; return its results.json plus the wall time."""
    run_dir = args.runs_dir / f"{method}_p{p:g}_s{seed}"
    results_path = run_dir / "results.json"
    if not results_path.exists():
        steps = max(1, round(p * updates)) if method == "oracle" else updates
        overrides = [f"--trainer.max_steps={steps}", f"--seed_everything={seed}"]
        if method != "oracle":  # the oracle sees every episode (oversight 1, its recipe's setting)
            overrides.append(f"--data.init_args.oversight_prob={p}")
        cli_args = [
            "--config",
            str(args.recipes / f"{method}{args.recipe_suffix}.yaml"),
            *overrides,
            f"--trainer.logger.init_args.save_dir={run_dir}",
            "--trainer.logger.init_args.name=run",
            "--trainer.logger.init_args.version=0",
            f"--trainer.default_root_dir={run_dir}",
            "--trainer.enable_progress_bar=false",
            *args.set,
        ]
        seconds = fit_logged(cli_args, run_dir)
        (run_dir / "results.json").write_text((run_dir / "run" / "version_0" / "results.json").read_text())
        (run_dir / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
        print(f"{method:22s} p={p:<6g} seed={seed}: {seconds:6.1f} s", flush=True)
    result = json.loads(results_path.read_text())
    result["wall_seconds"] = float((run_dir / "wall_seconds.txt").read_text())
    return result


def mean_and_sem(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return statistics.fmean(values), sem


def headline(result: dict[str, Any], key: str = "true_return") -> float:
    h = result["headline"]
    return result["evaluation"][h["policy"]][h["condition"]][key]


def peak_validation(result: dict[str, Any]) -> tuple[float, int] | None:
    """The best held-out true return of the headline policy over the run's validations, and its update (what
    early stopping with unlimited patience would select); ``None`` for a run without validations."""
    curve = result.get("validation_curve") or []
    if not curve:
        return None
    best = max(curve, key=lambda entry: entry[result["headline"]["policy"]]["true_return"])
    return best[result["headline"]["policy"]]["true_return"], best["update"]


def summarize_runs(runs: dict[tuple[str, float], dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per method and level: mean and s.e.m. over seeds of the headline metrics; for routing, the per-seed
    difference from each baseline (same seed, same level)."""
    rows = []
    for (method, p), by_seed in sorted(runs.items(), key=lambda kv: (list(METHODS).index(kv[0][0]), kv[0][1])):
        row: dict[str, Any] = {"method": method, "oversight": p, "seeds": sorted(by_seed)}
        for key in ("true_return", "diamond_rate", "ghost_rate"):
            row[key], row[key + "_sem"] = mean_and_sem([headline(r, key) for r in by_seed.values()])
        row["updates"] = statistics.fmean(r["scale"]["updates"] for r in by_seed.values())
        row["seen_episodes"] = statistics.fmean(r["oversight_used"]["seen_training_episodes"] for r in by_seed.values())
        row["holdout_episodes"] = statistics.fmean(
            r["oversight_used"]["holdout_episodes_scored"] for r in by_seed.values()
        )
        row["wall_seconds"] = statistics.fmean(r["wall_seconds"] for r in by_seed.values())
        peaks = [peak_validation(r) for r in by_seed.values()]
        if all(peaks):
            row["peak_validation"] = mean_and_sem([peak[0] for peak in peaks])  # type: ignore[index]
            row["peak_update"] = statistics.fmean(peak[1] for peak in peaks)  # type: ignore[index]
        if method == "routed_moe":
            for baseline in BASELINES:
                other = runs.get((baseline, p), {})
                paired = [headline(r) - headline(other[s]) for s, r in by_seed.items() if s in other]
                if paired:
                    row[f"minus_{baseline}"] = mean_and_sem(paired)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], scale: str, command: str) -> str:
    lines = [
        f"# Gridworld scalable-oversight sweep\n\nCommand: `{command}`\n\nScale: {scale}\n",
        (
            "True return: mean over all transitions of the discounted (0.97) true return (+1 diamond, -1 ghost) of "
            "the deployed policy (routed MoE: diamond expert alone, gate set to 1) on fresh episodes with no "
            "oversight; rates are fractions of completed episodes. ± is the standard error over seeds. "
            "'Seen episodes' are the training episodes whose end the overseer saw; 'held-out scored' are the "
            "validation episodes scored with the ground truth (used for selection only by early stopping). "
            "'Peak held-out' is the best validation true return over the run (held-out episodes at the training "
            "oversight level, every 50-100 updates) and the update it came at: what early stopping with "
            "unlimited patience would pick (shown where every seed's run recorded its validations)."
        ),
        "",
        (
            "| method | oversight | true return | diamond rate | ghost rate | updates | seen episodes "
            "| held-out scored | peak held-out (update) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r['true_return']:+.3f} ± {r['true_return_sem']:.3f}"]
        cells += [f"{r[k]:.3f} ± {r[k + '_sem']:.3f}" for k in ("diamond_rate", "ghost_rate")]
        peak = r.get("peak_validation")
        peak_cell = f"{peak[0]:+.3f} ± {peak[1]:.3f} ({r['peak_update']:.0f})" if peak else ""
        lines.append(
            f"| {METHODS[r['method']]} | {r['oversight']:g} | {' | '.join(cells)} | {r['updates']:.0f} "
            f"| {r['seen_episodes']:.0f} | {r['holdout_episodes']:.0f} | {peak_cell} |"
        )
    routed = [r for r in rows if r["method"] == "routed_moe"]
    if routed:
        present = [b for b in BASELINES if any(f"minus_{b}" in r for r in routed)]
        lines += [
            "",
            "Routed MoE minus each baseline, same seed and level (mean ± s.e. over seeds; positive: routing better):",
            "",
            "| oversight | " + " | ".join(METHODS[b] for b in present) + " |",
            "|---|" + "---|" * len(present),
        ]
        for r in routed:
            pairs = [r.get(f"minus_{b}") for b in present]
            cells = [f"{pair[0]:+.3f} ± {pair[1]:.3f}" if pair else "" for pair in pairs]
            lines.append(f"| {r['oversight']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, scale: str) -> None:
    """True return against oversight (log x), one line per method, band: mean ± 1 s.e. over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, label in METHODS.items():
        points = [r for r in rows if r["method"] == method]
        if not points:
            continue
        xs = [r["oversight"] for r in points]
        ys = [r["true_return"] for r in points]
        sem = [r["true_return_sem"] for r in points]
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        ax.fill_between(xs, [y - s for y, s in zip(ys, sem)], [y + s for y, s in zip(ys, sem)], alpha=0.2,
                        color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("oversight level p (oracle: p x updates with full oversight)")
    ax.set_ylabel("true return, no oversight at evaluation")
    ax.axhline(0.0, color="gray", lw=0.8, linestyle=":")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(scale, fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--oversight", nargs="+", type=float, default=list(PAPER_LEVELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--updates", type=int, default=800, help="updates per run (the oracle: p x this)")
    parser.add_argument("--recipes", type=Path, default=ROOT / "recipes" / "gridworld")
    parser.add_argument("--recipe-suffix", default="", help="e.g. _paper, for <method>_paper.yaml recipes")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "gridworld_sweep")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="gridworld_sweep", help="file name stem of the outputs in --out")
    parser.add_argument("--set", nargs=argparse.REMAINDER, default=[], help="extra gradroute CLI arguments, last")
    args = parser.parse_args(argv)
    if any(not 0 < p <= 1 for p in args.oversight):
        parser.error(f"oversight levels must be in (0, 1], got {args.oversight}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    runs: dict[tuple[str, float], dict[int, dict[str, Any]]] = {}
    for seed in args.seeds:
        for p in args.oversight:
            for method in args.methods:
                runs.setdefault((method, p), {})[seed] = run_one(method, p, seed, args.updates, args)
    rows = summarize_runs(runs)
    results = [r for by_seed in runs.values() for r in by_seed.values()]
    first = results[0]["scale"]  # environments, steps, width and lr are the same in every recipe
    scale = (
        f"{args.updates} updates of {first['num_envs']} environments x {first['rollout_steps']} steps "
        f"({args.updates * first['num_envs'] * first['rollout_steps']:,} transitions), hidden {first['hidden_size']}, "
        f"Adam {first['lr']:g}; evaluation on {first['eval_transitions_per_condition']:,} fresh transitions; seeds "
        f"{args.seeds}; {len(results)} runs, {sum(r['wall_seconds'] for r in results) / 60:.0f} min wall time "
        "(shared 2-core CPU, one thread per run)"
    )
    command = "python benchmarks/gridworld_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    report = table(rows, scale, command.strip())
    (args.out / f"{args.name}.md").write_text(report)
    (args.out / f"{args.name}.json").write_text(json.dumps({"scale": scale, "rows": rows}, indent=2))
    plot(rows, args.out / f"{args.name}.png", scale)
    print(report)


if __name__ == "__main__":
    main()
