"""Read CSV, TSV and JSONL tables with or without a header row, UTF-8 with or without a BOM.

Every row keeps the line it started on, so later checks can name file, line and field.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from qtune.errors import DataError

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclass(frozen=True, slots=True)
class Row:
    line: int
    fields: dict[str, object]


def table_format(path: str | Path) -> str:
    fmt = TABLE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise DataError(f"unsupported file type '{Path(path).suffix}'; use one of "
                        f"{', '.join(sorted(TABLE_FORMATS))}", path=str(path))
    return fmt


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path=str(path)) from None
    except IsADirectoryError:
        raise DataError("is a folder, expected a file", path=str(path)) from None
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = raw[:offset].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte {offset})", path=str(path), line=line) from None


def read_table(path: str | Path, columns: Sequence[str], *, header: bool | None = None) -> tuple[list[Row], list[str]]:
    """Rows of a table as dicts, and the column names in file order.

    `columns` are the names the caller needs. For CSV/TSV, `header=None` detects a header row:
    it is one when it contains any name in `columns` (a missing one is then reported by name);
    a file without one maps its columns to `columns` by position.
    """
    path = Path(path)
    fmt = table_format(path)
    text = _decode(path)
    rows, names = _read_jsonl(path, text) if fmt == "jsonl" else _read_delimited(path, text, fmt, columns, header)
    if not rows:
        raise DataError("no data rows", path=str(path))
    return rows, names


def iter_jsonl(path: Path, text: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line, object) for every non-blank line of a JSONL file (UTF-8, optional BOM)."""
    text = _decode(path) if text is None else text
    # Only "\n" ends a record: JSON strings may hold U+2028 and friends, which splitlines() splits on.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", path=str(path), line=lineno) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=str(path), line=lineno)
        yield lineno, obj


def required_text(fields: dict, name: str, path: str | Path, line: int, *, kind: str = "column") -> str:
    """The non-empty text under `name`; otherwise a DataError naming file, line and field."""
    if name not in fields:
        raise DataError(f"missing {kind}", path=str(path), line=line, field=name)
    value = fields[name]
    if not isinstance(value, str):
        raise DataError(f"expected text, got {type(value).__name__}", path=str(path), line=line, field=name)
    if not value.strip():
        raise DataError("empty text", path=str(path), line=line, field=name)
    return value


def label_text(fields: dict, name: str, path: str | Path, line: int) -> str:
    """A row's label as stripped text (JSONL integers become their decimal text); otherwise a
    DataError naming file, line and field."""
    if name not in fields:
        raise DataError("missing column", path=str(path), line=line, field=name)
    value = fields[name]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"label must be text or an integer, got {value!r}", path=str(path), line=line, field=name)
    return str(value).strip()


def _read_jsonl(path: Path, text: str) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    names: dict[str, None] = {}
    for lineno, obj in iter_jsonl(path, text):
        names.update(dict.fromkeys(obj))
        rows.append(Row(lineno, obj))
    return rows, list(names)


def _read_delimited(path: Path, text: str, fmt: str, columns: Sequence[str],
                    header: bool | None) -> tuple[list[Row], list[str]]:
    delimiter = "\t" if fmt == "tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    records: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for values in reader:
            if any(v.strip() for v in values):
                records.append((start, values))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"malformed {fmt.upper()} row: {e}", path=str(path), line=start) from None
    if not records:
        return [], []
    first = [v.strip() for v in records[0][1]]
    if header is None:
        header = any(c in first for c in columns)
    if header:
        names = first
        if len(set(names)) != len(names):
            raise DataError(f"duplicate column names in header: {names}", path=str(path), line=records[0][0])
        body = records[1:]
    else:
        names = list(columns) + [f"column{i + 1}" for i in range(len(columns), len(first))]
        body = records
    width = len(names)
    rows: list[Row] = []
    for lineno, values in body:
        if len(values) != width:
            raise DataError(f"expected {width} {fmt.upper()} fields, found {len(values)}",
                            path=str(path), line=lineno)
        rows.append(Row(lineno, dict(zip(names, values))))
    return rows, names


def write_rows_with(path: str | Path, rows: Sequence[Row], columns: Sequence[str], added: Sequence[dict]) -> int:
    """Write every input row (all its fields, in file order) with the `added` fields of its own,
    e.g. predictions; input columns of the same names are replaced, not repeated. Returns the count."""
    new = list(dict.fromkeys(k for fields in added for k in fields))
    out_rows = [{**row.fields, **fields} for row, fields in zip(rows, added)]
    write_table(path, out_rows, [*[c for c in columns if c not in new], *new])
    return len(out_rows)


def write_table(path: str | Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Write rows as CSV, TSV or JSONL (by extension), atomically."""
    from qtune.io import atomic_path, write_jsonl

    fmt = table_format(path)
    if fmt == "jsonl":
        write_jsonl(path, rows)
        return
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), delimiter="\t" if fmt == "tsv" else ",",
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
