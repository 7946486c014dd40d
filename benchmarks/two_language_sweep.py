"""Two-language unlearning sweep: methods x label recall x seeds, at the recipes' CPU scale.

Every run is ``gradroute fit --config recipes/two_language/plain.yaml [--config recipes/two_language/<method>.yaml]``
with the recall and seed set on the command line, so the sweep measures exactly what the recipes do. Plain
training does not depend on recall and runs once per seed; it is the reference of every paired number:

* retain cost: the method's final retain loss minus plain training's (same seed, so the same data split);
* forget loss after the attack: the lowest held-out Russian loss any attack learning rate reaches;
* steps to recover (SGTM's metric): the fewest attack steps after which some learning rate's seed-averaged
  forget loss is at or below plain training's forget loss (same seed); runs that do not get there within the
  attack count as the attack's length (a lower bound), and the table says how many did.

    python benchmarks/two_language_sweep.py                               # 7 recipes x recall {0.1, 0.25, 0.5, 1}
    python benchmarks/two_language_sweep.py --methods plain sgtm --recall 0.5 --seeds 0

Runs whose ``results.json`` already exists are not repeated (delete ``--runs-dir`` to start over). Outputs:
``<out>/two_language_sweep.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from recipe_run import report_header, run_recipe, save_figure, summarise

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lightning_gradroute.evaluation import recovery_steps  # noqa: E402

METHODS = ("plain", "data_filtering", "token_filtering", "era_activation", "sgtm", "era_parameter", "sgtm_unmasked")
LABELS = {
    "plain": "Plain training",
    "data_filtering": "Data filtering",
    "token_filtering": "Token filtering",
    "era_activation": "ERA, activation routing",
    "sgtm": "Parameter routing (SGTM-style)",
    "era_parameter": "ERA, parameter routing",
    "sgtm_unmasked": "Parameter routing, no retain mask",
}
#: (key, column title, how to read it from one run's results and plain training's of the same seed)
METRICS = (
    ("retain", "retain loss", lambda r, b: r["final"]["retain"]),
    ("retain_cost", "retain cost", lambda r, b: r["final"]["retain"] - b["final"]["retain"]),
    ("forget_before", "forget loss before ablation", lambda r, b: r["pre_ablation"]["forget"]),
    ("forget", "forget loss after ablation", lambda r, b: r["final"]["forget"]),
    ("attacked", "forget loss after attack", lambda r, b: r["attack"]["lowest_forget"]),
)


def steps(result: dict[str, Any], base: dict[str, Any]) -> tuple[int, bool]:
    """(steps to recover plain training's forget loss, whether it did within the attack)."""
    found = recovery_steps(result["attack"], base["final"]["forget"])
    return (result["attack"]["eval_steps"][-1], False) if found is None else (found, True)


def collect(runs: dict[tuple[str, float], dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every metric, per (method, recall)."""
    base = runs[("plain", 1.0)]
    rows = []
    for (method, recall), by_seed in sorted(runs.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
        row: dict[str, Any] = {"method": method, "recall": recall, "seeds": sorted(by_seed)}
        for key, _, get in METRICS:
            row[key], row[key + "_std"] = summarise([get(r, base[s]) for s, r in by_seed.items()])
        recovered = [steps(r, base[s]) for s, r in by_seed.items()]
        row["steps"], row["steps_std"] = summarise([float(n) for n, _ in recovered])
        row["recovered"] = sum(ok for _, ok in recovered)
        row["attack_steps"] = max(r["attack"]["eval_steps"][-1] for r in by_seed.values())
        norms = [r["grad_norms"] for r in by_seed.values() if "grad_norms" in r]
        if norms:
            row["grad_norms"] = {k: statistics.fmean(n[k] for n in norms) for k in norms[0]}
        row["seconds"] = statistics.fmean(r["train_seconds"] + r["evaluation_seconds"] for r in by_seed.values())
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], scale: str, command: str) -> str:
    lines = [
        *report_header("Two-language unlearning sweep (CPU scale)", command, scale),
        (
            "Retain = English, forget = Russian. Losses are mean next-token cross-entropy (nats) on the held-out "
            "English and Russian stories; 'before' / 'after ablation' bracket the method's removal step (contract "
            "the ERA units, zero the SGTM units; none for the other methods). Retain cost is the final retain loss "
            "minus plain training's with the same seed. 'After attack' is the lowest forget loss reached while "
            "fine-tuning on held-out Russian stories (any of the attack's learning rates). Steps to recover is "
            "the fewest attack steps to bring the forget loss down to plain training's (same seed), evaluated "
            "every few steps; a run that does not get there counts as the attack's length, so a mean with fewer "
            "than all runs recovered is a lower bound. ± is the std over seeds."
        ),
        "",
        (
            "| method | recall | retain loss | retain cost | forget loss before ablation | forget loss after ablation "
            "| forget loss after attack | steps to recover | runs recovered |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [f"{row[k]:.3f} ± {row[k + '_std']:.3f}" for k, _, _ in METRICS]
        cells[1] = f"{row['retain_cost']:+.3f} ± {row['retain_cost_std']:.3f}"
        bound = "≥ " if row["recovered"] < len(row["seeds"]) else ""
        recall = "any" if row["method"] == "plain" else f"{row['recall']:g}"
        lines.append(
            f"| {LABELS[row['method']]} | {recall} | {' | '.join(cells)} | {bound}{row['steps']:.1f} ± "
            f"{row['steps_std']:.1f} | {row['recovered']}/{len(row['seeds'])} |"
        )
    norms = [row for row in rows if "grad_norms" in row]
    if norms:
        keys = sorted(norms[0]["grad_norms"])
        lines += [
            "",
            "Leakage telemetry (`log_grad_norms`): mean over training steps and seeds of the routed gradient norm "
            "each label sends into each unit group (`<target>/<label>/<units>`).",
            "",
            "| method | recall | " + " | ".join(keys) + " |",
            "|---|---|" + "---|" * len(keys),
        ]
        for row in norms:
            values = " | ".join(f"{row['grad_norms'][k]:.2e}" for k in keys)
            lines.append(f"| {LABELS[row['method']]} | {row['recall']:g} | {values} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, scale: str) -> None:
    """Forget loss after the attack, steps to recover, retain cost and forget loss after ablation against recall:
    one line per method, plain training dashed, error bars the std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("attacked", "forget loss after attack (nats)"),
        ("steps", "steps to recover plain training's forget loss"),
        ("retain_cost", "retain cost (nats over plain training)"),
        ("forget", "forget loss after ablation (nats)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4))
    for ax, (key, title) in zip(axes, panels):
        for method in METHODS:
            points = [r for r in rows if r["method"] == method]
            if not points:
                continue
            if method == "plain":
                ax.axhline(points[0][key], color="gray", linestyle="--", label=LABELS[method])
                continue
            xs, ys = [r["recall"] for r in points], [r[key] for r in points]
            ax.errorbar(xs, ys, yerr=[r[key + "_std"] for r in points], marker="o", capsize=3, label=LABELS[method])
        if key == "steps":
            ax.axhline(max(r["attack_steps"] for r in rows), color="black", linewidth=0.8, linestyle=":")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("label recall (fraction of Russian stories labelled)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, f"Two-language unlearning vs label recall — {scale}", path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--recall", nargs="+", type=float, default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--recipes", type=Path, default=ROOT / "recipes" / "two_language")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "two_language_sweep")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--set", nargs=argparse.REMAINDER, default=[], help="extra gradroute CLI arguments, last")
    args = parser.parse_args(argv)
    if any(not 0 <= r <= 1 for r in args.recall):
        parser.error(f"recall levels must be in [0, 1], got {args.recall}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    runs: dict[tuple[str, float], dict[int, dict[str, Any]]] = {}
    for seed in args.seeds:
        for method in ["plain", *(m for m in args.methods if m != "plain")]:  # plain first: the reference
            for recall in [1.0] if method == "plain" else args.recall:
                configs = [args.recipes / "plain.yaml"] + (
                    [args.recipes / f"{method}.yaml"] if method != "plain" else []
                )
                arguments = [f"--seed_everything={seed}", f"--data.init_args.seed={seed}"]
                arguments += [f"--data.init_args.recall={recall}", *args.set]
                run_dir = args.runs_dir / f"{method}_r{recall:g}_s{seed}"
                runs.setdefault((method, recall), {})[seed] = run_recipe(configs, run_dir, arguments)
    rows = collect(runs)
    results = [r for by_seed in runs.values() for r in by_seed.values()]
    first, data = runs[("plain", 1.0)][args.seeds[0]], runs[("plain", 1.0)][args.seeds[0]]["data"]
    model = first["model"]
    minutes = sum(r["train_seconds"] + r["evaluation_seconds"] for r in results) / 60
    scale = (
        f"GPT-Neo, {model['num_layers']} layers, d_model {model['hidden_size']}, {model['num_heads']} heads, d_mlp "
        f"{model['intermediate_size']} ({first['parameters']:,} parameters), {first['steps_trained']} steps of "
        f"{data['batch_size']} packed windows of {data['max_tokens']} tokens from {data['train_stories']:,} training "
        f"stories ({data['train_forget_stories']:,} Russian, {data['forget_token_fraction']:.0%} of the tokens), "
        f"{data['vocab_size']}-token BPE on both languages; {data['retain_val_stories']} + "
        f"{data['forget_val_stories']} held-out stories; attack pool {data['attack_pool_stories']} Russian stories; "
        f"seeds {args.seeds}; {len(results)} runs, {minutes:.0f} min of training and evaluation in all (shared "
        "2-core CPU, one thread per run)."
    )
    command = "python benchmarks/two_language_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = table(rows, scale, command.strip())
    (args.out / "two_language_sweep.md").write_text(markdown)
    (args.out / "two_language_sweep.json").write_text(json.dumps({"scale": scale, "rows": rows}, indent=2))
    plot(rows, args.out / "two_language_sweep.png", scale)
    print(markdown)


if __name__ == "__main__":
    main()
