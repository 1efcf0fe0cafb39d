"""Tests for the table reader/writer (qtune.data.tables) and atomic output (qtune.io.atomic_path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtune.data.pairs import read_pairs
from qtune.data.tables import Row, read_table, table_format, write_table
from qtune.errors import DataError
from qtune.io import atomic_path
from qtune.records import Pair

COLUMNS = ["sentence1", "sentence2", "label"]
TRICKY_ROWS = [
    {"sentence1": "plain", "sentence2": "text", "label": "1"},
    {"sentence1": "with, comma", "sentence2": 'with "quotes"', "label": "0"},
    {"sentence1": "multi\nline", "sentence2": "tab\there", "label": "1"},
    {"sentence1": "中文，标点", "sentence2": "émoji 🙂", "label": "0"},
]


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


# --- table_format --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,fmt", [("a.csv", "csv"), ("a.CSV", "csv"), ("a.tsv", "tsv"), ("a.txt", "tsv"),
                                      ("a.jsonl", "jsonl"), ("a.json", "jsonl"), ("dir/x.y.Tsv", "tsv")])
def test_table_format(name, fmt):
    assert table_format(name) == fmt


@pytest.mark.parametrize("name", ["a.parquet", "a", "a.csv.gz"])
def test_table_format_unsupported(name):
    with pytest.raises(DataError, match="unsupported file type") as info:
        table_format(name)
    assert info.value.path == name


# --- read_table ----------------------------------------------------------------------------------

def test_read_table_with_header_keeps_file_order_and_extra_columns(tmp_path):
    path = write(tmp_path, "t.csv", "label,id,sentence2,sentence1\n1,7,b,a\n")
    rows, names = read_table(path, COLUMNS)
    assert names == ["label", "id", "sentence2", "sentence1"]
    assert rows == [Row(2, {"label": "1", "id": "7", "sentence2": "b", "sentence1": "a"})]


def test_read_table_without_header_names_extra_columns_by_position(tmp_path):
    path = write(tmp_path, "t.tsv", "a\tb\t1\textra\n")
    rows, names = read_table(path, COLUMNS)
    assert names == ["sentence1", "sentence2", "label", "column4"]
    assert rows == [Row(1, {"sentence1": "a", "sentence2": "b", "label": "1", "column4": "extra"})]


def test_read_table_header_true_and_false(tmp_path):
    path = write(tmp_path, "t.csv", "x,y\n1,2\n")
    rows, names = read_table(path, ["a", "b"], header=True)
    assert (names, rows) == (["x", "y"], [Row(2, {"x": "1", "y": "2"})])
    rows, names = read_table(path, ["a", "b"], header=False)
    assert (names, [r.line for r in rows]) == (["a", "b"], [1, 2])


def test_read_table_jsonl_names_are_the_union_of_keys_in_order(tmp_path):
    path = write(tmp_path, "t.jsonl", '{"a": 1, "b": 2}\n{"c": 3, "a": 4}\n')
    rows, names = read_table(path, ["a"])
    assert names == ["a", "b", "c"]
    assert rows == [Row(1, {"a": 1, "b": 2}), Row(2, {"c": 3, "a": 4})]


def test_quoted_record_lines_are_where_the_record_starts(tmp_path):
    text = ('sentence1,sentence2,label\n'
            '"one\ntwo",x,1\n'         # lines 2-3
            '\n'                       # line 4, blank
            'a,"b\n\nc",0\n'           # lines 5-7, a blank line inside the quotes is data
            'last,row,1\n')            # line 8
    rows, _ = read_table(write(tmp_path, "t.csv", text), COLUMNS)
    assert [r.line for r in rows] == [2, 5, 8]
    assert rows[1].fields["sentence2"] == "b\n\nc"


def test_bom_is_not_part_of_the_first_column_name(tmp_path):
    path = write(tmp_path, "t.csv", b"\xef\xbb\xbfsentence1,sentence2,label\na,b,1\n")
    rows, names = read_table(path, COLUMNS)
    assert names == COLUMNS
    assert rows[0].fields["sentence1"] == "a"


def test_duplicate_header_names(tmp_path):
    path = write(tmp_path, "t.csv", "\nsentence1,sentence1,label\na,b,1\n")
    with pytest.raises(DataError) as info:
        read_table(path, COLUMNS)
    assert info.value.line == 2
    assert str(info.value).startswith(f"{path}:2: duplicate column names in header")


def test_unterminated_quote_is_a_data_error(tmp_path):
    path = write(tmp_path, "t.csv", 'sentence1,sentence2,label\na,b,1\n"never closed,b,1\n')
    with pytest.raises(DataError) as info:
        read_table(path, COLUMNS)
    assert (info.value.path, info.value.line) == (str(path), 3)
    assert str(info.value).startswith(f"{path}:3: malformed CSV row")


def test_quote_in_the_middle_of_a_quoted_field_is_a_data_error(tmp_path):
    path = write(tmp_path, "t.csv", 'sentence1,sentence2,label\n"a"b,c,1\n')
    with pytest.raises(DataError) as info:
        read_table(path, COLUMNS)
    assert info.value.line == 2
    assert "malformed CSV row" in str(info.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = write(tmp_path, "t.csv", content)
    with pytest.raises(DataError, match="no data rows"):
        read_table(path, COLUMNS)


def test_empty_jsonl_file(tmp_path):
    path = write(tmp_path, "t.jsonl", "\n")
    with pytest.raises(DataError) as info:
        read_table(path, COLUMNS)
    assert str(info.value) == f"{path}: no data rows"


def test_folder_instead_of_file(tmp_path):
    path = tmp_path / "folder.csv"
    path.mkdir()
    with pytest.raises(DataError) as info:
        read_table(path, COLUMNS)
    assert str(info.value) == f"{path}: is a folder, expected a file"


def test_invalid_utf8_on_first_line(tmp_path):
    path = write(tmp_path, "t.tsv", b"\xc3(\tb\t1\n")
    with pytest.raises(DataError) as info:
        read_table(path, COLUMNS)
    assert info.value.line == 1
    assert "not valid UTF-8 (byte 0)" in str(info.value)


def test_invalid_utf8_after_bom_far_from_line_start(tmp_path):
    path = write(tmp_path, "t.csv", b"\xef\xbb\xbfsentence1,sentence2,label\na,b,1\nccccc,ddddd,\x80\n")
    with pytest.raises(DataError) as info:
        read_table(path, COLUMNS)
    assert info.value.line == 3


@pytest.mark.parametrize("bad_line", [b"\x80,b,1\n", b"e,\x80,1\n", b"ee,\x80,1\n"])
def test_invalid_utf8_after_bom_near_line_start(tmp_path, bad_line):
    # The bad byte is on line 4, within 3 bytes of its start: the 3-byte BOM must not shift the count.
    path = write(tmp_path, "t.csv", b"\xef\xbb\xbfsentence1,sentence2,label\na,b,1\nc,d,0\n" + bad_line)
    with pytest.raises(DataError) as info:
        read_table(path, COLUMNS)
    assert info.value.line == 4


# --- write_table ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["out.csv", "out.tsv", "out.txt", "out.jsonl"])
def test_write_table_round_trip(tmp_path, name):
    path = tmp_path / name
    write_table(path, TRICKY_ROWS, COLUMNS)
    rows, names = read_table(path, COLUMNS)
    assert names == COLUMNS
    assert [r.fields for r in rows] == TRICKY_ROWS
    assert read_pairs(path) == [Pair(r["sentence1"], r["sentence2"], int(r["label"]), rows[i].line)
                                for i, r in enumerate(TRICKY_ROWS)]
    assert temp_files(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_write_table_csv_has_a_header_and_drops_extra_keys(tmp_path):
    path = tmp_path / "out.csv"
    write_table(path, [{"sentence1": "a", "sentence2": "b", "label": 1, "score": 0.5}], COLUMNS)
    assert path.read_bytes() == b"sentence1,sentence2,label\r\na,b,1\r\n"


def test_write_table_jsonl_is_utf8_not_escaped(tmp_path):
    path = tmp_path / "out.jsonl"
    write_table(path, [{"sentence1": "你好", "label": 1}], COLUMNS)
    assert path.read_text(encoding="utf-8") == '{"sentence1": "你好", "label": 1}\n'


def test_write_table_replaces_an_existing_file_and_creates_folders(tmp_path):
    path = tmp_path / "sub" / "dir" / "out.tsv"
    write_table(path, TRICKY_ROWS, COLUMNS)
    write_table(path, TRICKY_ROWS[:1], COLUMNS)
    assert path.read_bytes() == b"sentence1\tsentence2\tlabel\r\nplain\ttext\t1\r\n"
    assert temp_files(path.parent) == []


def test_write_table_unsupported_extension_writes_nothing(tmp_path):
    with pytest.raises(DataError, match="unsupported file type"):
        write_table(tmp_path / "out.xls", TRICKY_ROWS, COLUMNS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["line\u2028separator", "next\x85line", "para\u2029graph"])
def test_write_table_jsonl_round_trip_with_unicode_line_separators(tmp_path, text):
    # JSON allows these characters unescaped inside strings and json.dumps(ensure_ascii=False)
    # writes them raw, so a JSONL reader must split records on "\n" only.
    path = tmp_path / "out.jsonl"
    rows = [{"sentence1": text, "sentence2": "b", "label": "1"}, {"sentence1": "c", "sentence2": "d", "label": "0"}]
    write_table(path, rows, COLUMNS)
    assert read_pairs(path) == [Pair(text, "b", 1, 1), Pair("c", "d", 0, 2)]


# --- atomic_path ---------------------------------------------------------------------------------

def test_atomic_path_success_replaces_target(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("old", encoding="utf-8")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".result.txt.") and tmp.name.endswith(".tmp")
        tmp.write_text("new", encoding="utf-8")
        assert target.read_text(encoding="utf-8") == "old"
    assert target.read_text(encoding="utf-8") == "new"
    assert temp_files(tmp_path) == []


def test_atomic_path_failure_leaves_target_untouched(tmp_path):
    target = tmp_path / "result.csv"
    target.write_text("precious", encoding="utf-8")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half written", encoding="utf-8")
            raise RuntimeError("boom")
    assert target.read_text(encoding="utf-8") == "precious"
    assert temp_files(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["result.csv"]


def test_atomic_path_failure_without_target_creates_nothing(tmp_path):
    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "new.jsonl") as tmp:
            tmp.write_text("x", encoding="utf-8")
            raise KeyError("x")
    assert list(tmp_path.iterdir()) == []


def test_write_table_failure_mid_write_leaves_target_untouched(tmp_path):
    path = tmp_path / "out.jsonl"
    write_table(path, TRICKY_ROWS, COLUMNS)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_table(path, [{"sentence1": "ok"}, {"sentence1": object()}], COLUMNS)  # not JSON serialisable
    assert path.read_bytes() == before
    assert temp_files(tmp_path) == []
