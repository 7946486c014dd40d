"""Two-language unlearning v2 (English = forget, romanised Russian = retain): methods x label recall x model size x
seeds, resumable from committed per-run results. It replaces ``two_language_sweep.py`` (v1) as the benchmark.

Every run is ``gradroute fit --config recipes/two_language/v2/plain.yaml [--config .../<recipe>.yaml]`` with the
size, recall and seed on the command line, so the sweep measures exactly what the recipes do. Cells run in
:func:`plan`'s order (the most informative first). After each run the sweep copies its ``results.json`` (which
holds the final model's evaluation) and ``seconds.json`` to ``benchmarks/results/two_language_v2/<cell>/`` and
git-commits those two files alone; a cell whose ``results.json`` is committed is skipped, so rerunning the
command resumes. The final models stay under ``--runs-dir`` (``runs/two_language_v2/<cell>/final``: HF format
with the tokenizer, not committed: ~1-4 MB each). After every phase, and with ``--render-only``, the table and
plot are rendered from what is committed (``benchmarks/results/two_language_v2.{md,json,png}``) and committed.

    OMP_NUM_THREADS=1 python benchmarks/two_language_v2_sweep.py                 # the whole plan, resumable
    python benchmarks/two_language_v2_sweep.py --render-only                     # table and plot only
    python benchmarks/two_language_v2_sweep.py --phases 1 --seeds 0 --no-commit  # a partial run

Paired numbers use the run of the same size and seed as the reference (same data split and initialisation):

* retain cost: the method's final retain loss minus plain training's;
* lowest forget loss under the attack of a budget (any learning rate, any evaluated step, step 0 included);
* steps to plain: the fewest attack steps after which some learning rate's seed-averaged forget loss is at or
  below plain training's final forget loss (SGTM's steps-to-recover);
* steps to scratch: the same, to the lowest forget loss the same attack reaches from an untrained model (the
  token-filtering paper's compute view: 0 means the model starts the attack knowing more English than the attack
  data can teach from scratch).

A run that never gets there counts as the attack's length and the table marks the mean as a lower bound.
Intervals are 95% t-intervals over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe_run import commit, committed, fit_timed, interval, report_header, save_figure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lightning_gradroute.evaluation import recovery_steps  # noqa: E402

RECIPES = ROOT / "recipes" / "two_language" / "v2"
RESULTS = ROOT / "benchmarks" / "results" / "two_language_v2"
BUDGETS = ("16", "64", "256")
MAIN_BUDGET = "64"

#: Model sizes: GPT-Neo fields, peak learning rate. Head dim is 16 at every size, so "head 0" is dims 0:16 and
#: the recipes' dedicated units (64 MLP neurons, one head) need no per-size change, as in SGTM.
SIZES: dict[str, dict[str, Any]] = {
    "0.09M": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "lr": 3e-3},
    "0.24M": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256, "lr": 3e-3},
    "1.1M": {"hidden_size": 128, "num_layers": 4, "num_heads": 8, "intermediate_size": 512, "lr": 2e-3},
}
MAIN_SIZE = "0.24M"
STEPS = 2400  # every size sees the same ~4.9M training tokens, about one epoch (20 per parameter at 0.24M)

#: method: (recipe overlay or None, extra CLI arguments, whether the cell depends on recall)
METHODS: dict[str, tuple[str | None, tuple[str, ...], bool]] = {
    "plain": (None, (), False),
    "scratch": (None, ("--trainer.max_steps=1", "--trainer.callbacks.init_args.method=scratch"), False),
    "data_filtering": ("data_filtering", (), True),
    "token_filtering": ("token_filtering", (), True),
    "sgtm": ("sgtm", (), True),
    "era": ("era", (), True),
    # Controls: the same training and ablation with no label, so nothing is routed (what ablation alone costs
    # and removes); and SGTM with the mostly-English embedding rows re-drawn after ablation (the shared rows).
    "sgtm_unrouted": ("sgtm", ("--data.init_args.recall=0", "--data.init_args.retain_masked_fraction=0"), False),
    "era_unrouted": ("era", ("--data.init_args.recall=0",), False),
    "sgtm_reset_rows": ("sgtm", ("--trainer.callbacks.init_args.reset_forget_rows=true",), True),
}
LABELS = {
    "plain": "Plain training",
    "scratch": "From scratch (attack data only)",
    "data_filtering": "Data filtering",
    "token_filtering": "Token filtering",
    "sgtm": "SGTM",
    "era": "ERA",
    "sgtm_unrouted": "SGTM units, no routing (control)",
    "era_unrouted": "ERA expansion, no routing (control)",
    "sgtm_reset_rows": "SGTM + English rows re-drawn (control)",
}


@dataclass(frozen=True)
class Cell:
    size: str
    method: str
    recall: float | None  # None: the cell does not depend on recall
    seed: int

    @property
    def name(self) -> str:
        recall = "" if self.recall is None else f"_r{self.recall:g}"
        return f"{self.size}_{self.method}{recall}_s{self.seed}"

    def cli_args(self, runs_dir: Path) -> list[str]:
        overlay, extra, _ = METHODS[self.method]
        configs = [RECIPES / "plain.yaml"] + ([RECIPES / f"{overlay}.yaml"] if overlay else [])
        size = SIZES[self.size]
        layers = size["num_layers"]
        config = {
            "model_type": "gpt_neo", "vocab_size": 1024, "hidden_size": size["hidden_size"], "num_layers": layers,
            "num_heads": size["num_heads"], "attention_types": [[["global", "local"], layers // 2]],
            "intermediate_size": size["intermediate_size"], "max_position_embeddings": 128, "window_size": 128,
            "activation_function": "gelu_new", "tie_word_embeddings": False,
            "initializer_range": 0.8 / math.sqrt(size["hidden_size"]), "bos_token_id": None, "eos_token_id": None,
        }  # fmt: skip
        lr = size["lr"]
        arguments = [arg for c in configs for arg in ("--config", str(c))]
        arguments += [
            f"--seed_everything={self.seed}",
            f"--data.init_args.seed={self.seed}",
            f"--model.init_args.config={json.dumps(config)}",
            f"--model.init_args.lr={lr}",
            f"--trainer.max_steps={STEPS}",
            # The attack's learning rates: a tenth of, a third of and the training peak.
            f"--trainer.callbacks.init_args.attack_lr=[{lr / 10:g}, {lr / 3:.3g}, {lr:g}]",
            f"--trainer.default_root_dir={runs_dir / self.name}",
            "--trainer.logger=false",
        ]
        if self.method == "era":
            arguments.append(f"--trainer.callbacks.init_args.coherence_lr={lr / 10:g}")
        if self.recall is not None:
            arguments.append(f"--data.init_args.recall={self.recall}")
        return arguments + list(extra)


def plan(seeds: list[int]) -> list[tuple[int, list[Cell]]]:
    """The cells in phases, most informative first (see the recipe README for the budget arithmetic)."""

    def cells(size: str, methods: list[str], recalls: list[float]) -> list[Cell]:
        out = []
        for seed in seeds:
            for method in methods:
                depends = METHODS[method][2]
                for recall in recalls if depends else [None]:
                    out.append(Cell(size, method, recall, seed))
        return list(dict.fromkeys(out))

    full = ["plain", "scratch", "data_filtering", "token_filtering", "sgtm", "era", "sgtm_unrouted", "era_unrouted"]
    core = ["plain", "scratch", "data_filtering", "token_filtering", "sgtm"]
    routed = ["data_filtering", "token_filtering", "sgtm", "era"]
    return [
        (1, cells(MAIN_SIZE, full, [1.0, 0.9])),
        (2, cells("0.09M", core, [1.0, 0.9])),
        (3, cells("1.1M", core, [0.9])),
        (4, cells(MAIN_SIZE, ["sgtm_reset_rows"], [1.0, 0.9]) + cells(MAIN_SIZE, routed, [0.99, 0.5])),
        (5, cells("1.1M", core[2:], [1.0]) + cells("0.09M", core[2:], [0.99, 0.5])),
    ]


# ------------------------------------------------------------------------------------------------ running
def run_cell(cell: Cell, runs_dir: Path, results_dir: Path, do_commit: bool) -> None:
    """Train and evaluate one cell (unless its results are committed), copy and commit its small files."""
    target = results_dir / cell.name
    if committed(target / "results.json"):
        return
    run_dir = runs_dir / cell.name
    if not (run_dir / "results.json").exists():
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        seconds = fit_timed(cell.cli_args(runs_dir), run_dir, env=env)
        (run_dir / "seconds.json").write_text(json.dumps(seconds))
    target.mkdir(parents=True, exist_ok=True)
    files = []
    for name in ("results.json", "seconds.json"):
        shutil.copyfile(run_dir / name, target / name)
        files.append(target / name)
    wall = json.loads((run_dir / "seconds.json").read_text())["wall"]
    print(f"{cell.name}: {wall:.0f} s", flush=True)
    if do_commit:
        commit(files, f"two-language v2 sweep: results of {cell.name} ({wall:.0f} s), so the sweep resumes after it")


# ------------------------------------------------------------------------------------------------ report
def load(results_dir: Path) -> dict[Cell, dict[str, Any]]:
    """Every committed run under ``results_dir`` (files on disk that git tracks), keyed by cell."""
    runs = {}
    by_name = {c.name: c for _, cells in plan(list(range(10))) for c in cells}
    for path in sorted(results_dir.glob("*/results.json")):
        cell = by_name.get(path.parent.name)
        if cell is not None and committed(path):
            result = json.loads(path.read_text())
            result["seconds"] = json.loads((path.parent / "seconds.json").read_text())
            runs[cell] = result
    return runs


def steps_to(attack: dict[str, Any], target: float) -> tuple[float, bool]:
    """(steps to bring the forget loss to ``target``, whether it did within the attack)."""
    found = recovery_steps(attack, target)
    return (float(attack["eval_steps"][-1]), False) if found is None else (float(found), True)


#: (key, how to read it from a run and its same-size, same-seed plain and scratch runs)
Metric = Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], tuple[float, bool]]


def metrics() -> dict[str, Metric]:
    out: dict[str, Metric] = {
        "retain": lambda r, p, s: (r["final"]["retain"], True),
        "retain_cost": lambda r, p, s: (r["final"]["retain"] - p["final"]["retain"], True),
        "forget_before": lambda r, p, s: (r["pre_ablation"]["forget"], True),
        "forget": lambda r, p, s: (r["final"]["forget"], True),
    }
    for b in BUDGETS:
        out[f"lowest_{b}"] = lambda r, p, s, b=b: (r["attacks"][b]["lowest_forget"], True)
        out[f"to_plain_{b}"] = lambda r, p, s, b=b: steps_to(r["attacks"][b], p["final"]["forget"])
        out[f"to_scratch_{b}"] = lambda r, p, s, b=b: steps_to(r["attacks"][b], s["attacks"][b]["lowest_forget"])
    return out


def collect(runs: dict[Cell, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (size, method, recall) with every metric's mean, 95% half-width and whether all runs reached
    the target (for the step counts); runs without their plain and scratch references are left out."""
    groups: dict[tuple[str, str, float | None], list[Cell]] = {}
    for cell in runs:
        groups.setdefault((cell.size, cell.method, cell.recall), []).append(cell)
    rows = []
    order = {m: i for i, m in enumerate(METHODS)}
    for (size, method, recall), cells in sorted(
        groups.items(), key=lambda kv: (list(SIZES).index(kv[0][0]), order[kv[0][1]], -(kv[0][2] or 2))
    ):
        pairs = []
        for c in cells:
            plain, scratch = Cell(size, "plain", None, c.seed), Cell(size, "scratch", None, c.seed)
            if plain in runs and scratch in runs:
                pairs.append((runs[c], runs[plain], runs[scratch]))
        if not pairs:
            continue
        row: dict[str, Any] = {"size": size, "method": method, "recall": recall, "seeds": len(pairs)}
        for key, get in metrics().items():
            values = [get(*p) for p in pairs]
            row[key], row[key + "_ci"] = interval([v for v, _ in values])
            row[key + "_all"] = all(ok for _, ok in values)
        row["wall_s"] = statistics.fmean(runs[c]["seconds"]["wall"] for c in cells)
        row["cpu_s"] = statistics.fmean(runs[c]["seconds"]["cpu"] for c in cells)
        row["parameters"] = runs[cells[0]]["parameters"]
        row["tokens_trained"] = runs[cells[0]]["tokens_trained"]
        rows.append(row)
    return rows


#: (method, the method it is compared with): routing against filtering, routing against its no-routing control,
#: and the two filterings against each other.
COMPARISONS = [
    ("sgtm", "data_filtering"), ("sgtm", "token_filtering"), ("era", "data_filtering"), ("era", "token_filtering"),
    ("sgtm", "sgtm_unrouted"), ("era", "era_unrouted"), ("token_filtering", "data_filtering"), ("era", "sgtm"),
]  # fmt: skip
COMPARED = {"lowest": f"lowest_{MAIN_BUDGET}", "retain_cost": "retain_cost"}


def compare(runs: dict[Cell, dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired differences (same size and seed; a recall-independent control pairs with every recall) of the lowest
    forget loss under the main attack and of the retain cost, per comparison, size and recall, with 95% intervals;
    ``called`` says whether the interval of the lowest-forget difference excludes zero."""
    get = metrics()
    rows = []
    for size in SIZES:
        for a, b in COMPARISONS:
            for recall in sorted({c.recall for c in runs if c.size == size and c.method == a} - {None}, reverse=True):
                pairs = []
                for seed in sorted({c.seed for c in runs}):
                    ca, cb = Cell(size, a, recall, seed), Cell(size, b, recall if METHODS[b][2] else None, seed)
                    refs = Cell(size, "plain", None, seed), Cell(size, "scratch", None, seed)
                    if all(c in runs for c in (ca, cb, *refs)):
                        pairs.append((runs[ca], runs[cb], *(runs[c] for c in refs)))
                if not pairs:
                    continue
                row: dict[str, Any] = {"size": size, "method": a, "versus": b, "recall": recall, "seeds": len(pairs)}
                for name, key in COMPARED.items():
                    diffs = [get[key](ra, p, s)[0] - get[key](rb, p, s)[0] for ra, rb, p, s in pairs]
                    row[name], row[name + "_ci"] = interval(diffs)
                    row[name + "_all"] = True
                half = row["lowest_ci"]
                row["called"] = not math.isnan(half) and abs(row["lowest"]) > half
                rows.append(row)
    return rows


def comparison_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"Paired differences, method minus the method it is compared with (same size and seed): the lowest forget loss "
        f"under the {MAIN_BUDGET}-story attack (positive: the first method is more robust) and the retain cost "
        "(positive: the first costs more). 'called': the 95% interval of the forget difference excludes zero.",
        "",
        "| size | recall | method | versus | seeds | Δ lowest forget under attack | Δ retain cost | called |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [fmt(row, "lowest", sign=True), fmt(row, "retain_cost", sign=True), "yes" if row["called"] else "no"]
        lines.append(
            f"| {row['size']} | {row['recall']:g} | {LABELS[row['method']]} | {LABELS[row['versus']]} "
            f"| {row['seeds']} | {' | '.join(cells)} |"
        )
    return lines


def fmt(row: dict[str, Any], key: str, sign: bool = False, digits: int = 3) -> str:
    mean, half = row[key], row[key + "_ci"]
    bound = "" if row[key + "_all"] else "≥ "
    spread = "" if math.isnan(half) else f" ± {half:.{digits}f}"
    return f"{bound}{mean:{'+' if sign else ''}.{digits}f}{spread}"


def curves(runs: dict[Cell, dict[str, Any]]) -> list[str]:
    """Plain training's validation curves per size, averaged over seeds."""
    lines = ["| size | step | " + " | ".join(["retain (Russian)", "forget (English)"]) + " |", "|---|---|---|---|"]
    for size in SIZES:
        plain = [r for c, r in runs.items() if c.size == size and c.method == "plain"]
        if not plain:
            continue
        for i, step in enumerate(plain[0]["curves"]["step"]):
            retain = statistics.fmean(r["curves"]["retain"][i] for r in plain)
            forget = statistics.fmean(r["curves"]["forget"][i] for r in plain)
            lines.append(f"| {size} | {step} | {retain:.3f} | {forget:.3f} |")
    return lines


def table(
    rows: list[dict[str, Any]], comparisons: list[dict[str, Any]], runs: dict[Cell, dict[str, Any]], command: str
) -> str:
    # The data of a plain run: a filtering run drops the labelled English, a from-scratch run trains one step.
    any_run = next((r for cell, r in runs.items() if cell.method == "plain"), next(iter(runs.values())))
    data = any_run["data"]
    scale = (
        f"GPT-Neo at sizes {', '.join(SIZES)} (total parameters, vocabulary {data['vocab_size']}), {STEPS} steps of "
        f"{data['batch_size']} packed windows of {data['max_tokens']} tokens ({any_run['tokens_trained']:,} tokens); "
        f"{data['train_stories']:,} training stories of which {data['train_forget_stories']:,} English "
        f"({data['forget_token_fraction']:.1%} of the tokens); {data['retain_val_stories']} + "
        f"{data['forget_val_stories']} held-out stories; attack pool {data['attack_pool_stories']} English stories; "
        f"{len(runs)} committed runs (one thread each on a shared 2-core CPU)."
    )
    lines = [
        *report_header("Two-language unlearning v2 (English = forget, romanised Russian = retain)", command, scale),
        "Losses are mean next-token cross-entropy (nats) on held-out stories. ± is the 95% t-interval over "
        "seeds (n = the seeds column); '≥' marks a step count where some run never reached the target within the "
        "attack (it counts as the attack's length). Retain cost and the step counts are paired with plain "
        "training and the from-scratch attack of the same size and seed. 'Attack' columns: budget "
        f"{MAIN_BUDGET} English stories, 64 steps, the best of three learning rates up to the training peak.",
        "",
        "| size | method | recall | seeds | retain loss | retain cost | forget before ablation | forget final "
        "| lowest forget under attack | steps to plain's forget loss | steps to scratch's lowest |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        recall = "—" if row["recall"] is None else f"{row['recall']:g}"
        cells = [
            fmt(row, "retain"), fmt(row, "retain_cost", sign=True), fmt(row, "forget_before"), fmt(row, "forget"),
            fmt(row, f"lowest_{MAIN_BUDGET}"), fmt(row, f"to_plain_{MAIN_BUDGET}", digits=1),
            fmt(row, f"to_scratch_{MAIN_BUDGET}", digits=1),
        ]  # fmt: skip
        lines.append(f"| {row['size']} | {LABELS[row['method']]} | {recall} | {row['seeds']} | {' | '.join(cells)} |")
    lines += [
        "",
        "Lowest forget loss under the attack by budget (English stories the attacker fine-tunes on):",
        "",
        "| size | method | recall | " + " | ".join(f"budget {b}" for b in BUDGETS) + " | steps to plain, budget "
        + " / ".join(BUDGETS) + " |",
        "|---|---|---|" + "---|" * (len(BUDGETS) + 1),
    ]
    for row in rows:
        recall = "—" if row["recall"] is None else f"{row['recall']:g}"
        lowest = " | ".join(fmt(row, f"lowest_{b}") for b in BUDGETS)
        steps = " / ".join(fmt(row, f"to_plain_{b}", digits=0) for b in BUDGETS)
        lines.append(f"| {row['size']} | {LABELS[row['method']]} | {recall} | {lowest} | {steps} |")
    lines += ["", *comparison_table(comparisons)]
    lines += ["", "Plain training's held-out losses during training (mean over seeds):", "", *curves(runs), ""]
    lines += [
        "Runtime per run (mean; wall-clock and the run's own CPU seconds, one thread):",
        "",
        "| size | method | recall | parameters | wall s | CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        recall = "—" if row["recall"] is None else f"{row['recall']:g}"
        lines.append(
            f"| {row['size']} | {LABELS[row['method']]} | {recall} | {row['parameters']:,} | {row['wall_s']:.0f} "
            f"| {row['cpu_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Per size: the lowest forget loss under the main-budget attack and the retain cost against recall, one line
    per method, recall-independent cells as horizontal lines; error bars the 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s for s in SIZES if any(r["size"] == s for r in rows)]
    panels = [
        (f"lowest_{MAIN_BUDGET}", f"lowest forget loss, {MAIN_BUDGET}-story attack"),
        ("retain_cost", "retain cost"),
    ]
    fig, axes = plt.subplots(len(panels), len(sizes), figsize=(5 * len(sizes), 4 * len(panels)), squeeze=False)
    for column, size in enumerate(sizes):
        for line, (key, title) in enumerate(panels):
            ax = axes[line][column]
            for k, method in enumerate(METHODS):
                points = [r for r in rows if r["size"] == size and r["method"] == method]
                if not points:
                    continue
                color = f"C{k}"
                if points[0]["recall"] is None:
                    ax.axhline(points[0][key], color=color, linestyle="--", linewidth=1, label=LABELS[method])
                    continue
                xs = [r["recall"] for r in points]
                errors = [0 if math.isnan(r[key + "_ci"]) else r[key + "_ci"] for r in points]
                ax.errorbar(xs, [r[key] for r in points], yerr=errors, marker="o", capsize=3, color=color,
                            label=LABELS[method])  # fmt: skip
            ax.set_title(f"{size}: {title}", fontsize=10)
            ax.set_xlabel("label recall (fraction of English training stories labelled)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, "Two-language unlearning v2 (95% intervals over seeds)", path)


def render(results_dir: Path, out: Path, command: str) -> list[Path]:
    """Write the table (``.md``, ``.json``) and plot (``.png``) from the committed runs; return the files."""
    runs = load(results_dir)
    if not runs:
        return []
    rows, comparisons = collect(runs), compare(runs)
    files = [out.with_suffix(".md"), out.with_suffix(".json"), out.with_suffix(".png")]
    files[0].write_text(table(rows, comparisons, runs, command))
    files[1].write_text(json.dumps({"rows": rows, "comparisons": comparisons}, indent=1))
    plot(rows, files[2])
    return files


def phase_cells(phases: list[int], seeds: list[int]) -> Iterator[tuple[int, list[Cell]]]:
    for number, cells in plan(seeds):
        if number in phases:
            yield number, cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "two_language_v2")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "two_language_v2")
    parser.add_argument("--render-only", action="store_true", help="only render the table and plot")
    parser.add_argument("--no-commit", action="store_true", help="run without committing (results stay uncommitted)")
    args = parser.parse_args(argv)
    command = "python benchmarks/two_language_v2_sweep.py --render-only"
    if not args.render_only:
        for number, cells in phase_cells(args.phases, args.seeds):
            for cell in cells:
                try:
                    run_cell(cell, args.runs_dir, args.results_dir, do_commit=not args.no_commit)
                except subprocess.CalledProcessError:  # go on with the next cell; a rerun retries this one
                    print(f"{cell.name}: FAILED, see {args.runs_dir / cell.name / 'log.txt'}", flush=True)
            files = render(args.results_dir, args.out, command)
            if files and not args.no_commit:
                commit(files, f"two-language v2 sweep: table and plot after phase {number}, from the committed runs")
    else:
        files = render(args.results_dir, args.out, command)
        print("\n".join(str(f) for f in files) or "no committed runs yet")


if __name__ == "__main__":
    main()
