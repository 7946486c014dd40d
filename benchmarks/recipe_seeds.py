"""A recipe and its unrouted control over seeds, with 95% intervals and paired (same seed) differences.

One entry of ``EXPERIMENTS`` per experiment: its routed and control recipes, the metrics read from each run's
``results.json`` and, where a recipe's own committed run is seed 0, where that run's results are. Every other seed
``S`` runs the recipe with ``--seed_everything=S --data.init_args.seed=S`` (a new initialisation, order and
held-out split); each run's ``results.json`` is committed as soon as it finishes, so a rerun resumes after the
last committed run::

    python benchmarks/recipe_seeds.py steering                         # seeds 1, 2 (0 is the recipe's run), ~40 min
    python benchmarks/recipe_seeds.py token_unlearning_held_out        # seeds 0, 1, ~60 CPU-min
    python benchmarks/recipe_seeds.py steering --seeds 1 2 3 --no-commit

The report, ``benchmarks/results/<experiment>_seeds.{md,json}``, has one row per metric: its mean ± 95% t
half-width over seeds for the routed run and the control, the paired routed − control difference, and the
per-seed values; the runs are under ``benchmarks/results/<experiment>_seeds/<kind>_s<seed>/``. Adding an
experiment is adding an entry.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe_run import commit, committed, fit_cached, fit_seconds, interval, report_header

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RESULTS = ROOT / "benchmarks" / "results"
Reader = Callable[[dict[str, Any]], float]


@dataclass(frozen=True)
class Experiment:
    """A routed recipe and its control, what to read from their results and what the report says of them."""

    configs: dict[str, list[Path]]  # "routed" / "control": the --config files, in order
    metrics: dict[str, tuple[str, Reader]]  # name: (what it is, how to read it from a results.json)
    scale: str
    default_seeds: tuple[int, ...]
    seed0: dict[str, Path] | None = None  # kind: the committed results.json of the recipe's own seed-0 run


# ------------------------------------------------------------------------------------------------ steering
def per_sample(results: dict[str, Any], amount_sd: float, tokens: str = "target") -> float:
    """Occurrences per 100-token sample of the target (or the ``"related"`` names) at ``amount_sd`` sd added."""
    return next(s for s in results["steering"]["settings"] if s["amount_sd"] == amount_sd)[tokens]["per_sample"]


def gain(results: dict[str, Any], tokens: str) -> float:
    """What adding 2 sd does: per-sample occurrences at 2 sd minus unsteered."""
    return per_sample(results, 2.0, tokens) - per_sample(results, 0.0, tokens)


STEERING = RECIPES / "steering"
#: The target's side of e0 is a coin flip of training, so its cosine is taken on that side (a magnitude);
#: steering always adds towards it.
STEERING_METRICS: dict[str, tuple[str, Reader]] = {
    "target_cosine": ("the target's unembedding's cosine with e0, its side", lambda r: abs(r["target"]["cosine"])),
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


# -------------------------------------------------------------------------------------- token unlearning
def rise(stage: str, loss: str) -> Reader:
    """``loss``'s increase over the run's own base at ``stage`` (``results.json: absorption``); ``"held_out"`` is
    the held-out concept tokens' increase minus the other forget-story tokens' (``held_out_minus_other``)."""
    key = "held_out_minus_other" if loss == "held_out" else f"{loss}_increase"
    return lambda r: r["absorption"][stage][key]


TOKENS = RECIPES / "token_unlearning"
TOKEN_METRICS: dict[str, tuple[str, Reader]] = {
    "routed_after_ablation": ("routed tokens' loss increase, after ablation", rise("post_ablation", "forget_routed")),
    "held_out_after_ablation": ("held-out concept tokens, after ablation", rise("post_ablation", "forget_held_out")),
    "other_after_ablation": ("other forget-story tokens, after ablation", rise("post_ablation", "forget_other")),
    "retain_after_ablation": ("retain stories' increase, after ablation", rise("post_ablation", "retain")),
    "absorption_after_ablation": ("held-out minus other, after ablation", rise("post_ablation", "held_out")),
    "routed_final": ("routed tokens' increase, after the coherence fine-tune", rise("final", "forget_routed")),
    "held_out_final": ("held-out concept tokens' increase, after coherence", rise("final", "forget_held_out")),
    "absorption_final": ("held-out minus other, after the coherence fine-tune", rise("final", "held_out")),
    "absorption_retrained": ("held-out minus other, symmetric retraining", rise("retrained_symmetric", "held_out")),
    "routed_base_loss": ("routed tokens' base loss (routing's price)", lambda r: r["base"]["forget_routed"]),
    "held_out_base_loss": ("held-out concept tokens' base loss", lambda r: r["base"]["forget_held_out"]),
}  # fmt: skip

EXPERIMENTS: dict[str, Experiment] = {
    "steering": Experiment(
        configs={"routed": [STEERING / "lily.yaml"], "control": [STEERING / "lily.yaml", STEERING / "control.yaml"]},
        metrics=STEERING_METRICS,
        scale="`recipes/steering/lily.yaml` and `control.yaml` (1.54M-parameter Llama-style model, 800 steps); seed "
        "0 is the recipe's committed run (`recipes/steering/results/`)",
        default_seeds=(1, 2),
        seed0={k: STEERING / "results" / n / "results.json" for k, n in (("routed", "lily"), ("control", "control"))},
    ),
    "token_unlearning_held_out": Experiment(
        configs={
            "routed": [TOKENS / "food.yaml", TOKENS / "held_out.yaml"],
            "control": [TOKENS / "food.yaml", TOKENS / "control.yaml", TOKENS / "held_out.yaml"],
        },
        metrics=TOKEN_METRICS,
        scale="`recipes/token_unlearning/food.yaml` + `held_out.yaml` (10 of the 20 concept tokens routed, ranks 2, "
        "4, ..., 20 held out) and the same with `control.yaml` (1.25M-parameter Qwen2-style model, 800 steps)",
        default_seeds=(0, 1),
    ),
}


# ------------------------------------------------------------------------------------------------ running
def result_path(name: str, kind: str, seed: int) -> Path:
    seed0 = EXPERIMENTS[name].seed0
    if seed == 0 and seed0 is not None:
        return seed0[kind]
    return RESULTS / f"{name}_seeds" / f"{kind}_s{seed}" / "results.json"


def run(name: str, kind: str, seed: int, runs_dir: Path, do_commit: bool) -> None:
    """Train one (recipe, seed) unless its results are committed; copy its results and timing, commit them."""
    target = result_path(name, kind, seed)
    if committed(target):
        return
    run_dir = runs_dir / f"{kind}_s{seed}"
    fit_cached(EXPERIMENTS[name].configs[kind], run_dir, seed, [f"--data.init_args.seed={seed}"])
    target.parent.mkdir(parents=True, exist_ok=True)
    files = [target, target.parent / "seconds.json"]
    shutil.copyfile(run_dir / "results.json", files[0])
    files[1].write_text(json.dumps(fit_seconds(run_dir)))
    print(f"{name} {kind} seed {seed}: {fit_seconds(run_dir)['wall']:.0f} s", flush=True)
    if do_commit:
        commit(files, f"{name} seeds: {kind} seed {seed}, so the sweep resumes after it")


def summary(name: str, seeds: list[int]) -> list[dict[str, Any]]:
    """One row per metric: mean and 95% half-width per kind over ``seeds``, and of the paired difference."""
    experiment = EXPERIMENTS[name]
    results = {k: {s: json.loads(result_path(name, k, s).read_text()) for s in seeds} for k in experiment.configs}
    rows = []
    for metric, (meaning, read) in experiment.metrics.items():
        values = {k: [read(results[k][s]) for s in seeds] for k in experiment.configs}
        row: dict[str, Any] = {"metric": metric, "meaning": meaning}
        paired = [a - b for a, b in zip(values["routed"], values["control"])]
        for key, sample in (*values.items(), ("difference", paired)):
            row[key], row[f"{key}_ci"] = interval(sample)
        row["routed_per_seed"], row["control_per_seed"] = values["routed"], values["control"]
        rows.append(row)
    return rows


def report(name: str, rows: list[dict[str, Any]], seeds: list[int], command: str) -> str:
    lines = report_header(
        f"{name} over seeds: routed vs control",
        command,
        f"{EXPERIMENTS[name].scale}; seeds {', '.join(map(str, seeds))}. Mean ± 95% t half-width over seeds; the "
        "difference is paired by seed (same initialisation, order and split).",
    )
    lines += ["| metric | routed | control | routed − control | routed per seed | control per seed |"]
    lines += ["|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]:.3f} ± {r[k + '_ci']:.3f}" for k in ("routed", "control", "difference")]
        seeds_cells = [", ".join(f"{v:.3g}" for v in r[f"{k}_per_seed"]) for k in ("routed", "control")]
        lines.append(f"| {r['metric']}: {r['meaning']} | " + " | ".join(cells + seeds_cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to train (default: the entry's)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: runs/<experiment>_seeds")
    parser.add_argument("--no-commit", action="store_true", help="do not commit each finished run")
    args = parser.parse_args(argv)
    name, experiment = args.experiment, EXPERIMENTS[args.experiment]
    seeds = list(experiment.default_seeds if args.seeds is None else args.seeds)
    runs_dir = args.runs_dir or ROOT / "runs" / f"{name}_seeds"
    for seed in seeds:
        for kind in experiment.configs:
            run(name, kind, seed, runs_dir, not args.no_commit)
    reported = sorted({*seeds, *([0] if experiment.seed0 else [])})
    rows = summary(name, reported)
    command = f"python benchmarks/recipe_seeds.py {name} --seeds " + " ".join(map(str, seeds))
    out = RESULTS / f"{name}_seeds"
    out.with_suffix(".md").write_text(report(name, rows, reported, command))
    out.with_suffix(".json").write_text(json.dumps({"seeds": reported, "metrics": rows}, indent=1) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
