"""Run one ``gradroute fit`` for a benchmark script: a subprocess with its command and output in a log file."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fit_logged(cli_args: list[str], run_dir: Path) -> float:
    """Run ``gradroute fit <cli_args>`` with this Python from the repository root, writing the command and
    everything it prints to ``<run_dir>/log.txt``; return the wall time in seconds.

    Raises:
        subprocess.CalledProcessError: the run failed (its log says why).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lightning_gradroute.cli", "fit", *cli_args]
    started = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.perf_counter() - started
