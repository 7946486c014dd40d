"""Every README table generated from a committed results file is exactly what that file gives (issue 21)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import readme_tables  # noqa: E402


@pytest.mark.parametrize("name", readme_tables.READMES)
def test_readme_tables_match_their_results_files(name: str) -> None:
    text = (ROOT / name).read_text()
    assert readme_tables.regenerate(text) == text, (
        f"{name}: a generated table differs from its results file; run `python benchmarks/readme_tables.py --write`"
    )


def test_the_readmes_carry_generated_tables() -> None:
    blocks = {name: len(readme_tables.BLOCK.findall((ROOT / name).read_text())) for name in readme_tables.READMES}
    recipes = ("cifar", "gridworld", "mnist", "steering", "tinystories", "token_unlearning")
    assert all(blocks[f"recipes/{r}/README.md"] for r in recipes), blocks


def test_a_changed_number_is_put_back_and_options_select_pivot_and_filter(tmp_path: Path) -> None:
    source = tmp_path / "results.md"
    source.write_text(
        "# r\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\ntext\n\n"
        "| method | level | value | other |\n|---|---|---|---|\n"
        "| x | 0.1 | +1 | 9 |\n| y | 0.1 | +2 | 9 |\n| x | 0.5 | +3 | 9 |\n"
    )
    marker = f'<!-- results: {source} table=2 where="level=0.1|0.5" pivot="level|method|value" -->\n'
    expected = marker + "| level | x | y |\n|---|---|---|\n| 0.1 | +1 | +2 |\n| 0.5 | +3 | — |\n<!-- /results -->"
    assert readme_tables.regenerate(marker + "| stale |\n<!-- /results -->") == expected
    assert readme_tables.regenerate(expected.replace("+3", "+4")) == expected
    columns = f'<!-- results: {source} table=2 where="method=y" columns="value|method" -->\n<!-- /results -->'
    assert readme_tables.regenerate(columns).splitlines()[1:4] == ["| value | method |", "|---|---|", "| +2 | y |"]
    with pytest.raises(ValueError, match="no column 'nope'"):
        readme_tables.build(f'{source} columns="nope"')
    with pytest.raises(ValueError, match="has 2 table"):
        readme_tables.build(f"{source} table=3")


def test_a_json_results_file_gives_rows_of_an_object_or_a_list(tmp_path: Path) -> None:
    source = tmp_path / "results.json"
    source.write_text(json.dumps({"stages": {"a": {"x": 0.123456, "y": {"z": 1}}, "b": {"x": -0.5, "y": {"z": 2}}},
                                  "runs": [{"x": 1.0}, {"x": 2.5}]}))
    assert readme_tables.build(f'{source} under=stages rows="b|a" label=stage columns="x|y.z"').splitlines() == [
        "| stage | x | y.z |", "|---|---|---|", "| b | -0.5 | 2 |", "| a | 0.123456 | 1 |"
    ]
    assert readme_tables.build(f'{source} under=runs columns="x" digits=2').splitlines()[2:] == ["| 1.00 |", "| 2.50 |"]
    with pytest.raises(ValueError, match="no 'y.w'"):
        readme_tables.build(f'{source} under=stages columns="y.w"')
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['table'\]"):
        readme_tables.build(f"{source} under=runs columns=x table=2")
