"""Labelled and unlabelled texts for single-text classification (`text,label` rows).

Every problem is a `DataError` naming file, line and field, raised while reading, so bad data is
refused before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from qtune.data.tables import Row, label_text, read_table, required_text
from qtune.errors import DataError


@dataclass(frozen=True, slots=True)
class TextExample:
    """One text and, for training and evaluation, the index of its label."""

    text: str
    label: int | None = None
    # Where the row came from, for error messages downstream.
    line: int | None = None


def label_value(row: Row, column: str, path: str | Path) -> str:
    """The label of a row as non-empty text (JSONL integers become their decimal text)."""
    text = label_text(row.fields, column, path, row.line)
    if not text:
        raise DataError("empty label", path=str(path), line=row.line, field=column)
    return text


def check_labels(labels: Sequence[str], source: str = "labels") -> list[str]:
    """A usable label set: at least two distinct, non-empty labels."""
    labels = [str(label).strip() for label in labels]
    if any(not label for label in labels):
        raise DataError(f"{source}: a label is empty")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise DataError(f"{source}: labels repeated: {repeated}")
    if len(labels) < 2:
        raise DataError(f"{source}: a classifier needs at least two labels, got {labels}")
    return labels


def examples_from_rows(rows: Sequence[Row], path: str | Path, *, text_column: str = "text",
                       label_column: str = "label", labels: Sequence[str] | None) -> list[TextExample]:
    """Check and convert rows; `labels=None` reads unlabelled texts (for prediction). `path` is kept
    as given: a hub dataset (`hf://datasets/...`) is not a local path."""
    index = None if labels is None else {label: i for i, label in enumerate(labels)}
    examples = []
    for row in rows:
        text = required_text(row.fields, text_column, path, row.line)
        label = None
        if index is not None:
            value = label_value(row, label_column, path)
            if value not in index:
                raise DataError(f"label {value!r} is not one of {list(labels)}", path=str(path), line=row.line,
                                field=label_column)
            label = index[value]
        examples.append(TextExample(text, label, row.line))
    return examples


def read_texts(path: str | Path, *, text_column: str = "text") -> tuple[list[Row], list[str], list[TextExample]]:
    """An unlabelled file: its rows (every field kept, for prediction output), its column names
    in file order, and the rows' texts."""
    rows, names = read_table(path, [text_column])
    return rows, names, examples_from_rows(rows, path, text_column=text_column, labels=None)


def read_labelled(path: str | Path, *, text_column: str = "text", label_column: str = "label",
                  labels: Sequence[str] | None = None) -> tuple[list[TextExample], list[str]]:
    """A labelled file and its label set: `labels` in that class order (any other label is an
    error), or with `labels=None` the sorted set of labels the file holds."""
    rows, _ = read_table(path, [text_column, label_column])
    if labels is None:
        found = set()
        for row in rows:  # row by row, so the first bad row is the one reported
            required_text(row.fields, text_column, path, row.line)
            found.add(label_value(row, label_column, path))
        if len(found) < 2:
            raise DataError(f"a classifier needs at least two labels; the file has only {sorted(found)}",
                            path=str(path), field=label_column)
        labels = sorted(found)
    else:
        labels = check_labels(labels)
    examples = examples_from_rows(rows, path, text_column=text_column, label_column=label_column, labels=labels)
    return examples, list(labels)
