"""Mistakes people make with data files, each refused with file, line and field (or read as meant):
NUL bytes, JSON the parser cannot hold, GBK files, headers qtune does not know, and the columns of
`qtune calibrate` files."""

from __future__ import annotations

import json
import shutil

import pytest
from support import assert_located, assert_user_error, data_error, run, write

from qtune.data.extraction import pii_to_sft, read_extraction
from qtune.data.pairs import read_pairs
from qtune.data.retrieval import read_corpus, read_query_groups
from qtune.data.tables import read_table
from qtune.records import Pair

PAIR_COLUMNS = ["sentence1", "sentence2", "label"]


# --- NUL bytes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,sep", [("t.csv", ","), ("t.tsv", "\t")])
def test_a_nul_byte_in_a_field_names_file_line_and_field(tmp_path, name, sep):
    path = write(tmp_path / name, sep.join(PAIR_COLUMNS) + "\n" + sep.join(["a", "b", "1"]) + "\n"
                 + sep.join(["c", "d\x00e", "0"]) + "\n")
    err = data_error(read_table, path, PAIR_COLUMNS)
    assert_located(err, path, 3, "sentence2")
    assert "NUL byte" in str(err)


def test_a_nul_byte_in_a_headerless_file_names_the_positional_column(tmp_path):
    path = write(tmp_path / "t.csv", "a,b,1\n\x00,d,0\n")
    assert_located(data_error(read_pairs, path), path, 2, "sentence1")


def test_a_nul_byte_in_the_header(tmp_path):
    path = write(tmp_path / "t.csv", "sentence1,sentence2\x00,label\na,b,1\n")
    err = data_error(read_table, path, PAIR_COLUMNS)
    assert_located(err, path, 1, None)
    assert "NUL byte" in str(err)


# --- JSON that json.loads cannot hold ------------------------------------------------------------

HUGE_NUMBER = '{"x": ' + "7" * 5000 + "}"
DEEP_NESTING = '{"x": ' + "[" * 5000 + "]" * 5000 + "}"
READERS = {"pairs": (read_pairs, {"sentence1": "a", "sentence2": "b", "label": 1}),
           "query groups": (read_query_groups, {"query": "q", "pos": ["p"]}),
           "extraction": (read_extraction, {"input": "text", "output": {"name": "x"}}),
           "corpus": (read_corpus, {"_id": "d1", "text": "passage"})}


@pytest.mark.parametrize("bad,reason", [(HUGE_NUMBER, "a number with more than 4300 digits"),
                                        (DEEP_NESTING, "nested too deeply")], ids=["huge number", "deep nesting"])
@pytest.mark.parametrize("kind", READERS)
def test_json_the_parser_cannot_hold_names_file_and_line(tmp_path, bad, reason, kind):
    reader, good = READERS[kind]
    path = write(tmp_path / "d.jsonl", json.dumps(good) + "\n\n" + bad + "\n")
    assert reader(write(tmp_path / "good.jsonl", json.dumps(good) + "\n"))  # the control: the good line reads
    err = data_error(reader, path)
    assert_located(err, path, 3, None)
    assert str(err).startswith(f"{path}:3: malformed JSON: ") and reason in str(err)


def test_a_huge_number_in_a_pii_source_is_a_data_error(tmp_path):
    path = write(tmp_path / "people.json", '[{"phoneNumbers": ' + "1" * 5000 + "}]")
    err = data_error(pii_to_sft, path, tmp_path / "out")
    assert (err.path, err.line, err.field) == (str(path), None, None)
    assert str(err) == f"{path}: not valid JSON: a number with more than 4300 digits"
    assert not (tmp_path / "out").exists()


# --- GBK files -----------------------------------------------------------------------------------

def test_a_gbk_file_is_named_as_such_with_the_command_that_converts_it(tmp_path):
    path = write(tmp_path / "train.csv", "sentence1,sentence2,label\n花呗怎么还款,花呗如何还钱,1\n".encode("gbk"))
    err = data_error(read_pairs, path)
    assert_located(err, path, 2, None)
    assert "not valid UTF-8" in str(err)
    assert "GBK/GB18030" in str(err)
    assert f"iconv -f GB18030 -t UTF-8 {path} > {tmp_path / 'train.utf8.csv'}" in str(err)


def test_bytes_that_are_not_gbk_either_get_no_gbk_advice(tmp_path):
    path = write(tmp_path / "train.csv", b"sentence1,sentence2,label\ncaf\xe9,b,1\n")  # Latin-1
    err = data_error(read_pairs, path)
    assert "not valid UTF-8 (byte 29)" in str(err)
    assert "GBK" not in str(err)


# --- headers qtune does not know -----------------------------------------------------------------

UNKNOWN_HEADER = "q1,q2,y\nhow old are you,what is your age,1\nwhere do you live,what time is it,0\n"


def test_an_unknown_header_is_not_read_as_data(tmp_path):
    path = write(tmp_path / "train.csv", UNKNOWN_HEADER)
    err = data_error(read_pairs, path)
    assert_located(err, path, 1, None)
    message = str(err)
    assert "looks like a header (q1, q2, y)" in message
    assert "none of the columns sentence1, sentence2, label" in message
    assert "--text-columns COL1 COL2" in message and "--label-column COL" in message


def test_the_flags_the_error_names_read_the_file(tmp_path):
    path = write(tmp_path / "train.csv", UNKNOWN_HEADER)
    assert read_pairs(path, text_columns=("q1", "q2"), label_column="y") == [
        Pair("how old are you", "what is your age", 1, 2), Pair("where do you live", "what time is it", 0, 3)]


def test_predict_refuses_an_unknown_header_before_the_model_loads(tmp_path, capsys):
    path = write(tmp_path / "in.tsv", "left\tright\nhow old are you\twhat is your age\n")
    code, _, err = run(capsys, "predict", "pair-cls", "--model", "/nonexistent/model", "--input", path,
                       "--output", tmp_path / "out.csv", "--device", "cpu")
    assert_user_error(code, err, f"{path}:1", "looks like a header (left, right)", "--text-columns COL1 COL2")
    assert "/nonexistent/model" not in err
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("text,expected", [
    # single words all the way down: no header to tell apart, so the first row is data
    ("cat,dog\nbus,car\n", [Pair("cat", "dog", None, 1), Pair("bus", "car", None, 2)]),
    # a sentence in the first row is data
    ("how old are you,what is your age\nhi,hello\n", [Pair("how old are you", "what is your age", None, 1),
                                                      Pair("hi", "hello", None, 2)]),
    ("你好吗,你还好吗\n我很好，谢谢！,好的\n", [Pair("你好吗", "你还好吗", None, 1), Pair("我很好，谢谢！", "好的", None, 2)]),
], ids=["single words", "sentences", "chinese"])
def test_headerless_files_still_read_their_first_row(tmp_path, text, expected):
    assert read_pairs(write(tmp_path / "in.csv", text), labels=None) == expected


def test_a_headerless_labelled_file_still_reads_its_first_row(tmp_path):
    path = write(tmp_path / "train.csv", "cat,dog,1\nmy bus,the car,0\n")
    assert read_pairs(path) == [Pair("cat", "dog", 1, 1), Pair("my bus", "the car", 0, 2)]


# --- the columns of calibrate files --------------------------------------------------------------

def test_a_header_without_the_text_columns_says_which_columns_the_file_has(tmp_path):
    path = write(tmp_path / "pairs.csv", "question,passage,label\nhow old,my age,1\n")
    err = data_error(read_pairs, path)
    assert (err.path, err.line, err.field) == (str(path), None, "sentence1")
    assert "no columns sentence1, sentence2" in str(err)
    assert "the file has question, passage, label" in str(err) and "--text-columns COL1 COL2" in str(err)


def test_alternative_columns_are_read_when_the_text_columns_are_missing(tmp_path):
    path = write(tmp_path / "pairs.jsonl", json.dumps({"query": "how old", "document": "my age", "label": 1}) + "\n")
    assert read_pairs(path, alternative_columns=[("query", "document")]) == [Pair("how old", "my age", 1, 1)]
    err = data_error(read_pairs, write(tmp_path / "p.csv", "q,d,label\nhow old,my age,1\n"),
                     alternative_columns=[("query", "document")])
    assert "no columns sentence1, sentence2 (nor query, document)" in str(err)
    assert "the file has q, d, label" in str(err)


def test_calibrate_reads_query_document_label_files(tiny_bert_dir, tmp_path, capsys):
    import qtune

    folder = tmp_path / "reranker"
    shutil.copytree(tiny_bert_dir, folder)
    rows = [("animal", "the cat", 1), ("animal", "the bus", 0), ("vehicle", "the bus", 1), ("vehicle", "the cow", 0)]
    path = write(tmp_path / "pairs.csv", "query,document,label\n" + "".join(f"{q},{d},{y}\n" for q, d, y in rows))
    code, out, err = run(capsys, "calibrate", "--model", folder, "--data", path, "--device", "cpu")
    assert code == 0, err
    assert "on 4 pairs (2 relevant)" in out
    assert qtune.load(folder, device="cpu").threshold is not None


def test_calibrate_says_which_columns_it_found(tmp_path, capsys):
    folder = tmp_path / "reranker"
    folder.mkdir()
    path = write(tmp_path / "pairs.csv", "question,passage,label\nanimal,the cat,1\n")
    code, _, err = run(capsys, "calibrate", "--model", folder, "--data", path, "--device", "cpu")
    assert_user_error(code, err, "no columns sentence1, sentence2 (nor query, document)",
                      "the file has question, passage, label", "--text-columns COL1 COL2")
