"""A self-contained report.html: headline metrics, tables and PNG figures embedded as base64 (no external files)."""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from samadapt.utils.atomic import atomic_write_text

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3} figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figcaption{font-size:.85em;color:#555} img{max-width:520px;border:1px solid #eee} .note{color:#555;font-size:.9em}
"""


def write_html_report(
    path: str | os.PathLike[str],
    *,
    title: str,
    summary: dict[str, Any] | None = None,
    tables: Sequence[tuple[str, Sequence[dict[str, Any]]]] = (),
    figures: Sequence[tuple[str, str | os.PathLike[str]]] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Write one HTML page: `summary` as a key/value table, `tables` as (heading, rows), `figures` as
    (caption, PNG path) embedded as base64 data URIs (missing files are listed, not fatal), `notes` as paragraphs.
    Nested dicts in `summary` (e.g. {"test": {"auc": ...}}) become one column per inner key.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{_e(title)}</h1>"]  # fmt: skip
    for note in notes:
        parts.append(f"<p class='note'>{_e(note)}</p>")
    if summary:
        parts.append("<h2>Summary</h2>" + _summary_table(summary))
    for heading, rows in tables:
        parts.append(f"<h2>{_e(heading)}</h2>" + _rows_table(rows))
    if figures:
        parts.append("<h2>Figures</h2>")
        for caption, png in figures:
            png = Path(png)
            if not png.is_file():
                parts.append(f"<p class='note'>missing figure: {_e(png.name)}</p>")
                continue
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            parts.append(
                f"<figure><img alt='{_e(caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{_e(caption)}</figcaption></figure>"
            )
    parts.append("</body></html>\n")
    atomic_write_text(path, "\n".join(parts))
    return Path(path)


def _summary_table(summary: dict[str, Any]) -> str:
    nested = {k: v for k, v in summary.items() if isinstance(v, dict)}
    flat = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    out = ""
    if nested:
        columns = list(dict.fromkeys(inner for d in nested.values() for inner in d))
        rows = [{"": name, **d} for name, d in nested.items()]
        out += _rows_table(rows, columns=["", *columns])
    if flat:
        out += _rows_table([{"key": k, "value": v} for k, v in flat.items()])
    return out


def _rows_table(rows: Sequence[dict[str, Any]], *, columns: Sequence[str] | None = None) -> str:
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(_fmt(row.get(c)))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)
