"""Result tables: CSV rows written atomically, mean +- std aggregation, markdown rendering."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samadapt.utils.atomic import atomic_write_text


def write_csv_rows(
    path: str | os.PathLike[str], rows: Sequence[dict[str, Any]], *, columns: Sequence[str] | None = None
) -> Path:
    """Write dict rows as CSV (columns: given, or the union of keys in first-seen order); atomic."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


def read_csv_rows(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def mean_std_rows(
    rows: Sequence[dict[str, Any]], *, group_by: Sequence[str], metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per distinct `group_by` tuple with `n` and `<metric>_mean`, `<metric>_std` (population std, NaNs skipped)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in group_by), []).append(row)
    out = []
    for key in sorted(groups, key=lambda t: tuple(_sort_key(v) for v in t)):
        members = groups[key]
        agg: dict[str, Any] = dict(zip(group_by, key))
        agg["n"] = len(members)
        for metric in metrics:
            values = np.array([_float(m.get(metric)) for m in members], dtype=float)
            values = values[~np.isnan(values)]
            agg[f"{metric}_mean"] = float(values.mean()) if values.size else math.nan
            agg[f"{metric}_std"] = float(values.std()) if values.size else math.nan
        out.append(agg)
    return out


def mean_std_markdown(
    rows: Sequence[dict[str, Any]], *, group_by: Sequence[str], metrics: Sequence[str], digits: int = 3
) -> str:
    """Markdown table with one `mean ± std` cell per metric, grouped by `group_by`."""
    table = []
    for agg in mean_std_rows(rows, group_by=group_by, metrics=metrics):
        cells = {k: agg[k] for k in group_by}
        cells["n"] = agg["n"]
        for metric in metrics:
            mean, std = agg[f"{metric}_mean"], agg[f"{metric}_std"]
            cells[metric] = "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"
        table.append(cells)
    return markdown_table(table, columns=[*group_by, "n", *metrics])


def markdown_table(rows: Sequence[dict[str, Any]], *, columns: Sequence[str] | None = None) -> str:
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(_cell(row.get(c))) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _sort_key(value: Any) -> tuple[int, Any]:
    number = _float(value)
    return (0, number) if not math.isnan(number) else (1, str(value))
