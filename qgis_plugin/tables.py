"""Tables written by the algorithms as HTML (shown in QGIS's results viewer) or CSV, by extension."""
from __future__ import annotations

import csv
import html
import math
from pathlib import Path

from geochange.engine.atomic import atomic_path

TABLE_FILTER = "HTML files (*.html);;CSV files (*.csv)"
TABLE_SUFFIXES = (".html", ".htm", ".csv")


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_table(path: str | Path, title: str, header: list[str], rows: list[list], notes: list[str] = ()) -> Path:
    """Write ``rows`` under ``header``; HTML gets ``title`` and ``notes`` around the table, CSV only
    the header and rows (so that it opens as a table anywhere). Undefined numbers (NaN) stay empty."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".csv":
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows([[_cell(v) for v in row] for row in rows])
        else:
            head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            body = "\n".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
                             for row in rows)
            paragraphs = "\n".join(f"<p>{html.escape(n)}</p>" for n in notes)
            tmp.write_text(
                "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title>"
                "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 8px;"
                "text-align:left}</style></head>\n"
                f"<body><h2>{html.escape(title)}</h2>\n{paragraphs}\n"
                f"<table><tr>{head}</tr>\n{body}\n</table></body></html>\n", encoding="utf-8")
    return path


def flatten(value, prefix: str = "") -> list[list]:
    """Nested dicts as ``[dotted.key, value]`` rows; lists of scalars stay one cell."""
    if isinstance(value, dict) and (value or not prefix):
        rows = []
        for key, item in value.items():
            rows += flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return rows
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):  # e.g. a router's teachers
        return [row for i, item in enumerate(value) for row in flatten(item, f"{prefix}.{i}")]
    if isinstance(value, (list, dict)):  # a list of scalars, or an empty object
        return [[prefix, ", ".join(_cell(v) for v in value)]]
    return [[prefix, value]]
