"""Shared by the benchmark scripts: one ``gradroute fit`` run in a subprocess, cached by its ``results.json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_recipe(configs: Sequence[Path], run_dir: Path, seed: int, extra: Sequence[str] = ()) -> dict:
    """Train ``gradroute fit --config c1 --config c2 ... --seed_everything seed <extra>`` into ``run_dir``.

    Returns the run's ``results.json``; a run whose ``results.json`` exists is not trained again. The run has no
    logger and no checkpoints, one thread unless ``OMP_NUM_THREADS`` says otherwise, its output in ``log.txt`` and
    its wall-clock and CPU seconds in ``seconds.json``.
    """
    results = run_dir / "results.json"
    if not results.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "lightning_gradroute.cli", "fit",
            *(arg for config in configs for arg in ("--config", str(config))),
            "--seed_everything", str(seed),
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run_dir),
            *extra,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        start = time.perf_counter()
        with open(run_dir / "log.txt", "w") as log:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(process.pid, 0)  # this child's own CPU time, unlike RUSAGE_CHILDREN
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(map(str, command))} failed; see {run_dir / 'log.txt'}")
        wall, cpu = time.perf_counter() - start, usage.ru_utime + usage.ru_stime
        (run_dir / "seconds.json").write_text(json.dumps({"wall": wall, "cpu": cpu}))
    return json.loads(results.read_text())


def run_seconds(run_dir: Path) -> dict[str, float]:
    """``{"wall": ..., "cpu": ...}`` of a run trained by :func:`run_recipe`."""
    return json.loads((run_dir / "seconds.json").read_text())
