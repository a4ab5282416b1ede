"""CSV manifests: a header row with ``path`` and optionally ``label`` and ``split`` (other columns ignored).

Paths are relative to the CSV's folder (absolute paths are kept). Labels are class names or integer
indices (see `encode_labels`); a manifest without a label column, or with every label blank, is
unlabelled. Split values: train/training, val/valid/validation, test/testing, or blank (unassigned).
Ids are the paths as written (POSIX separators). A folder holding exactly one such CSV may be passed.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from samadapt.data.dataset import ImageDataset
from samadapt.data.images import read_image
from samadapt.data.labels import encode_labels
from samadapt.data.splits import SPLITS, normalize_split
from samadapt.errors import DataError


def read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header (lower-cased) and (line number, row) pairs of a CSV file; blank lines skipped."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's byte-order mark
            reader = csv.DictReader(handle)
            header = [name.strip().lower() for name in reader.fieldnames or []]
            reader.fieldnames = header
            rows = []
            for row in reader:
                if None in row:  # DictReader puts cells beyond the header under the key None
                    raise DataError(
                        f"{path}: line {reader.line_num} has {len(header) + len(row[None])} cells but the header "
                        f"has {len(header)}"
                    )
                if any((v or "").strip() for v in row.values()):
                    rows.append((reader.line_num, row))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: cannot read CSV: {error}") from error
    return header, rows


def manifest_csvs(folder: Path) -> list[Path]:
    """CSV files directly inside ``folder`` whose header has a ``path`` column."""
    found = []
    for csv_path in sorted(folder.glob("*.csv")):
        try:
            with csv_path.open(newline="", encoding="utf-8-sig") as handle:
                # The csv module, as read_csv_rows uses: a quoted header ("path","label") must be found too.
                header = [name.strip().lower() for name in next(csv.reader(handle), [])]
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        if "path" in header:
            found.append(csv_path)
    return found


def read_manifest(
    path: Path, *, size_hint: int | None = None, class_names: Sequence[str] | None = None
) -> ImageDataset:
    """A dataset listed by a CSV manifest ``path,label[,split]`` (or a folder holding exactly one)."""
    if path.is_dir():
        found = manifest_csvs(path)
        if len(found) != 1:
            names = [f.name for f in found]
            raise DataError(
                f"{path}: expected one CSV manifest with a path column, found {len(found)} {names}"
            )
        path = found[0]
    header, rows = read_csv_rows(path)
    if "path" not in header:
        raise DataError(f"{path}: expected a header row with columns path,label[,split]; found {header}")
    if not rows:
        raise DataError(f"{path}: manifest lists no images")
    blank = [line for line, row in rows if not (row.get("path") or "").strip()]
    if blank:
        raise DataError(f"{path}: empty path on line(s) {blank[:5]}")
    written = [row["path"].strip().replace("\\", "/") for _, row in rows]
    files = [path.parent / w for w in written]  # an absolute w replaces the folder
    missing = [w for w, f in zip(written, files) if not f.is_file()]
    if missing:
        raise DataError(f"{path}: {len(missing)} listed image(s) do not exist, first: {missing[:5]}")

    labels, names = None, []
    raw = [(row.get("label") or "").strip() for _, row in rows]
    if "label" in header and any(raw):
        unlabelled = [line for (line, _), value in zip(rows, raw) if not value]
        if unlabelled:
            raise DataError(f"{path}: empty label on line(s) {unlabelled[:5]} (label all rows or none)")
        labels, names = encode_labels(raw, class_names=class_names, source=path)
    elif class_names is not None:
        names = list(class_names)

    splits = [normalize_split(row.get("split") or "") for _, row in rows]
    bad = [(line, s) for (line, _), s in zip(rows, splits) if s is not None and s not in SPLITS]
    if bad:
        raise DataError(
            f"{path}: unknown split value(s) {bad[:5]} (line, value); expected train, val or test"
        )
    return ImageDataset(
        ids=[str(PurePosixPath(w)) for w in written],
        labels=labels,
        splits=splits,
        class_names=names,
        source=path,
        format="manifest",
        locators=files,
        load=functools.partial(read_image, size_hint=size_hint),
        paths=files,
    )
