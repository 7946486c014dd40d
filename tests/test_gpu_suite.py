"""The GPU suite's code path, on the CPU with a tiny model (the suite itself runs on a GPU; no test needs one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).parents[1] / "benchmarks" / "gpu_suite.py"


def test_the_gpu_suite_runs_every_cell_on_cpu_and_records_each_variant(tmp_path: Path) -> None:
    command = [sys.executable, str(SUITE), "--device", "cpu", "--tiny", "--backend", "aot_eager", "--repeats", "2",
               "--warmup", "1", "--out", str(tmp_path), "--name", "suite"]  # fmt: skip
    subprocess.run(command, check=True, timeout=300, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = json.loads((tmp_path / "suite.json").read_text())
    cells = {(c["compile"], c["checkpointing"]): c for c in results["cells"]}
    assert set(cells) == {(False, False), (False, True), (True, False), (True, True)}
    for cell in cells.values():
        assert set(cell["variants"]) == {"unrouted", "activation", "parameter"}
        for name, variant in cell["variants"].items():
            # numbers, or the error the variant stopped with (recorded in the table, never dropped)
            assert "error" in variant or (variant["tokens_per_s"] > 0 and variant["step_seconds"]["n"] == 2), name
    eager = cells[(False, False)]["variants"]
    assert eager["activation"]["step_ratio_vs_unrouted"]["median"] > 0 and "error" not in eager["parameter"]
    table = (tmp_path / "suite.md").read_text()
    assert table.count("| off | off |") == 3 and "step / unrouted" in table
