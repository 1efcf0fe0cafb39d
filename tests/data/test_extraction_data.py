"""Tests for JSON-extraction data (qtune.data.extraction): SFT JSONL rows, target texts and the PII
person-record converter. Synthetic files only; nothing here reads the shared data sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import BOM, assert_located, data_error, jsonl, read_jsonl, write
from qtune.data.extraction import (
    PII_INSTRUCTION,
    pii_to_sft,
    read_extraction,
    target_text,
)
from qtune.errors import QtuneError
from qtune.records import ExtractionExample


# --- target_text ---------------------------------------------------------------------------------

def test_target_text_keeps_chinese_unescaped():
    value = {"name": "白雅宁", "address": "黑龙江省哈尔滨市", "phone": "13945671234"}
    text = target_text(value)
    assert text == '{"name": "白雅宁", "address": "黑龙江省哈尔滨市", "phone": "13945671234"}'
    assert "\\u" not in text
    assert json.loads(text) == value


def test_target_text_list_string_and_other():
    assert target_text(["a", 1, None]) == '["a", 1, null]'
    assert target_text("  plain answer \n") == "  plain answer \n"  # a string is the target as it is
    with pytest.raises(TypeError):
        target_text(3)


# --- read_extraction -----------------------------------------------------------------------------

def test_reads_objects_strings_and_instructions(tmp_path):
    path = write(tmp_path / "d.jsonl", BOM + jsonl([
        {"instruction": "抽取姓名", "input": "张三住在北京", "output": {"name": "张三", "city": "北京"}},
        "",
        {"input": "no instruction", "output": "plain text answer", "score": 3},  # extra keys ignored
        {"instruction": None, "input": "null instruction", "output": {}},
        {"instruction": "  ", "input": "blank instruction", "output": {"a": [1, 2]}},
    ]).encode())
    assert read_extraction(path) == [
        ExtractionExample("张三住在北京", '{"name": "张三", "city": "北京"}', "抽取姓名", 1),
        ExtractionExample("no instruction", "plain text answer", None, 3),
        ExtractionExample("null instruction", "{}", None, 4),
        ExtractionExample("blank instruction", '{"a": [1, 2]}', None, 5),
    ]


def test_json_extension_and_crlf(tmp_path):
    path = write(tmp_path / "d.JSON", jsonl([{"input": "x", "output": {"k": "v"}}]).replace("\n", "\r\n"))
    assert read_extraction(path) == [ExtractionExample("x", '{"k": "v"}', None, 1)]


def test_output_optional_without_require_output(tmp_path):
    path = write(tmp_path / "d.jsonl", jsonl([
        {"input": "a"}, {"input": "b", "output": None}, {"input": "c", "output": {"k": "v"}}]))
    assert read_extraction(path, require_output=False) == [
        ExtractionExample("a", None, None, 1), ExtractionExample("b", None, None, 2),
        ExtractionExample("c", '{"k": "v"}', None, 3)]
    # A present output is still checked.
    bad = write(tmp_path / "bad.jsonl", jsonl([{"input": "a", "output": [1]}]))
    assert_located(data_error(read_extraction, bad, require_output=False), bad, 1, "output")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    err = data_error(read_extraction, path)
    assert_located(err, path, None, None)
    assert err.reason == "file not found"


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file(tmp_path, content):
    path = write(tmp_path / "d.jsonl", content)
    err = data_error(read_extraction, path)
    assert_located(err, path, None, None)
    assert err.reason == "no data rows"


@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.txt", "d"])
def test_unsupported_extension(tmp_path, name):
    path = write(tmp_path / name, jsonl([{"input": "a", "output": "b"}]))
    err = data_error(read_extraction, path)
    assert_located(err, path, None, None)
    assert "extraction data is JSONL (.jsonl or .json" in str(err)


def test_malformed_json_line(tmp_path):
    path = write(tmp_path / "d.jsonl", jsonl([{"input": "a", "output": "b"}, '{"input": "a", "output": ']))
    err = data_error(read_extraction, path)
    assert_located(err, path, 2, None)
    assert err.reason.startswith("malformed JSON")


def test_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "d.jsonl", jsonl([{"input": "a", "output": "b"}, ["input", "a"]]))
    err = data_error(read_extraction, path)
    assert_located(err, path, 2, None)
    assert err.reason == "expected a JSON object, got list"


GOOD = {"input": "text", "output": {"k": "v"}}


@pytest.mark.parametrize("row, field, reason", [
    ({"output": {"k": "v"}}, "input", "missing field"),
    ({"input": None, "output": "b"}, "input", "expected text, got NoneType"),
    ({"input": 5, "output": "b"}, "input", "expected text, got int"),
    ({"input": ["a"], "output": "b"}, "input", "expected text, got list"),
    ({"input": "", "output": "b"}, "input", "empty text"),
    ({"input": " \t ", "output": "b"}, "input", "empty text"),
    ({"instruction": 1, "input": "a", "output": "b"}, "instruction", "expected text, got int"),
    ({"instruction": ["x"], "input": "a", "output": "b"}, "instruction", "expected text, got list"),
    ({"input": "a"}, "output", "missing field"),
    ({"input": "a", "output": None}, "output", "expected a JSON object or text, got null"),
    ({"input": "a", "output": ""}, "output", "empty text"),
    ({"input": "a", "output": "  \n"}, "output", "empty text"),
    ({"input": "a", "output": ["x"]}, "output", "expected a JSON object or text, got list"),
    ({"input": "a", "output": 3}, "output", "expected a JSON object or text, got int"),
    ({"input": "a", "output": 2.5}, "output", "expected a JSON object or text, got float"),
    ({"input": "a", "output": True}, "output", "expected a JSON object or text, got bool"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, field, reason):
    path = write(tmp_path / "d.jsonl", jsonl([GOOD, "", row, GOOD]))
    err = data_error(read_extraction, path)
    assert_located(err, path, 3, field)
    assert err.reason == reason
    assert str(err) == f"{path}:3, field '{field}': {reason}"


# --- pii_to_sft ----------------------------------------------------------------------------------

def person(i: int, **overrides) -> dict:
    record = {"name": f"姓名{i}", "gender": "女", "age": 30 + i, "location": f"北京市海淀区{i}号",
              "emailAddress": f"user{i}@163.com", "phoneNumbers": f"1380000{i:04d}", "idCardNumbers": 11010119900101,
              "naturalParagraph": f"姓名{i}住在北京市海淀区{i}号，邮箱user{i}@163.com，电话1380000{i:04d}。"}
    record.update(overrides)
    return record


def write_people(path: Path, records) -> Path:
    return write(path, json.dumps(records, ensure_ascii=False, indent=4))


def test_pii_to_sft_rows_split_and_counts(tmp_path):
    records = [person(i) for i in range(20)]
    records[3] = person(3, phoneNumbers=13812345678)  # an integer phone number becomes its digits
    records[5] = person(5, emailAddress="")  # empty: skipped
    records[7] = person(7, location=None)  # null: skipped
    del records[9]["naturalParagraph"]  # missing: skipped
    records[11] = person(11, name="  ")  # blank: skipped
    src = write_people(tmp_path / "people.json", records)
    out = tmp_path / "sft"
    counts = pii_to_sft(src, out, eval_fraction=0.25, seed=7)
    assert counts == {"records": 20, "train": 12, "eval": 4, "skipped": 4}  # 16 kept; round(0.25 * 16) = 4

    train, evals = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    assert (len(train), len(evals)) == (12, 4)
    rows = train + evals
    kept = [i for i in range(20) if i not in (5, 7, 9, 11)]
    assert sorted(r["input"] for r in rows) == sorted(records[i]["naturalParagraph"] for i in kept)
    assert not {r["input"] for r in train} & {r["input"] for r in evals}
    by_input = {r["input"]: r for r in rows}
    assert by_input[records[0]["naturalParagraph"]] == {
        "instruction": PII_INSTRUCTION, "input": records[0]["naturalParagraph"],
        "output": {"name": "姓名0", "address": "北京市海淀区0号", "email": "user0@163.com", "phone": "13800000000"}}
    assert list(by_input[records[0]["naturalParagraph"]]) == ["instruction", "input", "output"]
    assert list(by_input[records[0]["naturalParagraph"]]["output"]) == ["name", "address", "email", "phone"]
    assert by_input[records[3]["naturalParagraph"]]["output"]["phone"] == "13812345678"

    # Each file keeps source order; the text is written unescaped, one object per line.
    order = {records[i]["naturalParagraph"]: i for i in kept}
    for part in (train, evals):
        assert [order[r["input"]] for r in part] == sorted(order[r["input"]] for r in part)
    raw = (out / "train.jsonl").read_text(encoding="utf-8")
    assert "姓名" in raw and "\\u" not in raw
    assert raw.endswith("\n") and raw.count("\n") == 12
    # Every row reads back as an extraction example whose target is the compact JSON of the object.
    examples = read_extraction(out / "eval.jsonl")
    assert [e.output for e in examples] == [target_text(r["output"]) for r in evals]
    assert all(e.instruction == PII_INSTRUCTION for e in examples)
    assert not list(out.glob(".*.tmp"))


def test_pii_to_sft_split_is_the_documented_shuffle(tmp_path):
    import random

    records = [person(i) for i in range(30)]
    src = write_people(tmp_path / "people.json", records)
    pii_to_sft(src, tmp_path / "a", eval_fraction=0.1, seed=42)
    indices = list(range(30))
    random.Random(42).shuffle(indices)
    expected = sorted(indices[:3])  # round(0.1 * 30)
    assert [r["input"] for r in read_jsonl(tmp_path / "a" / "eval.jsonl")] == \
        [records[i]["naturalParagraph"] for i in expected]


def test_pii_to_sft_is_deterministic_by_seed(tmp_path):
    src = write_people(tmp_path / "people.json", [person(i) for i in range(40)])
    pii_to_sft(src, tmp_path / "a", seed=1)
    pii_to_sft(src, tmp_path / "b", seed=1)
    pii_to_sft(src, tmp_path / "c", seed=2)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "eval.jsonl").read_bytes() != (tmp_path / "c" / "eval.jsonl").read_bytes()
    assert len(read_jsonl(tmp_path / "c" / "eval.jsonl")) == 4  # round(0.1 * 40)


def test_pii_to_sft_custom_instruction(tmp_path):
    src = write_people(tmp_path / "people.json", [person(i) for i in range(4)])
    pii_to_sft(src, tmp_path / "a", eval_fraction=0.5, instruction="抽取个人信息")
    assert {r["instruction"] for r in read_jsonl(tmp_path / "a" / "train.jsonl")} == {"抽取个人信息"}


def test_pii_to_sft_source_errors(tmp_path):
    out = tmp_path / "out"
    bad_json = write(tmp_path / "bad.json", '[\n  {"name": "a",\n  }\n]')
    err = data_error(pii_to_sft, bad_json, out)
    assert_located(err, bad_json, 3, None)
    assert err.reason.startswith("not valid JSON: ")

    not_list = write(tmp_path / "obj.json", json.dumps({"records": [person(0)]}))
    err = data_error(pii_to_sft, not_list, out)
    assert_located(err, not_list, None, None)
    assert err.reason == "expected a JSON list of person records, got dict"

    empty = write(tmp_path / "empty.json", "[]")
    assert data_error(pii_to_sft, empty, out).reason == "no records"

    missing = tmp_path / "missing.json"
    assert data_error(pii_to_sft, missing, out).reason == "file not found"

    item = write_people(tmp_path / "item.json", [person(0), "a string"])
    err = data_error(pii_to_sft, item, out)
    assert_located(err, item, None, None)
    assert err.reason == "record at index 1: expected a JSON object, got str"

    for field, value, expected in [("phoneNumbers", ["138"], "text or an integer, got list"),
                                   ("phoneNumbers", 1.5, "text or an integer, got float"),
                                   ("name", True, "text or an integer, got bool"),
                                   ("naturalParagraph", 5, "text, got int")]:
        wrong = write_people(tmp_path / "wrong.json", [person(0), person(1), person(2, **{field: value})])
        err = data_error(pii_to_sft, wrong, out)
        assert_located(err, wrong, None, field)
        assert err.reason == f"record at index 2: expected {expected}"
    assert not out.exists()  # nothing written after an error


def test_pii_to_sft_fraction_checks(tmp_path):
    src = write_people(tmp_path / "people.json", [person(i) for i in range(4)] + [person(9, name="")])
    for fraction in (0, 1, -0.1, 1.5):
        with pytest.raises(QtuneError, match="eval fraction must be between 0 and 1"):
            pii_to_sft(src, tmp_path / "out", eval_fraction=fraction)
    err = data_error(pii_to_sft, src, tmp_path / "out", eval_fraction=0.1)  # round(0.4) = 0
    assert err.reason == "4 usable records with eval fraction 0.1 leave no eval row (1 skipped)"
    err = data_error(pii_to_sft, src, tmp_path / "out", eval_fraction=0.9)  # round(3.6) = 4
    assert err.reason == "4 usable records with eval fraction 0.9 leave no train row (1 skipped)"
