"""Parquet files, Hugging Face datasets folders and hub datasets read to the same records as the
CSV/JSONL they hold, with the same checks and file:row:field errors (qtune.data.sources)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from qtune.data.extraction import pii_to_sft, read_extraction
from qtune.data.pairs import read_pairs
from qtune.data.retrieval import qa_table_to_retrieval, read_beir, read_corpus, read_query_groups
from qtune.data.tables import write_table
from qtune.errors import DataError
from qtune.kb.faq import question_id, read_faq
from qtune.tasks.classify.data import read_labelled, read_texts

CLOSED_PORT = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused at once
EXTRA = "pip install 'qtune[data]'"


def columns(rows: list[dict]) -> list[dict]:
    """Every row with every key: a key a row lacks is a null, as a columnar file holds it (both
    writers take the columns from the first row alone)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k) for k in keys} for row in rows]


def parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(columns(rows)), path)
    return path


def datasets_folder(path: Path, rows: list[dict]) -> Path:
    Dataset.from_list(columns(rows)).save_to_disk(str(path))
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def one_line_down(records):
    """CSV records as the columnar ones number them: the CSV's header is line 1, its first data row line 2."""
    return [replace(r, line=r.line - 1) for r in records]


def data_error(fn, *args, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return info.value


PAIRS = [{"sentence1": "the cat", "sentence2": "a dog", "label": 1},
         {"sentence1": "my car", "sentence2": "蓝色的天", "label": 0},
         {"sentence1": "a bus", "sentence2": "the tram", "label": 1}]


@pytest.mark.parametrize("make", [parquet, datasets_folder])
def test_pairs_with_integer_labels_read_as_from_csv(tmp_path, make):
    csv = tmp_path / "pairs.csv"
    write_table(csv, PAIRS, ["sentence1", "sentence2", "label"])
    source = make(tmp_path / "pairs.parquet" if make is parquet else tmp_path / "pairs-ds", PAIRS)
    pairs = read_pairs(source)
    assert pairs == one_line_down(read_pairs(csv))
    assert [(p.sentence2, p.label, p.line) for p in pairs] == [("a dog", 1, 1), ("蓝色的天", 0, 2), ("the tram", 1, 3)]


@pytest.mark.parametrize("make", [parquet, datasets_folder])
def test_classify_texts_and_labels_read_as_from_csv(tmp_path, make):
    rows = [{"text": "great film", "label": "pos", "id": 7}, {"text": "dull", "label": "neg", "id": 8},
            {"text": "fine", "label": "pos", "id": 9}]
    csv = tmp_path / "texts.csv"
    write_table(csv, rows, ["text", "label", "id"])
    source = make(tmp_path / "texts.parquet" if make is parquet else tmp_path / "texts-ds", rows)
    examples, labels = read_labelled(source)
    csv_examples, csv_labels = read_labelled(csv)
    assert (examples, labels) == (one_line_down(csv_examples), csv_labels) == (examples, ["neg", "pos"])
    assert [e.label for e in examples] == [1, 0, 1]
    table_rows, names, unlabelled = read_texts(source)
    assert names == ["text", "label", "id"]
    assert [r.fields["id"] for r in table_rows] == [7, 8, 9]  # kept as the column's type, for prediction output
    assert [(e.text, e.label, e.line) for e in unlabelled] == [("great film", None, 1), ("dull", None, 2),
                                                               ("fine", None, 3)]


GROUPS = [{"query": "where is the cat", "pos": ["upstairs", "on the bed"], "neg": ["in the car"]},
          {"query": "bus times", "pos": ["every ten minutes"]},  # no negatives: a null in a list column
          {"query": "tram", "pos": ["line 4"], "neg": []}]


@pytest.mark.parametrize("make", [parquet, datasets_folder])
def test_query_groups_with_list_columns_read_as_from_jsonl(tmp_path, make):
    source = make(tmp_path / "train.parquet" if make is parquet else tmp_path / "train-ds", GROUPS)
    groups = read_query_groups(source)
    assert groups == read_query_groups(jsonl(tmp_path / "train.jsonl", GROUPS))
    assert [(g.positives, g.negatives, g.line) for g in groups] == [
        (("upstairs", "on the bed"), ("in the car",), 1), (("every ten minutes",), (), 2), (("line 4",), (), 3)]


def test_swift_and_flagembedding_rows_in_one_parquet_read_as_from_jsonl(tmp_path):
    """A columnar file fills the other format's columns with nulls; they are missing fields, not a mix."""
    rows = [{"query": "q1", "pos": ["p1"], "neg": ["n1"]},
            {"query": "q2", "response": "r2", "rejected_response": ["x"]}]
    assert read_query_groups(parquet(tmp_path / "mixed.parquet", rows)) == read_query_groups(
        jsonl(tmp_path / "mixed.jsonl", rows))


def test_a_text_where_a_list_of_passages_is_expected(tmp_path):
    err = data_error(read_query_groups, parquet(tmp_path / "t.parquet", [{"query": "q", "pos": "one passage"}]))
    assert str(err) == f"{tmp_path / 't.parquet'}:1, field 'pos': expected a list of strings, got str"


EXTRACTION = [{"instruction": "Extract the name.", "input": "张三住在北京", "output": {"name": "张三", "city": "北京"}},
              {"input": "李四, 上海", "output": {"name": "李四", "city": "上海"}},  # default instruction: a null
              {"instruction": "", "input": "王五", "output": {"name": "王五", "city": "广州"}}]


@pytest.mark.parametrize("make", [parquet, datasets_folder])
def test_extraction_rows_with_struct_outputs_read_as_from_jsonl(tmp_path, make):
    source = make(tmp_path / "sft.parquet" if make is parquet else tmp_path / "sft-ds", EXTRACTION)
    examples = read_extraction(source)
    assert examples == read_extraction(jsonl(tmp_path / "sft.jsonl", EXTRACTION))
    assert [(e.instruction, e.output) for e in examples] == [
        ("Extract the name.", '{"name": "张三", "city": "北京"}'), (None, '{"name": "李四", "city": "上海"}'),
        (None, '{"name": "王五", "city": "广州"}')]


def test_extraction_input_without_outputs_for_prediction(tmp_path):
    source = parquet(tmp_path / "in.parquet", [{"input": "a", "output": None}, {"input": "b", "output": None}])
    assert [(e.input, e.output) for e in read_extraction(source, require_output=False)] == [("a", None), ("b", None)]
    err = data_error(read_extraction, source)
    assert str(err) == f"{source}:1, field 'output': missing field"


def test_pii_records_from_parquet_convert_as_from_the_json_list(tmp_path):
    people = [{"naturalParagraph": f"我是{n}", "name": n, "location": "北京", "emailAddress": f"{i}@x.cn",
               "phoneNumbers": 1380000000 + i} for i, n in enumerate(["张三", "李四", "王五", "赵六"])]
    people.append({**people[0], "emailAddress": None})  # skipped, as a JSON record with a null field is
    json_list = tmp_path / "people.json"
    json_list.write_text(json.dumps(people, ensure_ascii=False), encoding="utf-8")
    counts = pii_to_sft(parquet(tmp_path / "people.parquet", people), tmp_path / "from-parquet", eval_fraction=0.25)
    assert counts == pii_to_sft(json_list, tmp_path / "from-json", eval_fraction=0.25)
    assert counts == {"records": 5, "train": 3, "eval": 1, "skipped": 1}
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "from-parquet" / name).read_bytes() == (tmp_path / "from-json" / name).read_bytes()


FAQ = [{"id": "a1", "question": "How do I reset my password?", "answer": "Use the link on the login page."},
       {"id": None, "question": "Where is my order?", "answer": "See Orders in your account."}]


@pytest.mark.parametrize("make", [parquet, datasets_folder])
def test_faq_tables_read_as_from_csv(tmp_path, make):
    csv = tmp_path / "faq.csv"
    write_table(csv, [{**r, "id": r["id"] or ""} for r in FAQ], ["id", "question", "answer"])
    source = make(tmp_path / "faq.parquet" if make is parquet else tmp_path / "faq-ds", FAQ)
    entries = read_faq(source)
    assert entries == read_faq(csv)
    assert [e.id for e in entries] == ["a1", question_id("Where is my order?")]  # a null id: as an empty cell


def test_qa_table_split_from_parquet_writes_the_same_files_as_from_csv(tmp_path):
    rows = [{"question": f"question {i}", "context": f"passage {i % 4}"} for i in range(20)]
    csv = tmp_path / "qa.csv"
    write_table(csv, rows, ["question", "context"])
    from_csv = qa_table_to_retrieval(csv, tmp_path / "out-csv", test_fraction=0.2)
    from_parquet = qa_table_to_retrieval(parquet(tmp_path / "qa.parquet", rows), tmp_path / "out-pq", test_fraction=0.2)
    assert from_parquet == from_csv
    for name in ("train.jsonl", "test/corpus.jsonl", "test/queries.jsonl", "test/qrels/test.tsv"):
        assert (tmp_path / "out-pq" / name).read_bytes() == (tmp_path / "out-csv" / name).read_bytes()


def test_beir_folder_of_parquet_files_reads_as_the_jsonl_one(tmp_path):
    corpus = [{"_id": "d1", "title": "Cats", "text": "sleep a lot"}, {"_id": "d2", "title": None, "text": "buses run"}]
    queries = [{"_id": "q1", "text": "what do cats do"}, {"_id": "q2", "text": "when do buses run"}]
    qrels = [{"query-id": "q1", "corpus-id": "d1", "score": 1}, {"query-id": "q2", "corpus-id": "d2", "score": 2}]
    jsonl_folder, parquet_folder = tmp_path / "jsonl", tmp_path / "parquet"
    for folder in (jsonl_folder, parquet_folder):
        (folder / "qrels").mkdir(parents=True)
    jsonl(jsonl_folder / "corpus.jsonl", [{**d, "title": d["title"] or ""} for d in corpus])
    jsonl(jsonl_folder / "queries.jsonl", queries)
    (jsonl_folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\n")
    parquet(parquet_folder / "corpus.parquet", corpus)
    parquet(parquet_folder / "queries.parquet", queries)
    parquet(parquet_folder / "qrels" / "test.parquet", qrels)
    data = read_beir(parquet_folder)
    assert data == read_beir(jsonl_folder)
    assert data.corpus == {"d1": "Cats sleep a lot", "d2": "buses run"}
    assert data.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}
    assert read_corpus(parquet_folder / "corpus.parquet") == data.corpus


# --- errors --------------------------------------------------------------------------------------

def test_a_null_text_is_the_empty_cell_error_naming_file_row_and_field(tmp_path):
    rows = [dict(PAIRS[0]), {**PAIRS[1], "sentence2": None}]
    source = parquet(tmp_path / "train.parquet", rows)
    err = data_error(read_pairs, source)
    assert (err.path, err.line, err.field, err.reason) == (str(source), 2, "sentence2", "empty text")
    assert str(err) == f"{source}:2, field 'sentence2': empty text"
    csv = tmp_path / "train.csv"
    write_table(csv, [{**r, "sentence2": r["sentence2"] or ""} for r in rows], ["sentence1", "sentence2", "label"])
    assert data_error(read_pairs, csv).reason == err.reason


def test_a_null_label_is_the_empty_label_error(tmp_path):
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": None}, {"text": "c", "label": "y"}]
    err = data_error(read_labelled, datasets_folder(tmp_path / "ds", rows))
    assert str(err) == f"{tmp_path / 'ds'}:2, field 'label': empty label"


def test_a_list_column_where_a_text_is_expected(tmp_path):
    source = parquet(tmp_path / "t.parquet", [{"text": ["a", "b"], "label": "x"}])
    assert str(data_error(read_texts, source)) == f"{source}:1, field 'text': expected text, got list"


def test_a_float_label_is_refused_as_in_jsonl(tmp_path):
    rows = [{"sentence1": "a", "sentence2": "b", "label": 1.0}]
    err = data_error(read_pairs, parquet(tmp_path / "t.parquet", rows))
    assert (err.line, err.field, err.reason) == (1, "label", "label must be text or an integer, got 1.0")


def test_a_missing_column_is_named(tmp_path):
    source = parquet(tmp_path / "t.parquet", [{"question": "a", "reply": "b"}])
    assert str(data_error(read_faq, source)) == f"{source}:1, field 'answer': missing column"


def test_a_file_that_is_not_parquet(tmp_path):
    source = tmp_path / "t.parquet"
    source.write_text("sentence1,sentence2,label\n")
    err = data_error(read_pairs, source)
    assert err.path == str(source) and err.reason.startswith("not a readable Parquet file: ")
    assert data_error(read_pairs, tmp_path / "missing.parquet").reason == "file not found"


def test_an_empty_parquet_file_has_no_data_rows(tmp_path):
    schema = pa.schema([("sentence1", pa.string()), ("sentence2", pa.string()), ("label", pa.int64())])
    pq.write_table(schema.empty_table(), tmp_path / "t.parquet")
    assert data_error(read_pairs, tmp_path / "t.parquet").reason == "no data rows"


def test_unsupported_file_types_name_the_columnar_sources(tmp_path):
    (tmp_path / "t.xlsx").write_bytes(b"PK")
    err = data_error(read_pairs, tmp_path / "t.xlsx")
    assert err.reason == ("unsupported file type '.xlsx'; use one of .csv, .json, .jsonl, .tsv, .txt, .parquet, "
                          "a datasets folder (save_to_disk) or hf://datasets/NAME")


# --- splits --------------------------------------------------------------------------------------

def dataset_dict(tmp_path: Path, **splits: list[dict]) -> Path:
    folder = tmp_path / "dd"
    DatasetDict({name: Dataset.from_list(columns(rows)) for name, rows in splits.items()}).save_to_disk(str(folder))
    return folder


def test_a_dataset_dict_with_several_splits_needs_one_picked(tmp_path):
    folder = dataset_dict(tmp_path, train=PAIRS, test=PAIRS[:1])
    err = data_error(read_pairs, folder)
    assert str(err) == f"{folder}: holds the splits train, test; pick one as {folder}:SPLIT (e.g. {folder}:train)"
    assert [p.sentence1 for p in read_pairs(f"{folder}:test")] == ["the cat"]
    assert len(read_pairs(f"{folder}:train")) == 3
    err = data_error(read_pairs, f"{folder}:dev")
    assert str(err) == f"{folder}:dev: no split 'dev'; the splits are train, test"


def test_a_dataset_dict_with_one_split_reads_it(tmp_path):
    assert len(read_pairs(dataset_dict(tmp_path, validation=PAIRS))) == 3


def test_a_single_dataset_takes_no_split(tmp_path):
    folder = datasets_folder(tmp_path / "ds", PAIRS)
    err = data_error(read_pairs, f"{folder}:train")
    assert str(err) == f"{folder}:train: is a single dataset without splits; drop ':train'"


def test_a_folder_that_is_not_a_datasets_folder(tmp_path):
    (tmp_path / "plain").mkdir()
    for source in (tmp_path / "plain", f"{tmp_path / 'plain'}:train"):
        assert data_error(read_pairs, source).reason == ("is a folder but not a Hugging Face datasets folder (no "
                                                         "dataset_dict.json or state.json, which save_to_disk writes)")
    (tmp_path / "pairs.csv").mkdir()
    assert data_error(read_pairs, tmp_path / "pairs.csv").reason == "is a folder, expected a file"
    (tmp_path / "pairs.parquet").mkdir()
    assert data_error(read_pairs, tmp_path / "pairs.parquet").reason == "is a folder, expected a Parquet file"


# --- the hub and the extra -----------------------------------------------------------------------

@pytest.fixture
def closed_hub(monkeypatch, tmp_path):
    """The hub settings as read at call time: online, at a port where nothing listens."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_PORT)
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)


@pytest.mark.parametrize("read", [read_pairs, read_query_groups, read_extraction])
def test_a_hub_dataset_with_the_hub_unreachable_fails_fast(closed_hub, read):
    start = time.monotonic()
    err = data_error(read, "hf://datasets/someorg/qa:train")
    assert time.monotonic() - start < 5
    assert err.path in ("hf://datasets/someorg/qa:train", "hf:/datasets/someorg/qa:train")  # Path() folds "//"
    assert err.reason == (f"the Hugging Face hub ({CLOSED_PORT}) cannot be reached (no network: pass a local Parquet "
                          "file or datasets folder, or set HF_HUB_OFFLINE=1 to read the dataset from the local cache)")


def split_hub_dataset(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """`qtune data retrieval-split hf://datasets/someorg/qa` in a fresh interpreter (the hub clients read
    their settings at import) with an empty cache."""
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    environ.update(HF_HOME=str(tmp_path / "hf-home"), **env)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "qtune.cli", "data", "retrieval-split", "hf://datasets/someorg/qa",
                           "--output", str(tmp_path / "out")], env=environ, capture_output=True, text=True,
                          timeout=60, check=False)
    return proc, time.monotonic() - start


def test_the_cli_with_a_hub_dataset_and_no_network(tmp_path):
    proc, seconds = split_hub_dataset(tmp_path, HF_ENDPOINT=CLOSED_PORT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("qtune: error: hf://datasets/someorg/qa: the Hugging Face hub "), proc.stderr
    assert CLOSED_PORT in proc.stderr and "Traceback" not in proc.stderr and "Retrying" not in proc.stderr
    assert seconds < 20  # interpreter start and imports included
    assert not (tmp_path / "out").exists()


def test_the_cli_with_a_hub_dataset_not_in_the_cache_offline(tmp_path):
    proc, seconds = split_hub_dataset(tmp_path, HF_ENDPOINT=CLOSED_PORT, HF_HUB_OFFLINE="1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("qtune: error: hf://datasets/someorg/qa: cannot load hub dataset 'someorg/qa': ")
    assert "HF_HUB_OFFLINE=1 reads only datasets in the local Hugging Face cache" in proc.stderr
    assert "Traceback" not in proc.stderr and seconds < 20
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing", ["pyarrow", "datasets"])
def test_without_the_data_extra_the_error_names_it(tmp_path, monkeypatch, missing):
    if missing == "datasets":
        source = datasets_folder(tmp_path / "ds", PAIRS)
    else:
        source = parquet(tmp_path / "t.parquet", PAIRS)
    for name in [m for m in sys.modules if m == missing or m.startswith(f"{missing}.")]:
        monkeypatch.setitem(sys.modules, name, None)
    err = data_error(read_pairs, source)
    assert str(err) == (f"{source}: reading Parquet files and Hugging Face datasets needs the optional packages "
                        f"datasets and pyarrow: {EXTRA}")


def test_text_tables_need_no_extra(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] in ("pyarrow", "datasets")]:
        monkeypatch.setitem(sys.modules, name, None)
    csv = tmp_path / "pairs.csv"
    write_table(csv, PAIRS, ["sentence1", "sentence2", "label"])
    assert len(read_pairs(csv)) == 3
    assert len(read_query_groups(jsonl(tmp_path / "g.jsonl", GROUPS))) == 3
