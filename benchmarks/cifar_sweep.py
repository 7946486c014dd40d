"""CIFAR representation splitting over the L1 weight, balanced (two groups of 5 classes) and imbalanced (one class).

For each setting it trains the routed recipe at every L1 weight and its control (no routing, no L1), each as
``gradroute fit --config recipes/cifar/<recipe>.yaml --seed_everything S --model.init_args.l1_weight W`` in a
subprocess, and writes the per-group test accuracy of the main head and of each certificate as a table and a
figure:

    python benchmarks/cifar_sweep.py                    # writes benchmarks/results/cifar_sweep.{md,json,png}

The question the imbalanced setting asks (the paper's authors, in its discussion): does routing only a small
fraction of classes, the others training as normal, need less regularisation to split the representation?
``--epochs`` overrides the recipes' epoch count; extra ``gradroute`` arguments go after ``--``.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from matplotlib.figure import Figure
from recipe_run import ROOT, fit_cached, fit_seconds

RECIPES = ROOT / "recipes" / "cifar"
#: setting -> (routed recipe, control recipe)
SETTINGS = {"balanced": ("split.yaml", "control.yaml"), "imbalanced": ("imbalance.yaml", "imbalance_control.yaml")}


def train(setting: str, l1: float | None, seed: int, runs_dir: Path, extra: list[str]) -> dict:
    """One run: the routed recipe at L1 weight ``l1``, or the control when ``l1`` is None."""
    routed, control = SETTINGS[setting]
    name = "control" if l1 is None else f"l1_{l1:g}"
    overrides = [] if l1 is None else ["--model.init_args.l1_weight", str(l1)]
    return fit_cached(
        [RECIPES / (control if l1 is None else routed)], runs_dir / setting / name, seed, [*overrides, *extra]
    )


def table(setting: str, runs: dict[str, dict]) -> list[str]:
    """One row per run: the main head's and each certificate's mean accuracy on each class group."""
    first = next(iter(runs.values()))
    groups = [g["name"] for g in first["groups"]]
    outputs = {"decoder": "main head"}
    outputs |= {f"certificate_{c['certificate']}": f"cert. ch. {c['channels']}" for c in first["certificates"]}
    control = runs["control"]["accuracy_by_group"]["decoder"]
    header = ["run", *(f"{label} on {g}" for label in outputs.values() for g in groups), "main head − control"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in runs.items():
        by_group = result["accuracy_by_group"]
        cells = [f"{by_group[o][g]:.3f}" for o in outputs for g in range(len(groups))]
        cost = " / ".join(f"{a - c:+.3f}" for a, c in zip(by_group["decoder"], control))
        lines.append(f"| {setting} {name.replace('_', ' ')} | " + " | ".join(cells) + f" | {cost} |")
    return lines


def encoding_table(setting: str, runs: dict[str, dict]) -> list[str]:
    """One row per run: the mean |encoding| of each certificate's channel block on each group's test images."""
    first = next(iter(runs.values()))
    groups = [g["name"] for g in first["groups"]]
    blocks = first["mean_abs_encoding"]["channels"]
    header = ["run", *(f"ch. {b} on {g}" for b in blocks for g in groups)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in runs.items():
        magnitudes = result["mean_abs_encoding"]
        cells = [f"{magnitudes[g][b]:.3g}" for b in range(len(blocks)) for g in groups]
        lines.append(f"| {setting} {name.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return lines


def plot(sweeps: dict[str, dict[str, dict]], l1s: list[float]) -> Figure:
    """Per setting: each certificate's accuracy on each group against the L1 weight; dashed: the control."""
    figure = Figure(figsize=(5 * len(sweeps), 3.8), layout="constrained")
    for ax, (setting, runs) in zip(figure.subplots(1, len(sweeps), squeeze=False)[0], sweeps.items()):
        first = runs["control"]
        x = [l1 if l1 > 0 else l1s[1] / 3 for l1 in l1s]  # L1 = 0 drawn left of the smallest positive weight
        for c in first["certificates"]:
            for g, group in enumerate(first["groups"]):
                key = f"certificate_{c['certificate']}"
                values = [runs[f"l1_{l1:g}"]["accuracy_by_group"][key][g] for l1 in l1s]
                line = ax.plot(x, values, marker="o", label=f"cert. ch. {c['channels']} on {group['name']}")[0]
                ax.axhline(first["accuracy_by_group"][key][g], color=line.get_color(), linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{l1:g}" for l1 in l1s])
        ax.set_xlabel("L1 weight (dashed: control, no routing, no L1)")
        ax.set_ylabel("test accuracy (mean over classes)")
        ax.set_title(f"{setting}: {SETTINGS[setting][0]}")
        ax.legend(fontsize="x-small")
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--l1", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.1])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipes' max_epochs")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (each with OMP_NUM_THREADS=1)")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "cifar_sweep")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cifar_sweep.md")
    parser.add_argument("extra", nargs="*", help="extra gradroute arguments (after --)")
    args = parser.parse_args()
    if len(args.l1) < 2 or 0.0 not in args.l1:
        parser.error("--l1 needs 0 and at least one positive weight")
    l1s = sorted(args.l1)
    extra = list(args.extra) + (["--trainer.max_epochs", str(args.epochs)] if args.epochs else [])
    jobs = [(s, l1) for s in args.settings for l1 in [None, *l1s]]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: train(*job, args.seed, args.runs_dir, extra), jobs))
    sweeps: dict[str, dict[str, dict]] = {}
    for (setting, l1), result in zip(jobs, results):
        sweeps.setdefault(setting, {})["control" if l1 is None else f"l1_{l1:g}"] = result
    seconds = [fit_seconds(args.runs_dir / s / ("control" if l1 is None else f"l1_{l1:g}")) for s, l1 in jobs]
    scale = results[0]["scale"]
    command = "python benchmarks/cifar_sweep.py" + (f" --epochs {args.epochs}" if args.epochs else "")
    command += f" --l1 {' '.join(f'{x:g}' for x in l1s)} --settings {' '.join(args.settings)} --seed {args.seed}"
    command += f" --jobs {args.jobs}" + (f" -- {' '.join(args.extra)}" if args.extra else "")
    lines = [
        "# CIFAR representation splitting over the L1 weight, balanced and imbalanced",
        "",
        f"Produced by `{command}`.",
        "",
        (
            f"Scale: {scale['dataset']} (the carried subset: 2,000 training and 500 test images per class), "
            f"{scale['epochs']} epochs, {scale['steps']} steps of batch {scale['batch_size']}, ResNet widths "
            f"{scale['widths']}, blocks {scale['blocks']}, cut after block {scale['split_at']}, seed {args.seed}, "
            f"{scale['test_images']} test images. Each run used {min(t['cpu'] for t in seconds):.0f}-"
            f"{max(t['cpu'] for t in seconds):.0f} s of CPU time and {min(t['wall'] for t in seconds):.0f}-"
            f"{max(t['wall'] for t in seconds):.0f} s of wall-clock time ({args.jobs} at a time, one thread each, on "
            "a 2-core CPU shared with other work)."
        ),
        "",
        (
            "Metric: top-1 test accuracy (model in eval mode), mean over the classes of a group. Routed runs use the "
            "routed recipe with the given L1 weight; the control recipe has no routing and no L1. Certificate *c* "
            "reads encoding channels *c* (detached); the routing sends group *c*'s gradient only into them (the "
            "imbalanced setting's second group, the other nine classes, is not routed at all). The last column "
            "is the main head's accuracy minus the control's, per group."
        ),
        "",
    ]
    for setting, runs in sweeps.items():
        lines += [f"## {setting} (`recipes/cifar/{SETTINGS[setting][0]}`)", "", *table(setting, runs), ""]
        lines += [
            (
                "Mean |encoding| per channel and position of each certificate's block, on each group's test images "
                "(routing plus L1 should shrink a block on the groups routed away from it):"
            ),
            "",
            *encoding_table(setting, runs),
            "",
        ]
    figure_path = args.out.with_suffix(".png")
    lines += [f"![certificate accuracy against the L1 weight]({figure_path.name})", ""]
    lines.append("What these numbers say: `recipes/cifar/README.md`.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps({"command": command, "runs": sweeps, "seconds": seconds}, indent=1)
    )
    plot(sweeps, l1s).savefig(figure_path, dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
