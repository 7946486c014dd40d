"""``benchmarks/tinystories_sweep.py``: the paper's three metrics, with each method's "before" (issue 21)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import tinystories_sweep  # noqa: E402


def run(pre: float, final: float, lowest: float, retain: float = 3.0) -> dict[str, Any]:
    return {
        "pre_ablation": {"forget": pre, "retain": retain},
        "final": {"forget": final, "retain": retain, "forget_tokens": 5.0},
        "attack": {"lowest_forget": lowest, "curves": {"forget_tokens": [5.0, 4.0]}},
        "train_seconds": 1.0,
        "evaluation_seconds": 1.0,
    }


def test_paper_metrics_use_the_methods_own_before_and_plain_training_for_filtering() -> None:
    base = run(pre=3.0, final=3.0, lowest=2.9)
    era = tinystories_sweep.paper_metrics("era", run(pre=2.8, final=3.5, lowest=3.1), base)
    assert era == pytest.approx({"unlearning": 0.7, "robust_unlearning": 0.3, "retain": 3.0})
    # data filtering was never trained on the labelled forget data: "before" is plain training of its seed
    filtering = tinystories_sweep.paper_metrics("data_filtering", run(pre=3.6, final=3.6, lowest=3.2), base)
    assert filtering == pytest.approx({"unlearning": 0.6, "robust_unlearning": 0.2, "retain": 3.0})
    assert tinystories_sweep.paper_metrics("token_filtering", run(3.6, 3.6, 3.2), None) is None


def test_rows_carry_paper_metrics_with_intervals_and_the_report_tables_them() -> None:
    runs = {
        ("base", 1.0): {0: run(3.0, 3.0, 2.9), 1: run(3.2, 3.2, 3.0)},
        ("era", 1.0): {0: run(2.8, 3.5, 3.1), 1: run(3.0, 3.9, 3.4)},
    }
    rows = tinystories_sweep.collect(runs)
    era = next(r for r in rows if r["method"] == "era")
    assert era["paper_unlearning"] == pytest.approx(0.8)
    assert era["paper_unlearning_ci"] == pytest.approx(12.706 * 0.1414213 / 2**0.5, rel=1e-4)
    text = tinystories_sweep.table(rows, "tiny", "cmd")
    assert "| ERA | 1 | +0.8000 ± " in text and "| unlearning | robust unlearning | retain loss |" in text
