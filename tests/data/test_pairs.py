"""Tests for reading sentence-pair files (qtune.data.pairs on top of qtune.data.tables)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtune.data.pairs import pairs_from_rows, read_pairs
from qtune.data.tables import Row
from qtune.errors import DataError, QtuneError
from qtune.records import Pair

BOM = b"\xef\xbb\xbf"
ROWS = [("how old are you", "what is your age", "1"),
        ("where do you live", "what time is it", "0"),
        ("你好吗", "你还好吗", "1")]


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def delimited(rows, sep: str, header: tuple[str, ...] | None = ("sentence1", "sentence2", "label")) -> str:
    lines = [sep.join(header)] if header else []
    lines += [sep.join(r) for r in rows]
    return "\n".join(lines) + "\n"


def jsonl(objs) -> str:
    return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs)


def expected(first_line: int) -> list[Pair]:
    return [Pair(a, b, int(y), first_line + i) for i, (a, b, y) in enumerate(ROWS)]


def raises_data_error(path: Path, **read_kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        read_pairs(path, **read_kwargs)
    return info.value


# --- formats ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,sep", [("d.csv", ","), ("d.tsv", "\t"), ("d.txt", "\t")])
@pytest.mark.parametrize("bom", [False, True], ids=["plain", "bom"])
def test_delimited_with_header(tmp_path, name, sep, bom):
    path = write(tmp_path, name, (BOM if bom else b"") + delimited(ROWS, sep).encode("utf-8"))
    assert read_pairs(path) == expected(first_line=2)


@pytest.mark.parametrize("name,sep", [("d.csv", ","), ("d.tsv", "\t"), ("d.txt", "\t")])
@pytest.mark.parametrize("bom", [False, True], ids=["plain", "bom"])
def test_delimited_without_header(tmp_path, name, sep, bom):
    path = write(tmp_path, name, (BOM if bom else b"") + delimited(ROWS, sep, header=None).encode("utf-8"))
    assert read_pairs(path) == expected(first_line=1)


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
@pytest.mark.parametrize("bom", [False, True], ids=["plain", "bom"])
def test_jsonl(tmp_path, name, bom):
    objs = [{"sentence1": a, "sentence2": b, "label": y} for a, b, y in ROWS]
    path = write(tmp_path, name, (BOM if bom else b"") + jsonl(objs).encode("utf-8"))
    assert read_pairs(path) == expected(first_line=1)


def test_all_formats_give_the_same_records_apart_from_line(tmp_path):
    objs = [{"sentence1": a, "sentence2": b, "label": y} for a, b, y in ROWS]
    files = [write(tmp_path, "a.csv", delimited(ROWS, ",")),
             write(tmp_path, "b.tsv", delimited(ROWS, "\t", header=None)),
             write(tmp_path, "c.txt", delimited(ROWS, "\t")),
             write(tmp_path, "d.jsonl", jsonl(objs))]
    contents = {tuple((p.sentence1, p.sentence2, p.label) for p in read_pairs(f)) for f in files}
    assert contents == {tuple((a, b, int(y)) for a, b, y in ROWS)}


def test_jsonl_integer_labels(tmp_path):
    objs = [{"sentence1": a, "sentence2": b, "label": int(y)} for a, b, y in ROWS]
    assert read_pairs(write(tmp_path, "d.jsonl", jsonl(objs))) == expected(first_line=1)


def test_jsonl_blank_lines_are_skipped_and_lines_counted(tmp_path):
    text = ('{"sentence1": "a", "sentence2": "b", "label": 1}\n'
            "\n   \n"
            '{"sentence1": "c", "sentence2": "d", "label": 0}\n')
    assert read_pairs(write(tmp_path, "d.jsonl", text)) == [Pair("a", "b", 1, 1), Pair("c", "d", 0, 4)]


def test_csv_blank_lines_are_skipped_and_lines_counted(tmp_path):
    text = "sentence1,sentence2,label\n\na,b,1\n   \n,,\nc,d,0\n"
    assert read_pairs(write(tmp_path, "d.csv", text)) == [Pair("a", "b", 1, 3), Pair("c", "d", 0, 6)]


def test_crlf_line_endings(tmp_path):
    text = "sentence1,sentence2,label\r\na,b,1\r\nc,d,0\r\n"
    assert read_pairs(write(tmp_path, "d.csv", text)) == [Pair("a", "b", 1, 2), Pair("c", "d", 0, 3)]


def test_quoted_csv_fields_keep_commas_quotes_and_newlines(tmp_path):
    text = ('sentence1,sentence2,label\n'
            '"hello, world","she said ""hi""",1\n'
            '"first line\nsecond line\nthird line",plain,0\n'
            'after,multiline,1\n')
    pairs = read_pairs(write(tmp_path, "d.csv", text))
    assert pairs == [Pair("hello, world", 'she said "hi"', 1, 2),
                     Pair("first line\nsecond line\nthird line", "plain", 0, 3),
                     # the quoted record spans lines 3-5, so the next one starts on line 6
                     Pair("after", "multiline", 1, 6)]


def test_label_is_stripped_but_text_is_kept_as_is(tmp_path):
    text = "sentence1,sentence2,label\n  padded text ,b, 1 \n"
    assert read_pairs(write(tmp_path, "d.csv", text)) == [Pair("  padded text ", "b", 1, 2)]


def test_header_names_are_stripped(tmp_path):
    text = " sentence1 , sentence2 ,label \na,b,1\n"
    assert read_pairs(write(tmp_path, "d.csv", text)) == [Pair("a", "b", 1, 2)]


# --- columns and labels ------------------------------------------------------------------------

def test_custom_columns_in_another_order_with_extra_columns(tmp_path):
    text = "id,is_dup,question2,source,question1\n7,yes,q two,web,q one\n8,no,b,web,a\n"
    pairs = read_pairs(write(tmp_path, "d.csv", text), text_columns=("question1", "question2"),
                       label_column="is_dup", labels=["no", "yes"])
    assert pairs == [Pair("q one", "q two", 1, 2), Pair("a", "b", 0, 3)]


def test_custom_columns_jsonl_with_extra_keys(tmp_path):
    objs = [{"id": 1, "q2": "b", "y": "same", "q1": "a"}, {"q1": "c", "extra": [1, 2], "q2": "d", "y": "different"}]
    pairs = read_pairs(write(tmp_path, "d.jsonl", jsonl(objs)), text_columns=["q1", "q2"], label_column="y",
                       labels=["different", "same"])
    assert pairs == [Pair("a", "b", 1, 1), Pair("c", "d", 0, 2)]


def test_custom_label_set_maps_to_indices_in_order(tmp_path):
    rows = [("a", "b", "same"), ("c", "d", "different"), ("e", "f", "same")]
    pairs = read_pairs(write(tmp_path, "d.tsv", delimited(rows, "\t")), labels=["different", "same"])
    assert [p.label for p in pairs] == [1, 0, 1]


def test_three_labels(tmp_path):
    rows = [("a", "b", "neutral"), ("c", "d", "entailment"), ("e", "f", "contradiction")]
    pairs = read_pairs(write(tmp_path, "d.csv", delimited(rows, ",")),
                       labels=["entailment", "neutral", "contradiction"])
    assert [p.label for p in pairs] == [1, 0, 2]


def test_unlabelled_pairs_ignore_a_label_column(tmp_path):
    rows = [("a", "b", "whatever"), ("c", "d", "")]
    pairs = read_pairs(write(tmp_path, "d.csv", delimited(rows, ",")), labels=None)
    assert pairs == [Pair("a", "b", None, 2), Pair("c", "d", None, 3)]


def test_unlabelled_pairs_without_label_column(tmp_path):
    text = "sentence1,sentence2\na,b\n"
    assert read_pairs(write(tmp_path, "d.csv", text), labels=None) == [Pair("a", "b", None, 2)]


def test_unlabelled_pairs_headerless_with_a_third_column(tmp_path):
    text = "a,b,1\nc,d,0\n"
    assert read_pairs(write(tmp_path, "d.csv", text), labels=None) == [Pair("a", "b", None, 1),
                                                                       Pair("c", "d", None, 2)]


def test_unlabelled_jsonl_without_label_key(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl([{"sentence1": "a", "sentence2": "b"}]))
    assert read_pairs(path, labels=None) == [Pair("a", "b", None, 1)]


def test_header_false_reads_first_row_as_data(tmp_path):
    text = "sentence1,b,1\nc,d,0\n"
    assert read_pairs(write(tmp_path, "d.csv", text), header=False) == [Pair("sentence1", "b", 1, 1),
                                                                        Pair("c", "d", 0, 2)]


def test_pairs_from_rows_directly():
    rows = [Row(5, {"s1": "x", "s2": "y", "lab": "pos"})]
    assert pairs_from_rows(rows, "mem.csv", text_columns=("s1", "s2"), label_column="lab",
                           labels=("neg", "pos")) == [Pair("x", "y", 1, 5)]


# --- errors ------------------------------------------------------------------------------------

def test_data_error_is_a_qtune_error():
    assert issubclass(DataError, QtuneError)


def test_header_without_label_column(tmp_path):
    path = write(tmp_path, "train.csv", "sentence1,sentence2\na,b\n")
    err = raises_data_error(path)
    assert (err.path, err.line, err.field) == (str(path), 2, "label")
    assert str(err) == f"{path}:2, field 'label': missing column"


def test_jsonl_missing_text_key(tmp_path):
    path = write(tmp_path, "train.jsonl", jsonl([{"sentence1": "a", "sentence2": "b", "label": 1},
                                                 {"sentence1": "a", "label": 1}]))
    err = raises_data_error(path)
    assert (err.path, err.line, err.field) == (str(path), 2, "sentence2")
    assert str(err) == f"{path}:2, field 'sentence2': missing column"


@pytest.mark.parametrize("text", ["", "   ", "\t "])
def test_empty_or_blank_text(tmp_path, text):
    objs = [{"sentence1": "a", "sentence2": "b", "label": "0"},
            {"sentence1": "c", "sentence2": "d", "label": "0"},
            {"sentence1": "e", "sentence2": text, "label": "1"}]
    path = write(tmp_path, "train.jsonl", jsonl(objs))
    err = raises_data_error(path)
    assert (err.path, err.line, err.field) == (str(path), 3, "sentence2")
    assert str(err) == f"{path}:3, field 'sentence2': empty text"


def test_empty_text_in_csv(tmp_path):
    path = write(tmp_path, "train.csv", "sentence1,sentence2,label\na,b,1\nc,d,0\n  ,e,1\n")
    err = raises_data_error(path)
    assert (err.line, err.field) == (4, "sentence1")
    assert str(err) == f"{path}:4, field 'sentence1': empty text"


def test_label_outside_label_set(tmp_path):
    path = write(tmp_path, "train.csv", "sentence1,sentence2,label\na,b,1\nc,d,2\n")
    err = raises_data_error(path)
    assert (err.path, err.line, err.field) == (str(path), 3, "label")
    assert str(err).startswith(f"{path}:3, field 'label': label '2' is not one of ['0', '1']")


def test_label_outside_custom_label_set(tmp_path):
    path = write(tmp_path, "train.tsv", "sentence1\tsentence2\tlabel\na\tb\tsame\nc\td\t1\n")
    err = raises_data_error(path, labels=["different", "same"])
    assert (err.line, err.field) == (3, "label")
    assert "label '1' is not one of ['different', 'same']" in str(err)


@pytest.mark.parametrize("value", [1.0, True, None, [1]])
def test_jsonl_label_of_wrong_type(tmp_path, value):
    path = write(tmp_path, "train.jsonl", jsonl([{"sentence1": "a", "sentence2": "b", "label": value}]))
    err = raises_data_error(path)
    assert (err.line, err.field) == (1, "label")
    assert f"label must be text or an integer, got {value!r}" in str(err)


@pytest.mark.parametrize("value,type_name", [(5, "int"), (None, "NoneType"), (["a"], "list"), ({"t": "a"}, "dict")])
def test_jsonl_non_string_text(tmp_path, value, type_name):
    path = write(tmp_path, "train.jsonl", jsonl([{"sentence1": value, "sentence2": "b", "label": 1}]))
    err = raises_data_error(path)
    assert (err.path, err.line, err.field) == (str(path), 1, "sentence1")
    assert str(err) == f"{path}:1, field 'sentence1': expected text, got {type_name}"


def test_wrong_number_of_csv_fields(tmp_path):
    path = write(tmp_path, "train.csv", "sentence1,sentence2,label\na,b,1\nc,d\n")
    err = raises_data_error(path)
    assert (err.path, err.line, err.field) == (str(path), 3, None)
    assert str(err) == f"{path}:3: expected 3 CSV fields, found 2"


def test_too_many_tsv_fields(tmp_path):
    path = write(tmp_path, "train.tsv", "a\tb\t1\nc\td\t0\textra\n")
    err = raises_data_error(path)
    assert err.line == 2
    assert str(err) == f"{path}:2: expected 3 TSV fields, found 4"


def test_malformed_json_line(tmp_path):
    path = write(tmp_path, "train.jsonl", '{"sentence1": "a", "sentence2": "b", "label": 1}\n\n{"sentence1": "c",\n')
    err = raises_data_error(path)
    assert (err.path, err.line, err.field) == (str(path), 3, None)
    assert str(err).startswith(f"{path}:3: malformed JSON: ")


@pytest.mark.parametrize("line,type_name", [("[1, 2]", "list"), ('"text"', "str"), ("3", "int")])
def test_json_line_not_an_object(tmp_path, line, type_name):
    path = write(tmp_path, "train.jsonl", '{"sentence1": "a", "sentence2": "b", "label": 1}\n' + line + "\n")
    err = raises_data_error(path)
    assert err.line == 2
    assert str(err) == f"{path}:2: expected a JSON object, got {type_name}"


@pytest.mark.parametrize("name", ["train.csv", "train.jsonl"])
def test_invalid_utf8_names_the_line_of_the_bad_byte(tmp_path, name):
    good = b"sentence1,sentence2,label\na,b,1\n" if name.endswith(".csv") else \
        b'{"sentence1": "a", "sentence2": "b", "label": 1}\n\n'
    bad = b"c,\xff\xfe,0\n" if name.endswith(".csv") else b'{"sentence1": "\xff", "sentence2": "b", "label": 1}\n'
    path = write(tmp_path, name, good + bad)
    err = raises_data_error(path)
    assert (err.path, err.line) == (str(path), 3)
    assert str(err).startswith(f"{path}:3: not valid UTF-8")


def test_unsupported_extension(tmp_path):
    path = write(tmp_path, "train.xlsx", "sentence1,sentence2,label\na,b,1\n")
    err = raises_data_error(path)
    assert (err.path, err.line, err.field) == (str(path), None, None)
    assert str(err).startswith(f"{path}: unsupported file type '.xlsx'")
    assert ".csv" in str(err) and ".jsonl" in str(err)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.csv"
    err = raises_data_error(path)
    assert (err.path, err.line) == (str(path), None)
    assert str(err) == f"{path}: file not found"


def test_header_only_file(tmp_path):
    path = write(tmp_path, "train.csv", "sentence1,sentence2,label\n\n")
    err = raises_data_error(path)
    assert err.path == str(path)
    assert str(err) == f"{path}: no data rows"
