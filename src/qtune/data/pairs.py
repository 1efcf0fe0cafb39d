"""Sentence pairs for semantic matching (AFQMC / LCQMC style)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from qtune.data.tables import Row, label_text, read_table, required_text
from qtune.errors import DataError
from qtune.records import Pair


def _text(row: Row, column: str, path: Path) -> str:
    return required_text(row.fields, column, path, row.line)


def _label_index(row: Row, column: str, labels: Sequence[str], path: Path) -> int:
    text = label_text(row.fields, column, path, row.line)
    if text not in labels:
        raise DataError(f"label {text!r} is not one of {list(labels)}", path=str(path), line=row.line, field=column)
    return list(labels).index(text)


def pairs_from_rows(rows: Sequence[Row], path: str | Path, *, text_columns: Sequence[str] = ("sentence1", "sentence2"),
                    label_column: str = "label", labels: Sequence[str] | None = ("0", "1")) -> list[Pair]:
    """Check and convert rows; `labels=None` reads unlabelled pairs (for prediction)."""
    path = Path(path)
    first, second = text_columns
    return [
        Pair(_text(row, first, path), _text(row, second, path),
             None if labels is None else _label_index(row, label_column, labels, path), row.line)
        for row in rows
    ]


def read_pairs(path: str | Path, *, text_columns: Sequence[str] = ("sentence1", "sentence2"),
               label_column: str = "label", labels: Sequence[str] | None = ("0", "1"),
               header: bool | None = None) -> list[Pair]:
    """Read a pair file; every problem is raised as a DataError naming file, line and field."""
    wanted = list(text_columns) + ([label_column] if labels is not None else [])
    rows, _ = read_table(path, wanted, header=header)
    return pairs_from_rows(rows, path, text_columns=text_columns, label_column=label_column, labels=labels)
