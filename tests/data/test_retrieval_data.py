"""Tests for retrieval data (qtune.data.retrieval): query-group JSONL in FlagEmbedding and ms-swift
format, BEIR folders, and the QA-table splitter."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from support import BOM, assert_located, data_error, jsonl, read_jsonl, write
from qtune.data.retrieval import (qa_table_to_retrieval, read_beir, read_corpus, read_query_groups, write_beir,
                                  write_query_groups)
from qtune.errors import DataError, QtuneError
from qtune.records import QueryGroup, RetrievalSet


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


# --- read_query_groups ---------------------------------------------------------------------------

def test_flagembedding_groups(tmp_path):
    path = write(tmp_path / "g.jsonl", jsonl([
        {"query": "what is a cat", "pos": ["a cat is an animal"], "neg": ["a bus is a vehicle", "中文"]},
        "",
        {"query": "q2", "pos": ["p1", "p2"], "pos_scores": [1, 1], "prompt": "ignored"},  # neg optional
    ]))
    assert read_query_groups(path) == [
        QueryGroup("what is a cat", ("a cat is an animal",), ("a bus is a vehicle", "中文"), 1),
        QueryGroup("q2", ("p1", "p2"), (), 3, pos_scores=(1.0, 1.0)),
    ]


def test_swift_groups(tmp_path):
    path = write(tmp_path / "g.jsonl", BOM + jsonl([
        {"query": "q1", "response": "p1", "rejected_response": ["n1", "n2"]},
        {"query": "q2", "response": "p2", "rejected_response": "n3"},  # a single string
        {"query": "q3", "response": "p3"},
    ]).encode())
    assert read_query_groups(path) == [QueryGroup("q1", ("p1",), ("n1", "n2"), 1),
                                       QueryGroup("q2", ("p2",), ("n3",), 2),
                                       QueryGroup("q3", ("p3",), (), 3)]


def test_mixed_formats_in_one_file(tmp_path):
    path = write(tmp_path / "g.jsonl", jsonl([
        {"query": "q1", "response": "p1", "rejected_response": ["n1"]},
        {"query": "q2", "pos": ["p2"], "neg": ["n2"]},
    ]).replace("\n", "\r\n"))
    assert read_query_groups(path) == [QueryGroup("q1", ("p1",), ("n1",), 1), QueryGroup("q2", ("p2",), ("n2",), 2)]


GOOD = {"query": "fine", "pos": ["fine"]}


@pytest.mark.parametrize("bad,field,reason", [
    ('{"query": "q", "pos": ["p"]', None, "malformed JSON"),
    ('["q", "p"]', None, "expected a JSON object, got list"),
    ({"pos": ["p"]}, "query", "missing field"),
    ({"query": "  ", "pos": ["p"]}, "query", "empty text"),
    ({"query": 5, "pos": ["p"]}, "query", "expected text, got int"),
    ({"query": "q"}, "pos", "no positive passage"),
    ({"query": "q", "neg": ["n"]}, "pos", "no positive passage"),
    ({"query": "q", "pos": []}, "pos", "no positive passage"),
    ({"query": "q", "pos": "p"}, "pos", "expected a list of strings, got str"),
    ({"query": "q", "pos": ["p", 3]}, "pos", "passage 2 is int"),
    ({"query": "q", "pos": ["p", ""]}, "pos", "passage 2 is empty"),
    ({"query": "q", "pos": ["p"], "neg": [" "]}, "neg", "passage 1 is empty"),
    ({"query": "q", "pos": ["p"], "neg": [None]}, "neg", "passage 1 is NoneType"),
    ({"query": "q", "pos": ["p"], "neg": "n"}, "neg", "expected a list of strings"),
    ({"query": "q", "response": ""}, "response", "no positive passage"),
    ({"query": "q", "response": ["p"]}, "response", "expected text, got list"),
    ({"query": "q", "response": "p", "rejected_response": ["n", 1]}, "rejected_response", "passage 2 is int"),
    ({"query": "q", "response": "p", "rejected_response": ""}, "rejected_response", "passage 1 is empty"),
    ({"query": "q", "response": "p", "rejected_response": {"a": 1}}, "rejected_response",
     "expected a string or a list of strings"),
    ({"query": "q", "pos": ["p"], "rejected_response": ["n"]}, "rejected_response", "mixes FlagEmbedding"),
])
def test_query_group_errors_name_file_line_field(tmp_path, bad, field, reason):
    path = write(tmp_path / "g.jsonl", jsonl([GOOD, "", bad, GOOD]))
    err = data_error(read_query_groups, path)
    assert_located(err, path, 3, field)
    assert reason in err.reason


def test_query_groups_file_level_errors(tmp_path):
    empty = write(tmp_path / "empty.jsonl", "\n \n")
    assert_located(data_error(read_query_groups, empty), empty, None, None)
    missing = tmp_path / "missing.jsonl"
    assert "file not found" in str(data_error(read_query_groups, missing))
    latin1 = write(tmp_path / "latin1.jsonl", jsonl([GOOD]).encode() + '{"query": "caf\xe9"}\n'.encode("latin-1"))
    assert_located(data_error(read_query_groups, latin1), latin1, 2, None)


# --- write_query_groups --------------------------------------------------------------------------

GROUPS = [QueryGroup("q1", ("p1", "p2"), ("n1", "n2")), QueryGroup("问题", ("答案",), ())]


def test_write_flagembedding_round_trip(tmp_path):
    path = tmp_path / "out" / "g.jsonl"
    write_query_groups(path, GROUPS)
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert lines == [{"query": "q1", "pos": ["p1", "p2"], "neg": ["n1", "n2"]},
                     {"query": "问题", "pos": ["答案"], "neg": []}]
    assert "答案" in path.read_text(encoding="utf-8")  # not \u-escaped
    assert read_query_groups(path) == [QueryGroup("q1", ("p1", "p2"), ("n1", "n2"), 1),
                                       QueryGroup("问题", ("答案",), (), 2)]
    assert temp_files(tmp_path) == []


def test_write_swift_one_line_per_positive(tmp_path):
    path = tmp_path / "g.jsonl"
    write_query_groups(path, GROUPS, fmt="swift")
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert lines == [{"query": "q1", "response": "p1", "rejected_response": ["n1", "n2"]},
                     {"query": "q1", "response": "p2", "rejected_response": ["n1", "n2"]},
                     {"query": "问题", "response": "答案"}]
    assert [g.positives for g in read_query_groups(path)] == [("p1",), ("p2",), ("答案",)]
    assert temp_files(tmp_path) == []


def test_write_unknown_format(tmp_path):
    with pytest.raises(QtuneError, match="unknown query-group format"):
        write_query_groups(tmp_path / "g.jsonl", GROUPS, fmt="sbert")
    assert not (tmp_path / "g.jsonl").exists()


# --- read_corpus ---------------------------------------------------------------------------------

def test_beir_corpus_joins_title_and_text(tmp_path):
    path = write(tmp_path / "corpus.jsonl", BOM + jsonl([
        {"_id": "a", "title": "Cats", "text": "Cats purr."},
        {"_id": "b", "title": "", "text": " only text "},  # empty title: the text as is
        {"_id": "c", "text": "no title field"},
        {"_id": 7, "title": "Title only"},  # integer id, no text
        {"_id": "e", "title": "  Padded ", "text": "body  ", "metadata": {}},
    ]).encode())
    assert read_corpus(path) == {"a": "Cats Cats purr.", "b": " only text ", "c": "no title field",
                                 "7": "Title only", "e": "Padded  body"}


@pytest.mark.parametrize("bad,field,reason", [
    ({"_id": "a", "text": "dup"}, "_id", "duplicate id 'a' (first on line 1)"),
    ({"title": "t", "text": "x"}, "_id", "missing field"),
    ({"_id": "", "text": "x"}, "_id", "empty id"),
    ({"_id": ["x"], "text": "x"}, "_id", "id must be text or an integer"),
    ({"_id": "z"}, "text", "missing field"),
    ({"_id": "z", "title": "", "text": "  "}, "text", "empty"),
    ({"_id": "z", "text": 3}, "text", "expected text, got int"),
    ({"_id": "z", "title": None, "text": "x"}, "title", "expected text, got NoneType"),
])
def test_beir_corpus_errors(tmp_path, bad, field, reason):
    path = write(tmp_path / "corpus.jsonl", jsonl([{"_id": "a", "text": "x"}, {"_id": "b", "text": "y"}, bad]))
    err = data_error(read_corpus, path)
    assert_located(err, path, 3, field)
    assert reason in err.reason


def test_plain_text_corpus(tmp_path):
    path = write(tmp_path / "passages.txt", BOM + "first passage\r\n\n  \nsecond, with a tab\there\nthird".encode())
    assert read_corpus(path) == {"0": "first passage", "1": "second, with a tab\there", "2": "third"}
    empty = write(tmp_path / "empty.txt", "\n\n")
    assert_located(data_error(read_corpus, empty), empty, None, None)


# --- read_beir / write_beir ----------------------------------------------------------------------

CORPUS = {"d1": "cats purr", "d2": "dogs bark", "d3": "buses are big", "d4": "trains run on rails"}
QUERIES = {"q1": "what do cats do", "q2": "big vehicles", "q3": "unjudged query", "q4": "only grade 0"}


def beir_folder(tmp_path: Path, qrels_lines: list[str], *, split: str = "test") -> Path:
    folder = tmp_path / "beir"
    write(folder / "corpus.jsonl", jsonl({"_id": k, "title": "", "text": v} for k, v in CORPUS.items()))
    write(folder / "queries.jsonl", jsonl({"_id": k, "text": v} for k, v in QUERIES.items()))
    write(folder / "qrels" / f"{split}.tsv", "\n".join(qrels_lines) + "\n")
    return folder


@pytest.mark.parametrize("header", [True, False], ids=["header", "no-header"])
def test_read_beir(tmp_path, header):
    rows = ["q1\td1\t2", "q1\td2\t1", "q2\td3\t1", "q2\td4\t0", "q4\td1\t0", "", "q1\td4\t0"]
    folder = beir_folder(tmp_path, (["query-id\tcorpus-id\tscore"] if header else []) + rows)
    data = read_beir(folder)
    assert data == RetrievalSet(CORPUS, {"q1": QUERIES["q1"], "q2": QUERIES["q2"]},
                                {"q1": {"d1": 2, "d2": 1}, "q2": {"d3": 1}})


def test_read_beir_other_split_and_crlf(tmp_path):
    folder = beir_folder(tmp_path, ["qid\tdocid\trel", "q3\td4\t1"], split="dev")
    (folder / "qrels" / "dev.tsv").write_bytes(b"qid\tdocid\trel\r\nq3\td4\t1\r\n")
    assert read_beir(folder, split="dev").qrels == {"q3": {"d4": 1}}
    err = data_error(read_beir, folder)  # no test split
    assert_located(err, folder / "qrels" / "test.tsv", None, None)
    assert "found splits: dev" in err.reason


@pytest.mark.parametrize("bad,field,reason", [
    ("q9\td1\t1", "query-id", "unknown query id 'q9'"),
    ("q1\td9\t1", "corpus-id", "unknown corpus id 'd9'"),
    ("q1\td9\t0", "corpus-id", "unknown corpus id 'd9'"),  # even a grade-0 row must name real ids
    ("q1\td2\t0.5", "score", "score must be an integer"),
    ("q1\td2\t", "score", "score must be an integer"),
    ("q1\td2", None, "expected 3 tab-separated columns"),
    ("q1\td1\t1", "score", "contradicts grade 2 on line 2"),
])
def test_read_beir_qrels_errors(tmp_path, bad, field, reason):
    folder = beir_folder(tmp_path, ["query-id\tcorpus-id\tscore", "q1\td1\t2", bad])
    err = data_error(read_beir, folder)
    assert_located(err, folder / "qrels" / "test.tsv", 3, field)
    assert reason in err.reason


def test_read_beir_repeated_identical_judgement_is_fine(tmp_path):
    folder = beir_folder(tmp_path, ["q1\td1\t2", "q1\td1\t2"])
    assert read_beir(folder).qrels == {"q1": {"d1": 2}}


@pytest.mark.parametrize("missing", ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"])
def test_read_beir_missing_file(tmp_path, missing):
    folder = beir_folder(tmp_path, ["q1\td1\t1"])
    (folder / missing).unlink()
    err = data_error(read_beir, folder)
    assert err.path == str(folder / missing)
    assert "file not found" in err.reason


def test_read_beir_folder_and_content_errors(tmp_path):
    assert_located(data_error(read_beir, tmp_path / "nowhere"), tmp_path / "nowhere", None, None)
    folder = beir_folder(tmp_path, ["q1\td1\t0"])
    err = data_error(read_beir, folder)  # nothing relevant: nothing to score
    assert_located(err, folder / "qrels" / "test.tsv", None, None)
    write(folder / "queries.jsonl", jsonl([{"_id": "q1", "text": "a"}, {"_id": "q1", "text": "b"}]))
    assert_located(data_error(read_beir, folder), folder / "queries.jsonl", 2, "_id")
    write(folder / "queries.jsonl", jsonl([{"_id": "q1", "text": ""}]))
    assert_located(data_error(read_beir, folder), folder / "queries.jsonl", 1, "text")


def test_write_beir_round_trip(tmp_path):
    corpus = {"d0": "猫 purr", "d1": "with\ttab and \"quotes\"", "d2": " padded ", "7": "numeric-looking id"}
    queries = {"q0": "first?", "q1": "二"}
    qrels = {"q0": {"d0": 2, "d1": 1, "d2": 0}, "q1": {"7": 1}}
    folder = tmp_path / "out"
    write_beir(folder, corpus, queries, qrels)
    assert (folder / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()[0] == "query-id\tcorpus-id\tscore"
    assert read_beir(folder) == RetrievalSet(corpus, queries, {"q0": {"d0": 2, "d1": 1}, "q1": {"7": 1}})
    write_beir(folder, corpus, queries, {"q1": {"d2": 3}}, split="dev")
    assert read_beir(folder, split="dev") == RetrievalSet(corpus, {"q1": "二"}, {"q1": {"d2": 3}})
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("qrels", [{"qx": {"d0": 1}}, {"q0": {"dx": 1}}])
def test_write_beir_rejects_unknown_ids(tmp_path, qrels):
    with pytest.raises(ValueError):
        write_beir(tmp_path / "out", {"d0": "x"}, {"q0": "y"}, qrels)
    assert not (tmp_path / "out").exists()


# --- qa_table_to_retrieval -----------------------------------------------------------------------

# Repeated questions (some with different passages) and passages shared by several questions.
QA_ROWS = [(f"question {i % 9}", f"passage {i % 13}") for i in range(30)] + [("lonely", "passage 99")]


def write_qa_csv(path: Path, rows, header=("question", "context")) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("seed", range(8))
def test_qa_split_reproduces_documented_procedure(tmp_path, seed):
    table = write_qa_csv(tmp_path / "qa.csv", QA_ROWS)
    stats = qa_table_to_retrieval(table, tmp_path / "out", test_fraction=0.2, seed=seed)

    # The documented procedure, replayed on the rows in file order.
    rows = list(QA_ROWS)
    random.Random(seed).shuffle(rows)
    n_test = round(0.2 * len(rows))
    test_questions = {q for q, _ in rows[:n_test]}
    train_rows = [r for r in rows[n_test:] if r[0] not in test_questions]
    moved = len(rows) - n_test - len(train_rows)

    def in_file_order(questions):
        return list(dict.fromkeys(q for q, _ in QA_ROWS if q in questions))

    def passages_of(question):
        return list(dict.fromkeys(p for q, p in QA_ROWS if q == question))

    train_questions = in_file_order({q for q, _ in train_rows})
    assert not set(train_questions) & test_questions  # never on both sides
    distinct_passages = list(dict.fromkeys(p for _, p in QA_ROWS))
    assert stats == {"train_queries": len(train_questions), "test_queries": len(test_questions),
                     "corpus": len(distinct_passages), "moved": moved, "skipped": 0}

    # Training groups: every distinct training question once, all its passages as positives.
    groups = read_query_groups(tmp_path / "out" / "train.jsonl")
    assert [(g.query, list(g.positives), g.negatives) for g in groups] == \
        [(q, passages_of(q), ()) for q in train_questions]
    assert all(set(r) == {"query", "pos", "neg"} for r in read_jsonl(tmp_path / "out" / "train.jsonl"))

    # Test folder: every distinct passage of the table, ids in order of first appearance.
    data = read_beir(tmp_path / "out" / "test")
    assert data.corpus == {f"d{i}": p for i, p in enumerate(distinct_passages)}
    expected_queries = in_file_order(test_questions)
    assert data.queries == {f"q{i}": q for i, q in enumerate(expected_queries)}
    doc_id = {p: d for d, p in data.corpus.items()}
    assert data.qrels == {f"q{i}": {doc_id[p]: 1 for p in passages_of(q)} for i, q in enumerate(expected_queries)}
    assert temp_files(tmp_path) == []


def test_qa_split_moves_duplicate_questions_for_some_seed(tmp_path):
    # The seeds above do exercise the move: at least one of them moves rows (this guards the fixture).
    table = write_qa_csv(tmp_path / "qa.csv", QA_ROWS)
    moved = [qa_table_to_retrieval(table, tmp_path / f"out{s}", test_fraction=0.2, seed=s)["moved"] for s in range(8)]
    assert max(moved) > 0


def test_qa_split_jsonl_and_custom_columns(tmp_path):
    table = write(tmp_path / "qa.jsonl", jsonl({"q": f"question {i}", "ctx": f"passage {i}", "id": i}
                                               for i in range(10)))
    stats = qa_table_to_retrieval(table, tmp_path / "out", question_column="q", passage_column="ctx",
                                  test_fraction=0.25, seed=3)
    # round(0.25 * 10) = round(2.5) = 2 (Python rounds half to even), and nothing to move.
    assert stats == {"train_queries": 8, "test_queries": 2, "corpus": 10, "moved": 0, "skipped": 0}


@pytest.mark.parametrize("row,field", [({"question": "  ", "context": "p"}, "question"),
                                       ({"question": "q", "context": ""}, "context"),
                                       ({"question": "q", "context": 5}, "context"),
                                       ({"question": "q"}, "context")])
def test_qa_split_row_errors(tmp_path, row, field):
    table = write(tmp_path / "qa.jsonl", jsonl([{"question": "a", "context": "b"}, row]))
    assert_located(data_error(qa_table_to_retrieval, table, tmp_path / "out"), table, 2, field)
    assert not (tmp_path / "out").exists()


def test_qa_split_rejects_degenerate_splits(tmp_path):
    table = write_qa_csv(tmp_path / "qa.csv", [("q1", "p1"), ("q2", "p2"), ("q3", "p3")])
    with pytest.raises(DataError, match="no test question"):
        qa_table_to_retrieval(table, tmp_path / "out", test_fraction=0.1)  # round(0.3) = 0
    same = write_qa_csv(tmp_path / "same.csv", [("q", "p1"), ("q", "p2"), ("q", "p3")])
    with pytest.raises(DataError, match="every question ends up in the test split"):
        qa_table_to_retrieval(same, tmp_path / "out", test_fraction=0.5)
    for fraction in (0, 1, -0.1, 1.5):
        with pytest.raises(QtuneError, match="test fraction"):
            qa_table_to_retrieval(table, tmp_path / "out", test_fraction=fraction)
    assert not (tmp_path / "out").exists()


def test_skip_empty_drops_rows_after_the_split_and_keeps_their_passages(tmp_path):
    rows = [(f"question {i}" if i not in (3, 7) else "", f"passage {i}") for i in range(20)]
    table = tmp_path / "qa.csv"
    with open(table, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "context"])
        writer.writerows(rows)
    with pytest.raises(DataError) as error:
        qa_table_to_retrieval(table, tmp_path / "strict")
    assert (error.value.line, error.value.field) == (5, "question")
    assert not (tmp_path / "strict").exists()

    stats = qa_table_to_retrieval(table, tmp_path / "out", test_fraction=0.25, seed=3, skip_empty=True)
    shuffled = list(range(20))
    random.Random(3).shuffle(shuffled)
    expected_test = {f"question {i}" for i in shuffled[:5] if i not in (3, 7)}
    data = read_beir(tmp_path / "out" / "test")
    assert set(data.queries.values()) == expected_test
    assert stats["skipped"] == 2 and stats["test_queries"] == len(expected_test)
    assert len(data.corpus) == 20  # the passages of the skipped rows are still in the corpus
    train = {g.query for g in read_query_groups(tmp_path / "out" / "train.jsonl")}
    assert train == {f"question {i}" for i in shuffled[5:] if i not in (3, 7)}
