"""Per-query base-vs-tuned comparison: ranks of the first relevant passage, what overtook it, the sections."""

from __future__ import annotations

from qtune.evaluation.query_report import (first_relevant_rank, per_query_markdown, query_rows, rank_change,
                                           snippet, worse_and_better)

QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 2}, "q3": {"d4": 1}, "q4": {"d1": 0}}
QUERIES = {"q1": "first query", "q2": "second | query", "q3": "third query", "q4": "unjudged"}
CORPUS = {f"d{i}": f"passage {i} " + "x" * 200 for i in range(1, 6)}
BASE = {"q1": ["d1", "d2", "d3"], "q2": ["d5", "d4", "d3"], "q3": ["d4", "d5", "d1"]}
TUNED = {"q1": ["d5", "d2", "d1"], "q2": ["d2", "d5", "d4"], "q3": ["d1", "d2", "d3"]}


def test_first_relevant_rank_and_change():
    assert first_relevant_rank(["a", "b", "c"], {"c": 1, "b": 2}) == 2
    assert first_relevant_rank(["a", "b"], {"a": 0, "z": 1}) is None
    assert first_relevant_rank(["a", "a", "b"], {"b": 1}) == 2  # a repeated id counts once, as in the metrics
    assert rank_change(1, 3, depth=3) == 2
    assert rank_change(3, 1, depth=3) == -2
    assert rank_change(2, None, depth=3) == 2  # not retrieved = rank depth + 1
    assert rank_change(None, None, depth=3) == 0


def test_rows_give_ranks_and_what_now_ranks_above_a_worse_query():
    rows = {r["query_id"]: r for r in query_rows(BASE, TUNED, QRELS, QUERIES, CORPUS, depth=3)}
    assert list(rows) == ["q1", "q2", "q3"]  # q4 has no relevant passage
    q1, q2, q3 = rows["q1"], rows["q2"], rows["q3"]
    assert (q1["rank_before"], q1["rank_after"], q1["change"]) == (1, 3, 2)
    # d5 and d2 now rank above d1; neither was above it before (d1 was first)
    assert [(a["id"], a["new"]) for a in q1["above"]] == [("d5", True), ("d2", True)]
    assert q1["above"][0]["text"] == snippet(CORPUS["d5"]) and len(q1["above"][0]["text"]) == 101
    assert (q2["rank_before"], q2["rank_after"], q2["change"]) == (3, 1, -2) and "above" not in q2
    # q3: d4 first before, not retrieved after (counted as rank 4): all three retrieved passages are
    # above it now, and none was before
    assert (q3["rank_before"], q3["rank_after"], q3["change"]) == (1, None, 3)
    assert [(a["id"], a["new"]) for a in q3["above"]] == [("d1", True), ("d2", True), ("d3", True)]


def test_above_keeps_passages_that_were_above_before_too():
    rows = query_rows({"q": ["a", "p", "b"]}, {"q": ["a", "b", "p"]}, {"q": {"p": 1}}, {"q": "?"},
                      {"a": "A", "b": "B", "p": "P"}, depth=3)
    assert [(a["id"], a["new"]) for a in rows[0]["above"]] == [("a", False), ("b", True)]


def test_worse_and_better_are_sorted_by_rank_change():
    rows = [{"query_id": q, "change": c} for q, c in [("a", 1), ("b", -5), ("c", 7), ("d", 0), ("e", -1), ("f", 7)]]
    worse, better = worse_and_better(rows, top=2)
    assert [r["query_id"] for r in worse] == ["c", "f"]
    assert [r["query_id"] for r in better] == ["b", "e"]


def test_markdown_sections():
    rows = query_rows(BASE, TUNED, QRELS, QUERIES, CORPUS, depth=3)
    text = per_query_markdown(rows, "base-model", "run/best", depth=3, top=20)
    assert "1 queries got better, 2 got worse, 0 kept their rank" in text
    worse = text.split("### Got worse (top 2 of 2)")[1].split("### Got better")[0]
    # q3 lost the most (1 -> not retrieved), then q1 (1 -> 3)
    assert worse.index("`q3`") < worse.index("`q1`")
    assert "rank 1 -> >3; now above it:" in worse
    assert "  - `d5`: passage 5 xxx" in worse
    better = text.split("### Got better (top 1 of 1)")[1]
    assert "| q2 | second \\| query | 3 | 1 |" in better
    assert "| query | text | rank (base-model) | rank (run/best) |" in better
    none = per_query_markdown(query_rows(BASE, BASE, QRELS, QUERIES, CORPUS, depth=3), "b", "t", depth=3)
    assert none.count("none") == 2 and "0 queries got better, 0 got worse, 3 kept their rank" in none
