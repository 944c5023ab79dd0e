"""The one table writer every stage uses (tables.py): exact text, so stage reports stay byte-stable."""

from __future__ import annotations

import math

from clims_pl.tables import csv_text, fmt, markdown_table, percent


def test_markdown_table_lines() -> None:
    assert markdown_table(["a", "b"], [[1, "x"], [None, 2.5]]) == [
        "| a | b |",
        "|---|---|",
        "| 1 | x |",
        "| None | 2.5 |",
    ]
    assert markdown_table(["only"], []) == ["| only |", "|---|"]


def test_csv_text_columns_follow_the_first_row() -> None:
    rows = [{"metric": "mIoU", "ours": 70.8}, {"metric": "pseudo", "ours": math.nan}]
    assert csv_text(rows) == "metric,ours\r\nmIoU,70.8\r\npseudo,nan\r\n"
    assert csv_text([], ["metric"]) == "metric\r\n"  # an empty report still has its header


def test_number_formats() -> None:
    assert percent(0.70815) == "70.81" and percent(None) == "n/a"
    assert fmt(70.849) == "70.8" and fmt(0.15, 2) == "0.15" and fmt(0.123456, 4) == "0.1235"
    assert fmt(math.nan) == fmt(None) == "—"
    assert fmt("OTM+BTM") == "OTM+BTM" and fmt(3) == "3"
