"""TinyStories unlearning sweep: methods x oversight levels (x seeds), the paper's Figure 4 at the recipes' scale.

Every run is ``gradroute fit --config recipes/tinystories/<method>.yaml`` with the oversight and seed set on the
command line, so the sweep measures exactly what the recipes do. Each run writes ``results.json``; the sweep
collects them into a markdown table and a three-panel plot (retain loss, forget loss, and forget loss after the
retraining attack, against oversight; one line per method, plain training as a dashed reference line).

    python benchmarks/tinystories_sweep.py                                 # quick CPU recipes, p in {0, 0.5, 1}
    python benchmarks/tinystories_sweep.py --oversight 0 0.25 0.5 0.75 1 --seeds 0 1
    python benchmarks/tinystories_sweep.py --set --trainer.max_steps=800   # extra CLI arguments for every run
    python benchmarks/tinystories_sweep.py --methods token_filtering base --oversight 0.5 1 --seeds 0 1 --merge
    python benchmarks/tinystories_sweep.py --paper-lrs --seeds 0 1 --name tinystories_paper --commit  # issue 21

Runs whose ``results.json`` already exists are not repeated (delete ``--runs-dir`` to start over). Plain
training does not depend on oversight, so it runs once per seed. RMU needs labelled forget stories, so it
skips oversight 0. Outputs: ``<out>/tinystories_sweep.md``, ``<out>/tinystories_sweep.png``,
``<out>/tinystories_sweep.json``. ``--merge`` adds the rows of this invocation to those already in
``<out>/tinystories_sweep.json`` (replacing rows of the same method and oversight), so a method can be added to a
committed table without re-running the others; the scale line then names both commands.

The paper's three metrics (its ``analyze_partial_oversight_runs.py``) are the report's last table: "unlearning"
= forget loss after the pipeline − forget loss "before", "robust unlearning" = the lowest forget loss under the
retraining attack (step 0 included) − the same "before", and the retain loss after. "Before" is the method's own
model before its ablation (ERA, DEMix; RMU: the plain model it starts from), and for data and token filtering the
plain model of the same seed (the paper: the filtering model at oversight 0, i.e. trained on all data).
``--paper-lrs`` runs the coherence fine-tune and the attack at the paper's AdamW learning rate, 5e-5 (the recipes
use 5e-4, the same 1/10 of the training peak as the paper's 5e-5 of 5e-4; that is the documented variant).
``--commit`` copies each finished run's ``results.json`` to ``<out>/<name>/<run>/`` and commits it, and a run
committed there is read back instead of trained: a sweep of hours resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from recipe_run import commit, committed, interval, report_header, run_recipe, save_figure, summarise

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("era", "data_filtering", "token_filtering", "rmu", "demix", "base")
LABELS = {
    "era": "ERA",
    "data_filtering": "Data filtering",
    "token_filtering": "Token filtering",
    "rmu": "RMU",
    "demix": "DEMix",
    "base": "Plain training",
}
METRICS = (
    ("retain", "Retain loss", lambda r: r["final"]["retain"]),
    ("forget", "Forget loss", lambda r: r["final"]["forget"]),
    ("attacked", "Forget loss after retraining attack", lambda r: r["attack"]["lowest_forget"]),
    ("concept", "Concept-token loss", lambda r: r["final"]["forget_tokens"]),
    ("concept_attacked", "Concept-token loss after attack", lambda r: min(r["attack"]["curves"]["forget_tokens"])),
)
#: The paper's metrics (name, column): see the module docstring and :func:`paper_metrics`.
PAPER_METRICS = (("unlearning", "unlearning"), ("robust_unlearning", "robust unlearning"), ("retain", "retain loss"))
#: The coherence and attack learning rate of the paper's TinyStories runs (AdamW).
PAPER_LR = 5e-5
#: Methods whose "before" is the plain model of the same seed (they have no model before an ablation).
FILTERING = ("data_filtering", "token_filtering")


def paper_metrics(method: str, run: dict[str, Any], base: dict[str, Any] | None) -> dict[str, float] | None:
    """The paper's unlearning, robust unlearning and retain loss of one run (None: a filtering run without the
    plain run of its seed)."""
    if method in FILTERING:
        if base is None:
            return None
        before = base["final"]["forget"]
    else:
        before = run["pre_ablation"]["forget"]
    return {
        "unlearning": run["final"]["forget"] - before,
        "robust_unlearning": run["attack"]["lowest_forget"] - before,
        "retain": run["final"]["retain"],
    }


def run_one(
    method: str,
    oversight: float,
    seed: int,
    runs_dir: Path,
    extra: list[str],
    recipes: Path,
    committed_dir: Path | None = None,
) -> dict[str, Any]:
    """Run (or reuse) one recipe and return its results.json. With ``committed_dir``, a run committed there is
    read back, and a new one is copied there and committed."""
    name = f"{method}_p{oversight:g}_s{seed}"
    kept = committed_dir / name / "results.json" if committed_dir is not None else None
    if kept is not None and committed(kept):
        return json.loads(kept.read_text())
    arguments = [
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        f"--data.init_args.oversight={oversight}",
    ]
    result = run_recipe([recipes / f"{method}.yaml"], runs_dir / name, arguments + extra)
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps(result, indent=2))
        commit([kept], f"TinyStories sweep: results of {name}, so the sweep resumes after it")
    return result


def collect(runs: dict[tuple[str, float], dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of each metric, and of its difference from plain training with the same seed."""
    base = runs.get(("base", 1.0), {})
    rows = []
    for (method, oversight), by_seed in sorted(runs.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
        row: dict[str, Any] = {"method": method, "oversight": oversight, "seeds": len(by_seed)}
        for key, _, get in METRICS:
            row[key], row[key + "_std"] = summarise([get(r) for r in by_seed.values()])
            paired = [get(r) - get(base[seed]) for seed, r in by_seed.items() if seed in base]
            if paired:
                row["delta_" + key], row["delta_" + key + "_std"] = summarise(paired)
        paper = [paper_metrics(method, r, base.get(seed)) for seed, r in by_seed.items()]
        if paper and all(m is not None for m in paper):
            for key, _ in PAPER_METRICS:
                row["paper_" + key], row["paper_" + key + "_ci"] = interval([m[key] for m in paper])
        row["train_seconds"] = statistics.fmean(r["train_seconds"] for r in by_seed.values())
        row["evaluation_seconds"] = statistics.fmean(r["evaluation_seconds"] for r in by_seed.values())
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], scale: str, command: str) -> str:
    lines = [
        *report_header("TinyStories unlearning sweep (CPU scale)", command, scale),
        (
            "Losses are mean next-token cross-entropy (nats) on the held-out retain and forget stories after the "
            "method's full pipeline (ERA: contract + coherence fine-tune; DEMix: keep retain experts + coherence "
            "fine-tune; RMU: post-hoc RMU; data filtering and plain training: as trained). 'After attack' is the "
            "lowest forget loss reached while fine-tuning on held-out forget stories (seed-averaged curve, step 0 "
            "included). 'Concept-token' losses are on the forget stories' tokens weighted by how forget-specific each "
            "token is (1 − w, its routing weight), so they isolate the forest/tree concept from the surrounding "
            "English; they are our diagnostic, not a paper metric. Higher forget loss is better unlearning; lower "
            "retain loss is better. ± is the std over seeds."
        ),
        "",
        (
            "| method | oversight | retain loss | forget loss | forget loss after attack | concept-token loss "
            "| concept-token loss after attack | forget − retain (after attack) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            f"{row[k]:.4f} ± {row[k + '_std']:.4f}" if row["seeds"] > 1 else f"{row[k]:.4f}" for k, _, _ in METRICS
        ]
        gap = row["attacked"] - row["retain"]
        oversight = "any" if row["method"] == "base" else f"{row['oversight']:g}"
        lines.append(f"| {LABELS[row['method']]} | {oversight} | {' | '.join(cells)} | {gap:+.4f} |")
    paired = [row for row in rows if row["method"] != "base" and "delta_retain" in row]
    if paired:
        lines += [
            "",
            (
                "Differences from plain training with the same seed (same data split and held-out sets), mean ± "
                "std over seeds. Positive forget and concept-token differences are unlearning; a positive retain "
                "difference is its cost."
            ),
            "",
            (
                "| method | oversight | Δ retain | Δ forget | Δ forget after attack | Δ concept-token | "
                "Δ concept-token after attack |"
            ),
            "|---|---|---|---|---|---|---|",
        ]
        for row in paired:
            std = row["seeds"] > 1
            cells = [
                f"{row['delta_' + k]:+.4f}" + (f" ± {row['delta_' + k + '_std']:.4f}" if std else "")
                for k, _, _ in METRICS
            ]
            lines.append(f"| {LABELS[row['method']]} | {row['oversight']:g} | {' | '.join(cells)} |")
    paper = [row for row in rows if "paper_unlearning" in row]
    if paper:
        lines += [
            "",
            (
                "The paper's metrics: unlearning = forget loss after the pipeline − forget loss before (the method's "
                "model before its ablation; for data and token filtering, plain training of the same seed); robust "
                "unlearning = lowest forget loss under the retraining attack (step 0 included) − the same before; "
                "retain loss after. Mean ± 95% t half-width over seeds (none for one seed)."
            ),
            "",
            "| method | oversight | " + " | ".join(column for _, column in PAPER_METRICS) + " |",
            "|---|---|---|---|---|",
        ]
        for row in paper:
            cells = [
                f"{row['paper_' + k]:+.4f}" + (f" ± {row['paper_' + k + '_ci']:.4f}" if row["seeds"] > 1 else "")
                for k, _ in PAPER_METRICS
            ]
            oversight = "any" if row["method"] == "base" else f"{row['oversight']:g}"
            lines.append(f"| {LABELS[row['method']]} | {oversight} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, scale: str) -> None:
    """Top row: each metric against oversight (plain training dashed). Bottom row, when plain training ran: the
    difference from plain training with the same seed. Error bars: std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("", "loss (nats)")]
    if any("delta_retain" in r for r in rows):
        panels.append(("delta_", "difference from plain training (nats)"))
    fig, axes = plt.subplots(len(panels), len(METRICS), figsize=(5 * len(METRICS), 4.2 * len(panels)), squeeze=False)
    for axes_row, (prefix, ylabel) in zip(axes, panels):
        for ax, (key, title, _) in zip(axes_row, METRICS):
            for method in METHODS:
                points = [r for r in rows if r["method"] == method and prefix + key in r]
                if not points:
                    continue
                if method == "base":
                    ax.axhline(points[0][prefix + key], color="gray", linestyle="--", label=LABELS[method])
                    continue
                xs = [r["oversight"] for r in points]
                ys = [r[prefix + key] for r in points]
                errs = [r[prefix + key + "_std"] for r in points]
                ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", capsize=3, label=LABELS[method])
            if prefix:
                ax.axhline(0.0, color="gray", linestyle="--")
            ax.set_title(("Δ " if prefix else "") + title)
            ax.set_xlabel("oversight (fraction of forget stories labelled)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, f"TinyStories unlearning vs oversight — {scale}", path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--oversight", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--recipes", type=Path, default=ROOT / "recipes" / "tinystories")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "tinystories_sweep")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--merge", action="store_true", help="add these rows to those in <out>/<name>.json")
    parser.add_argument("--name", default="tinystories_sweep", help="the report's file names under <out>")
    parser.add_argument("--paper-lrs", action="store_true", help=f"coherence and attack at the paper's {PAPER_LR:g}")
    parser.add_argument("--commit", action="store_true", help="commit each run under <out>/<name>/ and resume")
    parser.add_argument("--set", nargs=argparse.REMAINDER, default=[], help="extra gradroute CLI arguments, last")
    args = parser.parse_args(argv)
    for p in args.oversight:
        if not 0 <= p <= 1:
            parser.error(f"oversight {p} is not in [0, 1]")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    extra = list(args.set)
    if args.paper_lrs:  # the evaluation callback is the last in every recipe's list, which these flags address
        extra = [f"--trainer.callbacks.init_args.{k}={PAPER_LR}" for k in ("coherence_lr", "attack_lr")] + extra
    committed_dir = args.out / args.name if args.commit else None

    runs: dict[tuple[str, float], dict[int, dict[str, Any]]] = {}
    for seed in args.seeds:
        for method in args.methods:
            levels = [1.0] if method == "base" else [p for p in args.oversight if not (method == "rmu" and p == 0)]
            for p in levels:
                result = run_one(method, p, seed, args.runs_dir, extra, args.recipes, committed_dir)
                runs.setdefault((method, p), {})[seed] = result
    rows = collect(runs)
    all_results = [r for by_seed in runs.values() for r in by_seed.values()]
    first = all_results[0]
    data = first["data"]
    scale = (
        f"GPT-Neo with {first['parameters']:,} parameters, {first['steps_trained']} steps of "
        f"{data['train_stories']:,} training stories ({data['forget_fraction']:.1%} forget) from the carried "
        f"TinyStories sample, {data['vocab_size']}-token BPE; {data['retain_val_stories']} + "
        f"{data['forget_val_stories']} held-out stories; seeds {args.seeds}; {len(all_results)} runs, "
        f"{sum(r['train_seconds'] + r['evaluation_seconds'] for r in all_results) / 60:.0f} min of training and "
        "evaluation in all (shared 2-core CPU, one thread per run)."
    )
    command = "python benchmarks/tinystories_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    saved, table_path = args.out / f"{args.name}.json", args.out / f"{args.name}.md"
    if args.merge and saved.exists():
        previous = json.loads(saved.read_text())
        new = {(row["method"], row["oversight"]) for row in rows}
        rows = [r for r in previous["rows"] if (r["method"], r["oversight"]) not in new] + rows
        rows.sort(key=lambda row: (METHODS.index(row["method"]), row["oversight"]))
        scale = f"{previous['scale']} Merged with `{command.strip()}`: {scale}"
        first = previous.get("command") or re.search(r"^Command: `(.+)`$", table_path.read_text(), re.M).group(1)
        command = f"{first}, then {command.strip()}"
    args.out.mkdir(parents=True, exist_ok=True)
    table_path.write_text(table(rows, scale, command.strip()))
    saved.write_text(json.dumps({"scale": scale, "command": command.strip(), "rows": rows}, indent=2))
    plot(rows, args.out / f"{args.name}.png", scale)
    print(table(rows, scale, command.strip()))
    if args.commit:
        commit([table_path, saved, args.out / f"{args.name}.png"], f"TinyStories sweep: {args.name} report")


if __name__ == "__main__":
    main()
