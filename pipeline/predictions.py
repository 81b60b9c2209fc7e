"""Reading a predictions dataset written by ``score`` back, as text for a terminal or a pipe.

``score --format table|csv|jsonl`` prints what it wrote, for "what digit is this?" runs on
a few files and for shell pipelines; the parquet dataset stays the output of record.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

TextFormat = Literal["table", "csv", "jsonl"]
#: The columns of the table format (the others are in csv and jsonl).
TABLE_COLUMNS = ("prediction", "probability", "status")


def read_predictions(folder: Path) -> list[dict[str, Any]]:
    """Every row of a predictions dataset, in input order, as plain Python values."""
    table = pq.read_table(Path(folder))
    return table.to_pylist()


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def format_predictions(folder: Path, *, fmt: TextFormat) -> str:
    """The predictions in ``folder`` as text: an aligned ``table`` (id, prediction,
    probability, status), ``csv`` with every column and a header, or ``jsonl``."""
    rows = read_predictions(folder)
    names = pq.read_schema(next(iter(sorted(Path(folder).glob("*.parquet"))))).names
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(names)
        writer.writerows([[_text(r[n]) for n in names] for r in rows])
        return buf.getvalue()
    columns = [names[0], *TABLE_COLUMNS]
    cells = [columns, *([_text(r[c]) for c in columns] for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in cells
    )
