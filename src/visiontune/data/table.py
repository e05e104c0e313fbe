"""Labels from CSV files: a path column and a label column (several labels per image with a delimiter).

Every row is checked before a run starts: a missing image, an unknown column, an empty label is
one line naming the CSV file and its row. torch is not imported here.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from visiontune import VisiontuneError


@dataclass(frozen=True)
class Columns:
    """Which columns hold what, and how a multi-label cell is divided."""

    path: str = "path"
    label: str = "label"
    delimiter: str | None = None  # e.g. "|": a multi-label table; None: one label per image


def read_rows(table: Path, image_root: Path, columns: Columns) -> list[tuple[str, tuple[str, ...]]]:
    """(image path, its labels) per row of `table`; image paths relative to `image_root`."""
    if not table.is_file():
        raise VisiontuneError(
            f"{table}: no such CSV file (data.*_csv). Give the path of a CSV with columns path,label."
        )
    with table.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel's byte-order mark
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for key, column in (("data.path_column", columns.path), ("data.label_column", columns.label)):
            if column not in header:
                raise VisiontuneError(
                    f"{table}: no column {column!r} ({key}); its columns are {', '.join(map(repr, header))}. "
                    f"Set {key}=<name> or rename the column."
                )
        rows = [_row(table, number, row, image_root, columns) for number, row in enumerate(reader, start=2)]
    if not rows:
        raise VisiontuneError(f"{table} has a header but no rows: list one image per row.")
    return rows


def _row(
    table: Path, number: int, row: dict, image_root: Path, columns: Columns
) -> tuple[str, tuple[str, ...]]:
    """One row checked; `number` is its line in the file (the header is line 1)."""
    where = f"{table} row {number}"
    cell = (row.get(columns.path) or "").strip()
    if not cell:
        raise VisiontuneError(f"{where}: empty {columns.path!r}: give each row an image path.")
    path = image_root / cell
    if not path.is_file():
        raise VisiontuneError(
            f"{where}: image {path} does not exist (paths are taken from data.image_root={image_root})."
        )
    text = (row.get(columns.label) or "").strip()
    labels = [text] if columns.delimiter is None else [p.strip() for p in text.split(columns.delimiter)]
    if not text or not all(labels):
        raise VisiontuneError(
            f"{where}: empty label for {cell}: give each image its label in column {columns.label!r}."
        )
    return str(path), tuple(dict.fromkeys(labels))


def read_tables(
    tables: dict[str, Path], image_root: Path, columns: Columns
) -> tuple[list[str], dict[str, list[tuple[str, object]]]]:
    """Class names (sorted; every label of the training table) and each table's samples. A label
    is a class index, or with a delimiter a sorted tuple of them."""
    rows = {split: read_rows(table, image_root, columns) for split, table in tables.items()}
    classes = sorted({label for _, labels in rows["train"] for label in labels})
    index = {name: i for i, name in enumerate(classes)}
    samples = {}
    for split, split_rows in rows.items():
        for number, (_, labels) in enumerate(split_rows, start=2):
            if unknown := [label for label in labels if label not in index]:
                raise VisiontuneError(
                    f"{tables[split]} row {number}: label {unknown[0]!r} is not in the training table "
                    f"{tables['train']}: a model cannot learn it. Fix the label or add training images of it."
                )
        samples[split] = [
            (path, tuple(sorted(index[x] for x in labels)) if columns.delimiter else index[labels[0]])
            for path, labels in split_rows
        ]
    return classes, samples
