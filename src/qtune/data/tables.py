"""Read CSV, TSV and JSONL tables with or without a header row, UTF-8 with or without a BOM, and
Parquet files, Hugging Face datasets folders and hub datasets (`qtune.data.sources`).

Every row keeps the line it started on (the data row's number, from 1, in a columnar source), so
later checks can name file, line and field.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from qtune.data.sources import COLUMNAR_TYPES, columnar_source, read_columnar, source_name
from qtune.errors import DataError

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
# What a column name in a header usually looks like: q1, text_a, query-id, Sentence.1
HEADER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:[-.][A-Za-z0-9_]+)*")
HEADER_NAME_MAX = 32
HEADER_CONTRAST_ROWS = 20  # rows after the first that may show it is unlike the data
# Han characters and CJK punctuation (full-width forms included): what a Chinese GBK file decodes to.
CJK_RANGES = ((0x3000, 0x303F), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFF00, 0xFFEF))


@dataclass(frozen=True, slots=True)
class Row:
    line: int
    fields: dict[str, object]


def table_format(path: str | Path, *, reading: bool = False) -> str:
    """The text format of a file by its extension; `reading` also lists the columnar sources a
    reader takes in the error."""
    fmt = TABLE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        also = f", {COLUMNAR_TYPES}" if reading else ""
        raise DataError(f"unsupported file type '{Path(path).suffix}'; use one of "
                        f"{', '.join(sorted(TABLE_FORMATS))}{also}", path=str(path))
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
        raise DataError(f"not valid UTF-8 (byte {offset}){_encoding_advice(raw, path)}", path=str(path),
                        line=line) from None


def _encoding_advice(raw: bytes, path: Path) -> str:
    """How to convert a file that is not UTF-8 when it reads as Chinese GBK/GB18030 text (what Excel
    and older Windows tools save in China); nothing when it does not."""
    try:
        text = raw.decode("gb18030")
    except UnicodeDecodeError:
        return ""
    wide = [ord(c) for c in text if ord(c) > 0x7F]
    chinese = sum(any(low <= c <= high for low, high in CJK_RANGES) for c in wide)
    if not wide or chinese * 2 < len(wide):  # bytes of another encoding that happen to decode
        return ""
    converted = path.with_name(f"{path.stem}.utf8{path.suffix}")
    return (f"; it looks like GBK/GB18030 (Chinese) text: convert it to UTF-8 with "
            f"`iconv -f GB18030 -t UTF-8 {path} > {converted}`")


def json_problem(error: ValueError | RecursionError) -> str:
    """Why `json.loads` refused a text, in words: its syntax error, or a limit of the parser
    (which raises ValueError or RecursionError for those, not JSONDecodeError)."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} (column {error.colno})"
    if isinstance(error, RecursionError):
        return "nested too deeply (arrays or objects inside each other)"
    return f"a number with more than {sys.get_int_max_str_digits()} digits"


def read_table(path: str | Path, columns: Sequence[str], *, header: bool | None = None,
               column_flags: str | None = None) -> tuple[list[Row], list[str]]:
    """Rows of a table as dicts, and the column names in file order.

    `columns` are the names the caller needs. For CSV/TSV, `header=None` detects a header row:
    it is one when it contains any name in `columns` (a missing one is then reported by name);
    a file without one maps its columns to `columns` by position. A first row that names none of
    `columns` but looks like a header (see `_looks_like_header`) is refused rather than read as
    data; the error says which flags pick the file's columns (`column_flags`, e.g.
    "--text-columns COL1 COL2").

    A Parquet file, datasets folder or hub dataset (see `qtune.data.sources`) always names its
    columns; a null in it reads as an empty cell.
    """
    source = columnar_source(path)
    if source is not None:
        names, records = read_columnar(source, source_name(path), nulls="empty")
        rows = [Row(number, fields) for number, fields in records]
        if not rows:
            raise DataError("no data rows", path=source_name(path))
        return rows, names
    path = Path(path)
    fmt = table_format(path, reading=True)
    text = _decode(path)
    rows, names = (_read_jsonl(path, text) if fmt == "jsonl"
                   else _read_delimited(path, text, fmt, columns, header, column_flags))
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
        except (ValueError, RecursionError) as e:
            raise DataError(f"malformed JSON: {json_problem(e)}", path=str(path), line=lineno) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=str(path), line=lineno)
        yield lineno, obj


def iter_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line, object) for every record of a JSONL file, or (row number, fields) for every row of a
    Parquet file, datasets folder or hub dataset, where a null reads as a missing key (a columnar
    file written from JSONL holds nulls for the keys a line lacks)."""
    source = columnar_source(path)
    if source is None:
        yield from iter_jsonl(Path(path))
        return
    _, records = read_columnar(source, source_name(path), nulls="missing")
    yield from records


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


def _looks_like_names(values: Sequence[str]) -> bool:
    return all(len(v) <= HEADER_NAME_MAX and HEADER_NAME.fullmatch(v) for v in values)


def _looks_like_header(first: Sequence[str], rest: Sequence[Sequence[str]]) -> bool:
    """A first row of short identifier-like names (q1, text_a, query-id) above rows that are not all
    such names (sentences, numbers, Chinese text) is a header, whatever its names. When every row
    is such names there is no telling a header from data, and the first row stays data."""
    return _looks_like_names(first) and any(not _looks_like_names([v.strip() for v in values])
                                            for values in rest[:HEADER_CONTRAST_ROWS])


def _unknown_header(path: Path, line: int, first: Sequence[str], columns: Sequence[str],
                    column_flags: str | None) -> DataError:
    wanted = ", ".join(columns)
    fix = f"pick the file's columns with {column_flags}" if column_flags else f"rename its columns to {wanted}"
    return DataError(f"the first row looks like a header ({', '.join(first)}) but names none of the columns "
                     f"{wanted}; {fix} (or, if that row is data, add a header row naming {wanted} above it)",
                     path=str(path), line=line)


def _refuse_nul(values: Sequence[str], names: Sequence[str] | None, path: Path, line: int) -> None:
    """The csv module reads NUL bytes as text; they are never text, and usually mean a UTF-16 or
    binary file."""
    for i, value in enumerate(values):
        if "\x00" in value:
            where = "the field" if names else "the header"
            raise DataError(f"NUL byte (\\x00) in {where}: text files hold none (is the file UTF-16 or binary?)",
                            path=str(path), line=line, field=names[i] if names else None)


def _read_delimited(path: Path, text: str, fmt: str, columns: Sequence[str],
                    header: bool | None, column_flags: str | None = None) -> tuple[list[Row], list[str]]:
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
        if not header and _looks_like_header(first, [values for _, values in records[1:]]):
            raise _unknown_header(path, records[0][0], first, columns, column_flags)
    if header:
        _refuse_nul(first, None, path, records[0][0])
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
            raise DataError(f"expected {width} {fmt.upper()} fields, found {len(values)}"
                            f"{_delimiter_hint(values, delimiter, width, path)}", path=str(path), line=lineno)
        _refuse_nul(values, names, path, lineno)
        rows.append(Row(lineno, dict(zip(names, values))))
    return rows, names


# Delimiters people save tables with that qtune does not read (Excel in many European locales
# writes ';'); there is no delimiter option, so the hint says how to convert.
OTHER_DELIMITERS = {";": "';'", "\t": "tab", ",": "','", "|": "'|'"}


def _delimiter_hint(values: Sequence[str], delimiter: str, width: int, path: Path) -> str:
    """Why a row has the wrong number of fields when another delimiter would give the right
    number (or, for too few fields, appears at all); "" when nothing points to one."""
    line = delimiter.join(values)
    counts = {d: line.count(d) for d in OTHER_DELIMITERS if d != delimiter and d in line}
    exact = [d for d, n in counts.items() if n + 1 == width]
    if exact:
        other = exact[0]
    elif counts and len(values) < width:
        other = max(counts, key=counts.get)
    else:
        return ""
    name = OTHER_DELIMITERS[other]
    if other == "\t":
        fix = f"name it {path.stem}.tsv"
    elif other == ",":
        fix = f"name it {path.stem}.csv"
    else:
        converted = path.with_name(f"{path.stem}.comma{path.suffix}")
        fix = ("convert it to ',' (qtune reads ',' in .csv and tabs in .tsv and has no delimiter option), e.g. "
               f"python -c \"import csv, sys; csv.writer(sys.stdout).writerows(csv.reader(sys.stdin, "
               f"delimiter='{other}'))\" < {path} > {converted}")
    held = "tabs" if other == "\t" else name
    return f"; the line holds {counts[other]} {held}: if the file is {name}-separated, {fix}"


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
