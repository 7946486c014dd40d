"""README tables generated from committed results files, so a README can never drift from its numbers.

    python benchmarks/readme_tables.py            # exit 1 and name every README table that differs from its file
    python benchmarks/readme_tables.py --write    # regenerate them in place

A generated table sits between two markers in a README (or any markdown file listed in ``READMES``)::

    <!-- results: benchmarks/results/cifar_sweep.md table=1 columns="run|main head on classes_0_4" -->
    | run | main head on classes_0_4 |
    |---|---|
    ...
    <!-- /results -->

The source is a committed results file (path relative to the repository root). A ``.md`` (what every sweep and
benchmark here writes beside its JSON, with the command in its header) gives one of its tables; options:

- ``table=N``: the N-th markdown table of the source (1-based; default 1);
- ``where="header=v1|v2"``: keep only the rows whose cell in that column is one of the values;
- ``columns="h1|h2"``: keep these columns, in this order (headers as in the source);
- ``pivot="row|column|value"``: one row per distinct ``row`` cell, one column per distinct ``column`` cell (in
  order of appearance), the ``value`` cells inside; a missing combination is ``—``.

Its cells are copied verbatim, never recomputed. A ``.json`` (a run's ``results.json``) gives a table of values:

- ``under="a.b"`` (required): the dotted path of an object (one row per key, the key first, under the header
  ``label="..."``, default ``key``) or of a list (one row per element);
- ``rows="k1|k2"``: the object's keys to show, in this order (default: all);
- ``columns="x|y.z"``: dotted paths inside each row's value, one column each (header: the path);
- ``digits=N``: print floats with N decimals (default: as JSON writes them).
``tests/test_readme_numbers.py`` asserts that regenerating every README gives exactly what is committed.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "benchmarks/README.md", "recipes/two_language/v2/README.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "recipes").glob("*/README.md") if p.parent.name != "two_language"
))
BLOCK = re.compile(r"(<!-- results: (?P<spec>.*?) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)

Table = list[list[str]]


def split_row(line: str) -> list[str]:
    """The cells of one markdown table row (``\\|`` inside a cell is kept as is)."""
    cells = re.split(r"(?<!\\)\|", line.strip())
    return [c.strip() for c in cells[1:-1]]


def tables_of(text: str) -> list[Table]:
    """Every markdown table in ``text``, header first, separator row dropped."""
    tables: list[Table] = []
    current: Table = []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            row = split_row(line)
            if not all(re.fullmatch(r":?-+:?", c) for c in row):
                current.append(row)
        elif current:
            tables.append(current)
            current = []
    return tables


def render(table: Table) -> str:
    header, *rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def column(table: Table, name: str, spec: str) -> int:
    if name not in table[0]:
        raise ValueError(f"{spec}: no column {name!r}; the table's columns are {table[0]}")
    return table[0].index(name)


def dig(value: Any, path: str, spec: str) -> Any:
    for key in path.split("."):
        if isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        elif isinstance(value, dict) and key in value:
            value = value[key]
        else:
            raise ValueError(f"{spec}: no {path!r} in the results file")
    return value


def json_table(path: str, opts: dict[str, str], spec: str) -> Table:
    """A table of the values under ``opts["under"]`` of a JSON results file (see the module docstring)."""
    under = dig(json.loads((ROOT / path).read_text()), opts["under"], spec)
    if isinstance(under, dict):
        keys = opts["rows"].split("|") if "rows" in opts else list(under)
        items = [([key], dig(under, key, spec)) for key in keys]
        header = [opts.get("label", "key")]
    else:
        items, header = [([], item) for item in under], []
    columns = opts["columns"].split("|")
    cell = lambda v: f"{v:.{opts['digits']}f}" if "digits" in opts and isinstance(v, float) else json.dumps(v)
    return [header + columns] + [first + [cell(dig(value, c, spec)) for c in columns] for first, value in items]


def build(spec: str) -> str:
    """The markdown table a marker's ``spec`` (``path key=value ...``) stands for."""
    path, *options = shlex.split(spec)
    opts = dict(o.split("=", 1) for o in options)
    is_json = path.endswith(".json")
    allowed = {"under", "rows", "columns", "label", "digits"} if is_json else {"table", "where", "columns", "pivot"}
    unknown = set(opts) - allowed
    if unknown:
        raise ValueError(f"{spec}: unknown option(s) {sorted(unknown)}")
    if is_json:
        return render(json_table(path, opts, spec))
    tables = tables_of((ROOT / path).read_text())
    index = int(opts.get("table", 1))
    if not 1 <= index <= len(tables):
        raise ValueError(f"{spec}: {path} has {len(tables)} table(s), not a table {index}")
    table = tables[index - 1]
    if "where" in opts:
        name, values = opts["where"].split("=", 1)
        at = column(table, name, spec)
        table = [table[0]] + [r for r in table[1:] if r[at] in values.split("|")]
    if "pivot" in opts:
        row_name, col_name, value_name = opts["pivot"].split("|")
        r, c, v = (column(table, n, spec) for n in (row_name, col_name, value_name))
        keys = lambda i: list(dict.fromkeys(row[i] for row in table[1:]))
        cells = {(row[r], row[c]): row[v] for row in table[1:]}
        table = [[row_name, *keys(c)]] + [[k, *(cells.get((k, col), "—") for col in keys(c))] for k in keys(r)]
    if "columns" in opts:
        at = [column(table, n, spec) for n in opts["columns"].split("|")]
        table = [[row[i] for i in at] for row in table]
    return render(table)


def regenerate(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + build(m.group("spec")) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the READMEs' generated tables in place")
    args = parser.parse_args(argv)
    stale = []
    for name in READMES:
        path = ROOT / name
        text = path.read_text()
        new = regenerate(text)
        if new != text:
            stale.append(name)
            if args.write:
                path.write_text(new)
    verb = "rewrote" if args.write else "out of date with their results files"
    print(f"{verb}: {', '.join(stale)}" if stale else "every generated README table matches its results file")
    return 1 if stale and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
