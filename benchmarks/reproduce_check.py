"""Do the committed results still reproduce? Re-run one recipe per experiment, exactly as the sweep (or the recipe
README) that produced the committed file ran it, and compare the headline numbers with the committed ones.

    python benchmarks/reproduce_check.py                       # every check; writes benchmarks/results/reproduce_check.{md,json}
    python benchmarks/reproduce_check.py --checks cifar gridworld

Each check names the committed file and what it re-runs. Sweeps commit means over seeds: a check re-runs every seed
of the row when that is cheap (``two_language``: three 1-minute runs), otherwise one seed of a two-seed row, which
must then be one of the two values the committed mean ``m`` and spread give back (``m ± s / sqrt(2)`` from the sample
std ``s``, ``m ± sem`` from the standard error). A value reproduces when it is within 1e-4 of the committed one,
relative: seeded single-threaded runs repeat bit for bit on one machine, but float rounding differs between CPUs
(and the committed sweeps ran on other machines), which moves a loss in its 6th digit and the lowest loss of a
retraining attack in its 5th. Differences of a method (seed-to-seed spreads of 0.01-0.1 here) are far larger.

Runs go to ``runs/reproduce_check/`` (a run whose ``results.json`` is there is not trained again).

``--baseline-runs DIR`` also compares every value of each re-run's ``results.json`` (timings excepted) with the
run of the same name under ``DIR``, e.g. the same checks run with an earlier version of the code, and reports
whether they are bit-identical: that separates what a code change did from what the machine did. Lightning-gradroute
0.2 (commit 4ddd73a) ran them so::

    git worktree add /tmp/v0.2 4ddd73a && cd /tmp/v0.2
    export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/v0.2
    python -m lightning_gradroute.cli fit --config recipes/two_language/plain.yaml --seed_everything=0 \
        --data.init_args.seed=0 --data.init_args.recall=1.0 --trainer.logger=false \
        --trainer.default_root_dir=/tmp/baseline/two_language_plain_s0
    python -c "import sys; sys.path.insert(0, 'benchmarks'); import cifar_sweep, tinystories_sweep; \
        from pathlib import Path as P; cifar_sweep.train('balanced', 0.03, 0, P('/tmp/baseline/cifar'), []); \
        tinystories_sweep.run_one('era', 1.0, 0, P('/tmp/baseline'), [], P('recipes/tinystories'))"
    python benchmarks/gridworld_sweep.py --methods routed_moe --oversight 0.003 --seeds 0 \
        --runs-dir /tmp/baseline/gridworld --out /tmp/baseline/out
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cifar_sweep  # noqa: E402
import gridworld_sweep  # noqa: E402
import tinystories_sweep  # noqa: E402
import two_language_sweep  # noqa: E402
from recipe_run import ROOT, run_recipe  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TOLERANCE = 1e-4  # relative

#: one comparison: (what, committed value or the candidates a single seed may take, re-run value)
Comparison = tuple[str, list[float], float]


def _row(path: Path, **match: Any) -> dict[str, Any]:
    rows = json.loads(path.read_text())["rows"]
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    if len(found) != 1:
        raise ValueError(f"{path.name}: {len(found)} rows match {match}")
    return found[0]


def check_two_language(runs: Path) -> tuple[str, str, list[Comparison]]:
    """Plain training at recall 1, seeds 0 1 2, against ``two_language_sweep.json``'s row (all three seeds)."""
    recipes = ROOT / "recipes" / "two_language"
    by_seed = {}
    for seed in (0, 1, 2):
        arguments = [f"--seed_everything={seed}", f"--data.init_args.seed={seed}", "--data.init_args.recall=1.0"]
        by_seed[seed] = run_recipe([recipes / "plain.yaml"], runs / f"two_language_plain_s{seed}", arguments)
    row = two_language_sweep.collect({("plain", 1.0): by_seed})[0]
    committed = _row(RESULTS / "two_language_sweep.json", method="plain", recall=1.0)
    keys = ("retain", "forget_before", "forget", "attacked")
    return ("two_language_sweep.json (plain, recall 1, seeds 0 1 2: mean)", "recipes/two_language/plain.yaml",
            [(k, [committed[k]], row[k]) for k in keys])  # fmt: skip


def _one_of_two(mean: float, spread: float) -> list[float]:
    return [mean - spread, mean + spread]


def check_tinystories(runs: Path) -> tuple[str, str, list[Comparison]]:
    """ERA at oversight 1, seed 0, against one of the two seeds of ``tinystories_sweep.json``'s row."""
    result = tinystories_sweep.run_one("era", 1.0, 0, runs, [], ROOT / "recipes" / "tinystories")
    committed = _row(RESULTS / "tinystories_sweep.json", method="era", oversight=1.0)
    out = []
    for key, _, get in tinystories_sweep.METRICS:
        out.append((key, _one_of_two(committed[key], committed[key + "_std"] / math.sqrt(2)), get(result)))
    return "tinystories_sweep.json (era, oversight 1, seed 0 of seeds 0 1)", "recipes/tinystories/era.yaml", out


def check_gridworld(runs: Path) -> tuple[str, str, list[Comparison]]:
    """The routed mixture of experts at oversight 0.003, seed 0, against one of the two seeds of its row."""
    args = argparse.Namespace(runs_dir=runs / "gridworld", recipes=ROOT / "recipes" / "gridworld", recipe_suffix="",
                              set=[])  # fmt: skip
    result = gridworld_sweep.run_one("routed_moe", 0.003, 0, 800, args)
    committed = _row(RESULTS / "gridworld_sweep.json", method="routed_moe", oversight=0.003)
    out = []
    for key in ("true_return", "diamond_rate", "ghost_rate"):
        out.append((key, _one_of_two(committed[key], committed[key + "_sem"]), gridworld_sweep.headline(result, key)))
    return "gridworld_sweep.json (routed_moe, oversight 0.003, seed 0 of seeds 0 1)", "recipes/gridworld/routed_moe.yaml", out


def check_cifar(runs: Path) -> tuple[str, str, list[Comparison]]:
    """The balanced split at the recipe's L1 weight 0.03, seed 0 (the sweep ran one seed), every group accuracy."""
    result = cifar_sweep.train("balanced", 0.03, 0, runs / "cifar", [])
    committed = json.loads((RESULTS / "cifar_sweep.json").read_text())["runs"]["balanced"]["l1_0.03"]
    out = []
    for head, values in committed["accuracy_by_group"].items():
        for group, value in enumerate(values):
            out.append((f"{head} accuracy, group {group}", [value], result["accuracy_by_group"][head][group]))
    return "cifar_sweep.json (balanced, l1 0.03, seed 0)", "recipes/cifar/split.yaml", out


def check_steering(runs: Path) -> tuple[str, str, list[Comparison]]:
    """The routed steering recipe (seed 0, its defaults) against ``recipes/steering/results/lily/results.json``."""
    result = run_recipe([ROOT / "recipes" / "steering" / "lily.yaml"], runs / "steering_lily", [])
    committed = json.loads((ROOT / "recipes" / "steering" / "results" / "lily" / "results.json").read_text())

    def leaves(value: Any, path: str = "") -> dict[str, float]:
        if isinstance(value, list):
            value = {str(i): sub for i, sub in enumerate(value)}
        if isinstance(value, dict):
            return {k: v for key, sub in value.items() for k, v in leaves(sub, f"{path}.{key}" if path else key).items()}
        return {path: float(value)} if isinstance(value, (int, float)) and not isinstance(value, bool) else {}

    ours = leaves({k: result[k] for k in ("held_out_loss", "absorption")})
    theirs = leaves({k: committed[k] for k in ("held_out_loss", "absorption")})
    return ("recipes/steering/results/lily/results.json (seed 0)", "recipes/steering/lily.yaml",
            [(k, [theirs[k]], ours[k]) for k in sorted(theirs) if k in ours])  # fmt: skip


#: The run directories (under ``--runs-dir``) each check trains, for ``--baseline-runs``.
RUN_DIRS = {
    "two_language": ["two_language_plain_s0", "two_language_plain_s1", "two_language_plain_s2"],
    "cifar": ["cifar/balanced/l1_0.03"],
    "gridworld": ["gridworld/routed_moe_p0.003_s0"],
    "tinystories": ["era_p1_s0"],
    "steering": ["steering_lily"],
}


def _numbers(value: Any, path: str = "") -> dict[str, float]:
    """Every number in a results.json, by its key path; timings (keys with "seconds") left out."""
    if isinstance(value, list):
        value = {str(i): sub for i, sub in enumerate(value)}
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() if "seconds" not in str(key)
                for k, v in _numbers(sub, f"{path}.{key}" if path else str(key)).items()}  # fmt: skip
    return {path: float(value)} if isinstance(value, (int, float)) and not isinstance(value, bool) else {}


def against_baseline(name: str, runs: Path, baseline: Path) -> dict[str, Any] | None:
    """Compare the runs of check ``name`` with those of the same name under ``baseline`` (None if it has none)."""
    compared, different, largest = 0, [], 0.0
    for run in RUN_DIRS[name]:
        if not (baseline / run / "results.json").exists():
            return None
        ours = _numbers(json.loads((runs / run / "results.json").read_text()))
        theirs = _numbers(json.loads((baseline / run / "results.json").read_text()))
        for key in sorted(set(ours) & set(theirs)):
            compared += 1
            if ours[key] != theirs[key]:
                different.append(f"{run}:{key}")
                largest = max(largest, abs(ours[key] - theirs[key]))
    return {"values_compared": compared, "values_different": len(different), "largest_difference": largest,
            "first_different": different[:5]}  # fmt: skip


CHECKS: dict[str, Callable[[Path], tuple[str, str, list[Comparison]]]] = {
    "two_language": check_two_language,
    "cifar": check_cifar,
    "gridworld": check_gridworld,
    "tinystories": check_tinystories,
    "steering": check_steering,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "reproduce_check")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--baseline-runs", type=Path, default=None, help="runs of another code version to compare")
    parser.add_argument("--baseline-name", default="lightning-gradroute 0.2 (4ddd73a)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out_json = args.out / "reproduce_check.json"
    report = json.loads(out_json.read_text()) if out_json.exists() else {}  # checks not re-run this time stay
    for name in args.checks:
        committed_file, recipe, comparisons = CHECKS[name](args.runs_dir)
        rows = [
            {"value": what, "committed": candidates, "rerun": value,
             "reproduces": any(abs(value - c) <= TOLERANCE * max(1.0, abs(c)) for c in candidates)}
            for what, candidates, value in comparisons
        ]  # fmt: skip
        report[name] = {"committed_file": committed_file, "recipe": recipe, "rows": rows,
                        "reproduces": all(r["reproduces"] for r in rows)}  # fmt: skip
        if args.baseline_runs is not None:
            report[name]["baseline"] = against_baseline(name, args.runs_dir, args.baseline_runs)
            report[name]["baseline_name"] = args.baseline_name
        print(f"{name}: {'reproduces' if report[name]['reproduces'] else 'DIFFERS'}", flush=True)
    lines = ["# Do the committed results reproduce?", "", "Produced by `python benchmarks/reproduce_check.py` "
             f"(tolerance {TOLERANCE:g} relative; see the script's docstring for how a single seed is checked "
             "against a two-seed mean).", ""]  # fmt: skip
    for name, check in report.items():
        verdict = "**reproduces**" if check["reproduces"] else "**differs**"
        lines += [f"## {name}: {verdict}", "", f"Re-ran `{check['recipe']}` against {check['committed_file']}.", "",
                  "| value | committed | re-run | difference | reproduces |", "|---|---|---|---|---|"]  # fmt: skip
        for r in check["rows"]:
            committed = " or ".join(f"{c:.6f}" for c in r["committed"])
            difference = min(abs(r["rerun"] - c) for c in r["committed"])
            lines.append(f"| {r['value']} | {committed} | {r['rerun']:.6f} | {difference:.1e} | "
                         f"{'yes' if r['reproduces'] else 'no'} |")
        base = check.get("baseline")
        if base is not None:
            same = "bit-identical" if base["values_different"] == 0 else (
                f"**{base['values_different']} differ** (largest {base['largest_difference']:.2e}; first: "
                f"{', '.join(base['first_different'])})")
            lines += ["", f"Against {check['baseline_name']} on the same machine: {base['values_compared']} values of "
                      f"results.json compared, {same}."]  # fmt: skip
        lines.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2))
    (args.out / "reproduce_check.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
