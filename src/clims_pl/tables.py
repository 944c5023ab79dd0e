"""The one writer of the tables every stage prints: markdown rows, CSV text and the number formats they use."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Lines of a GitHub markdown table: the header, its ``|---|`` rule, one line per row (cells as ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def csv_text(rows: Sequence[Mapping[str, Any]], fields: Sequence[str] = ()) -> str:
    """CSV of ``rows`` (dicts, columns in the first row's key order); only the header ``fields`` when empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else list(fields))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def percent(fraction: float | None) -> str:
    """A fraction (0-1) as a percentage with two decimals; ``n/a`` when there is none."""
    return "n/a" if fraction is None else f"{100 * fraction:.2f}"


def fmt(value: Any, digits: int = 1) -> str:
    """A float with ``digits`` decimals, ``—`` for a missing one (None or NaN); anything else as ``str``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def dotted(record: Mapping[str, Any], key: str) -> Any:
    """``record[a][b]`` for the key ``"a.b"`` (results files nest their numbers); None where a part is missing."""
    value: Any = record
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value
