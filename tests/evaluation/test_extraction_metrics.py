"""Tests for JSON-extraction evaluation (qtune.evaluation.extraction): answer parsing, hand-computed
metrics, and the report, metrics and plot files."""

from __future__ import annotations

import json

import pytest

from qtune.evaluation.extraction import (
    extraction_metrics,
    extraction_report,
    parse_answer,
    plot_extraction,
    write_extraction_outputs,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def ref(**fields) -> str:
    return json.dumps(fields, ensure_ascii=False)


# --- parse_answer --------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    '{"name": "张三", "phone": "138"}',
    '  \n{"name": "张三", "phone": "138"}\n ',
    '```json\n{"name": "张三", "phone": "138"}\n```',
    '```JSON\n{"name": "张三", "phone": "138"}```',
    '```\n{"name": "张三",\n "phone": "138"}\n```\n',
    '```json {"name": "张三", "phone": "138"} ```',
])
def test_parse_answer_objects(text):
    assert parse_answer(text) == ({"name": "张三", "phone": "138"}, None)


@pytest.mark.parametrize("text, reason", [
    ('[1, 2]', "not a JSON object: got list"),
    ('```json\n["a"]\n```', "not a JSON object: got list"),
    ('"just text"', "not a JSON object: got str"),
    ('42', "not a JSON object: got int"),
    ('4.5', "not a JSON object: got float"),
    ('true', "not a JSON object: got bool"),
    ('null', "not a JSON object: got null"),
    ('', "not valid JSON: empty answer"),
    ('  \n ', "not valid JSON: empty answer"),
    ('```json\n```', "not valid JSON: empty answer"),
])
def test_parse_answer_rejects(text, reason):
    assert parse_answer(text) == (None, reason)


@pytest.mark.parametrize("text, message", [
    ('{"name": "张三"} and some more text', "Extra data"),
    ('{"a": 1}\n{"b": 2}', "Extra data"),
    ('Here is the JSON: {"a": 1}', "Expecting value"),
    ('{"name": "张三"', "Expecting ',' delimiter"),
    ("{'name': 'x'}", "Expecting property name enclosed in double quotes"),
    ('```json\n{"a": 1}\n``` trailing', "Expecting value"),  # not a fence around the whole answer
    ('{"a": NaN}', "NaN is not JSON"),
])
def test_parse_answer_invalid_json(text, message):
    value, reason = parse_answer(text)
    assert value is None
    assert reason.startswith("not valid JSON: ") and message in reason, reason


def test_parse_answer_reports_position():
    assert parse_answer('{"a": 1,\n "b": }') == (None, "not valid JSON: Expecting value (line 2, column 7)")


# --- extraction_metrics: hand-computed -----------------------------------------------------------

def test_four_rows_known_mix():
    references = [ref(name="张三", phone="138"),
                  ref(name="李四", phone="139"),
                  ref(name="王五", phone="137"),
                  ref(name="赵六", phone="136")]
    predictions = [{"name": "张三", "phone": "138", "extra": "ignored"},  # all right
                   {"name": "李四", "phone": "000"},  # name right, phone wrong
                   None,  # invalid answer: wrong everywhere
                   {"name": " 赵六 ", "phone": 136}]  # right after strip / as text
    assert extraction_metrics(references, predictions) == {
        "count": 4,
        "json_valid": 0.75,  # 3 of 4 are dicts
        "all_fields_exact": 0.5,  # rows 1 and 4
        "fields": {"name": 0.75, "phone": 0.5},  # name: rows 1, 2, 4; phone: rows 1, 4
    }


def test_missing_field_is_wrong_and_fields_in_first_seen_order():
    references = [ref(b="1", a="2"), ref(a="2", c="3")]
    predictions = [{"b": "1"}, {"a": "2", "c": "3"}]
    got = extraction_metrics(references, predictions)
    assert list(got["fields"]) == ["b", "a", "c"]
    # b: scored on row 1 only (right); a: rows 1 (missing) and 2 (right); c: row 2 only (right).
    assert got["fields"] == {"b": 1.0, "a": 0.5, "c": 1.0}
    assert got["all_fields_exact"] == 0.5
    assert got["json_valid"] == 1.0


def test_value_comparison_rules():
    references = [ref(v="13800000000"), ref(v=13800000000), ref(v=None), ref(v=""), ref(v=1), ref(v=1),
                  ref(v="Ab"), ref(v={"x": 1, "y": [1, "二"]}), ref(v=True)]
    predictions = [{"v": 13800000000}, {"v": "13800000000 "}, {"v": None}, {"v": None}, {"v": 1.0}, {"v": True},
                   {"v": "ab"}, {"v": {"y": [1, "二"], "x": 1}}, {"v": "true"}]
    got = extraction_metrics(references, predictions)
    # right: 1 (int vs digits), 2 (digits vs int, stripped), 3 (null vs null), 8 (key order ignored),
    # 9 (true as text); wrong: 4 (null vs ""), 5 (1 vs 1.0), 6 (1 vs true), 7 (case).
    assert got["fields"] == {"v": pytest.approx(5 / 9)}
    assert got["all_fields_exact"] == pytest.approx(5 / 9)


def test_empty_reference_object_matches_any_dict():
    got = extraction_metrics([ref(), ref()], [{"anything": 1}, None])
    assert got == {"count": 2, "json_valid": 0.5, "all_fields_exact": 0.5, "fields": {}}


def test_non_object_references_compare_whole_values():
    references = ['["a", "b"]', "plain answer", ref(k="v"), '"quoted"']
    predictions = [["a", "b"], " plain answer ", {"k": "v"}, None]
    got = extraction_metrics(references, predictions)
    assert got["count"] == 4
    assert got["json_valid"] == 0.25  # only the dict
    assert got["all_fields_exact"] == 0.75  # rows 1-3; row 4 has no prediction
    assert got["fields"] == {"k": 1.0}  # the object reference only


def test_length_checks():
    with pytest.raises(ValueError, match="2 references but 1 predictions"):
        extraction_metrics([ref(a=1), ref(a=1)], [None])
    with pytest.raises(ValueError, match="no rows"):
        extraction_metrics([], [])


# --- reports and files ---------------------------------------------------------------------------

RESULTS = {
    "runs/pii/best": {"count": 4, "json_valid": 1.0, "all_fields_exact": 0.75,
                      "fields": {"name": 1.0, "phone": 0.75}},
    "Qwen/Qwen3-0.6B": {"count": 4, "json_valid": 0.5, "all_fields_exact": 0.25,
                        "fields": {"name": 0.5, "phone": 0.25, "email": 0.0}},
}


def test_report_side_by_side_with_change():
    report = extraction_report(RESULTS, "data/eval.jsonl")
    lines = report.split("\n")
    assert lines[0] == "# JSON extraction: data/eval.jsonl"
    assert "Rows scored: pii/best: 4, Qwen/Qwen3-0.6B: 4" in report
    assert "| metric | runs/pii/best | Qwen/Qwen3-0.6B | change |" in lines
    assert "| json_valid | 1.0000 | 0.5000 | +0.5000 |" in lines
    assert "| all_fields_exact | 0.7500 | 0.2500 | +0.5000 |" in lines
    assert "| field:name | 1.0000 | 0.5000 | +0.5000 |" in lines
    assert "| field:phone | 0.7500 | 0.2500 | +0.5000 |" in lines
    assert "| field:email |  | 0.0000 |  |" in lines  # the first model has no such field
    rows = [line.split(" | ")[0] for line in lines if line.startswith("| ")]
    assert rows == ["| metric", "| json_valid", "| all_fields_exact", "| field:name", "| field:phone", "| field:email"]


def test_report_single_model_has_no_change_column():
    report = extraction_report({"m": RESULTS["runs/pii/best"]}, "d.jsonl")
    assert "| metric | m |" in report and "change" not in report
    assert "| field:phone | 0.7500 |" in report


def test_write_outputs(tmp_path):
    out = tmp_path / "eval"
    write_extraction_outputs(RESULTS, "data/eval.jsonl", out)
    assert sorted(p.name for p in out.iterdir()) == ["extraction.png", "metrics.json", "report.md"]
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8")) == RESULTS
    assert (out / "report.md").read_text(encoding="utf-8") == extraction_report(RESULTS, "data/eval.jsonl")
    assert (out / "extraction.png").read_bytes()[:8] == PNG_SIGNATURE


def test_plot_single_model(tmp_path):
    path = tmp_path / "one.png"
    plot_extraction({"m": RESULTS["runs/pii/best"]}, path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert not list(tmp_path.glob(".*.tmp"))
