"""Run one ``gradroute fit`` for a benchmark script (a subprocess with its command and output in a log file), and
the pieces every sweep's report shares: mean and std over seeds, the markdown header, the saved figure."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def fit_logged(cli_args: list[str], run_dir: Path) -> float:
    """Run ``gradroute fit <cli_args>`` with this Python from the repository root, writing the command and
    everything it prints to ``<run_dir>/log.txt``; return the wall time in seconds.

    Raises:
        subprocess.CalledProcessError: the run failed (its log says why).
    """
    return fit_timed(cli_args, run_dir)["wall"]


def fit_timed(cli_args: list[str], run_dir: Path, env: Mapping[str, str] | None = None) -> dict[str, float]:
    """:func:`fit_logged`, returning ``{"wall": ..., "cpu": ...}``: the wall time and the run's own CPU time
    (user + system of the child process; on a shared CPU wall time mostly measures waiting for a core).
    ``env`` replaces the subprocess's environment (default: this process's)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lightning_gradroute.cli", "fit", *cli_args]
    started = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own CPU time, unlike RUSAGE_CHILDREN
    if (code := os.waitstatus_to_exitcode(status)) != 0:
        raise subprocess.CalledProcessError(code, command)
    return {"wall": time.perf_counter() - started, "cpu": usage.ru_utime + usage.ru_stime}


def fit_cached(configs: Sequence[Path], run_dir: Path, seed: int, extra: Sequence[str] = ()) -> dict:
    """Train ``gradroute fit --config c1 --config c2 ... --seed_everything seed <extra>`` into ``run_dir``.

    Returns the run's ``results.json``; a run whose ``results.json`` exists is not trained again. The run has no
    logger and no checkpoints, one thread unless ``OMP_NUM_THREADS`` says otherwise, and its wall-clock and CPU
    seconds in ``seconds.json`` (:func:`fit_seconds`).
    """
    results = run_dir / "results.json"
    if not results.exists():
        cli_args = [
            *(arg for config in configs for arg in ("--config", str(config))),
            f"--seed_everything={seed}",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={run_dir}",
            *extra,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        seconds = fit_timed(cli_args, run_dir, env=env)
        (run_dir / "seconds.json").write_text(json.dumps(seconds))
    return json.loads(results.read_text())


def fit_seconds(run_dir: Path) -> dict[str, float]:
    """``{"wall": ..., "cpu": ...}`` of a run trained by :func:`fit_cached`."""
    return json.loads((run_dir / "seconds.json").read_text())


def run_recipe(configs: list[Path], run_dir: Path, arguments: list[str]) -> dict[str, Any]:
    """Run (or reuse) ``gradroute fit --config <configs...> <arguments>`` in ``run_dir`` (no logger) and return its
    results.json; the command and its output go to ``run_dir/log.txt``."""
    results = run_dir / "results.json"
    if not results.exists():
        cli_args = [arg for config in configs for arg in ("--config", str(config))]
        cli_args += [*arguments, f"--trainer.default_root_dir={run_dir}", "--trainer.logger=false"]
        print(f"{run_dir.name}: {fit_logged(cli_args, run_dir):6.1f} s", flush=True)
    return json.loads(results.read_text())


def summarise(values: list[float]) -> tuple[float, float]:
    """(mean, sample std; 0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


#: Two-sided 95% Student t quantiles by degrees of freedom (beyond the table: the normal 1.96).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, 95% t half-width; nan for one value)."""
    if len(values) < 2:
        return statistics.fmean(values), math.nan
    t = T95.get(len(values) - 1, 1.96)
    return statistics.fmean(values), t * statistics.stdev(values) / math.sqrt(len(values))


def report_header(title: str, command: str, scale: str) -> list[str]:
    """The first lines of a sweep's markdown report: title, the command that produced it, the scale."""
    return [f"# {title}", "", f"Command: `{command}`", "", f"Scale: {scale}", ""]


def save_figure(fig: Any, title: str, path: Path) -> None:
    """Give a matplotlib figure its (wrapped, small) title, save it to ``path`` and close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(textwrap.fill(title, 220), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def committed(path: Path) -> bool:
    """Whether ``path`` is tracked by git at HEAD (a finished, committed run); never outside the repository."""
    if not path.resolve().is_relative_to(ROOT):
        return False
    found = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"HEAD:{path.resolve().relative_to(ROOT)}"], capture_output=True
    )
    return found.returncode == 0


def commit(paths: list[Path], message: str) -> None:
    """Commit exactly ``paths`` (whatever else is staged or changed in the worktree stays out)."""
    relative = [str(p.relative_to(ROOT)) for p in paths]
    subprocess.run(["git", "-C", str(ROOT), "add", "--", *relative], check=True)
    unchanged = subprocess.run(["git", "-C", str(ROOT), "diff", "--cached", "--quiet", "--", *relative])
    if unchanged.returncode == 0:  # a resumed sweep re-renders a phase it already committed
        return
    subprocess.run(["git", "-C", str(ROOT), "commit", "-q", "-m", message, "--", *relative], check=True)
