"""`qtune kb build|add|delete|search` and `qtune serve` refusals, in-process through `qtune.cli.main`,
plus `/v1/match` end to end over a knowledge base built by the CLI (FastAPI TestClient)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from support import assert_user_error, run
from qtune.kb.faq import question_id
from qtune.kb.store import KnowledgeBase

# Only words of the tiny BERT vocabulary (support.data), so no question collapses into [UNK]s.
FAQ = [("q1", "the cat is here", "Cats live upstairs."),
       ("q2", "a red bus now", "The bus leaves at nine."),
       ("q3", "my old horse", "Horses are in the barn."),
       ("q4", "big green train there", "Trains run hourly."),
       ("q5", "small goat", "Goats eat everything.")]
# The random tiny BERT maps these questions to nearly parallel vectors (other entries score about
# 0.99999), so "identical text" is checked tighter than that: cosine 1 up to float32 rounding.
EXACT = 2e-6


def write_faq(path: Path, rows, header: str = "id,question,answer") -> Path:
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def contents(kb: Path) -> tuple[int, dict[str, tuple[str, str]]]:
    """Entry count and {id: (question, answer)} of every FAQ id used here, read back from disk."""
    with KnowledgeBase.open(str(kb)) as store:
        ids = [r[0] for r in FAQ] + ["q6", "q7", "nope"]
        return store.count(), {e.id: (e.question, e.answer) for e in store.get(ids)}


def search(capsys, kb: Path, query: str, *extra) -> dict:
    code, out, err = run(capsys, "kb", "search", "--kb", kb, query, "--json", "--device", "cpu", *extra)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def built(tmp_path, capsys, tiny_bert_dir) -> Path:
    faq = write_faq(tmp_path / "faq.csv", FAQ)
    kb = tmp_path / "faq.db"
    code, out, err = run(capsys, "kb", "build", "--embedding", tiny_bert_dir, "--input", faq, "--kb", kb,
                         "--device", "cpu")
    assert code == 0, err
    assert out == f"built {kb}: 5 entries\n"
    return kb


# ── build, search, add, delete ──────────────────────────────────

def test_build_records_the_model_and_search_finds_each_question_first(built, capsys, tiny_bert_dir):
    with KnowledgeBase.open(str(built)) as store:
        assert store.model == str(Path(tiny_bert_dir).resolve())
        assert store.dimension == 32
    assert contents(built) == (5, {i: (q, a) for i, q, a in FAQ})

    for entry_id, question, answer in FAQ:
        result = search(capsys, built, question)
        assert set(result) == {"matched", "id", "question", "answer", "score", "candidates"}
        assert (result["id"], result["question"], result["answer"]) == (entry_id, question, answer)
        assert result["score"] == pytest.approx(1.0, abs=EXACT)
        assert result["matched"] is True  # default cosine threshold 0.8
        assert len(result["candidates"]) == 5  # default --top-k 5, the whole KB
        assert result["candidates"][0]["id"] == entry_id
        scores = [c["score"] for c in result["candidates"]]
        assert scores == sorted(scores, reverse=True)
        assert {c["id"] for c in result["candidates"]} == {r[0] for r in FAQ}

    narrowed = search(capsys, built, "my old horse", "--top-k", "2", "--threshold", "1.01")
    assert narrowed["matched"] is False and narrowed["id"] == "q3"
    assert len(narrowed["candidates"]) == 2



def test_search_text_output_shows_the_matched_answer(built, capsys, tmp_path):
    # verdict, id and score; the entry's question and answer; then one line per candidate
    code, out, err = run(capsys, "kb", "search", "--kb", built, "small goat", "--top-k", "3", "--device", "cpu")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "matched: q5  score 1.0000"
    assert lines[1:4] == ["  question: small goat", "  answer:   Goats eat everything.", "candidates:"]
    assert len(lines) == 7 and lines[4].split() == ["1.0000", "q5", "small", "goat"]
    assert [line.split()[1] for line in lines[4:]] == [c["id"] for c in search(capsys, built, "small goat",
                                                                              "--top-k", "3")["candidates"]]

    # Below the threshold the best candidate is still shown, marked as not matched.
    code, out, err = run(capsys, "kb", "search", "--kb", built, "my old horse", "--threshold", "1.01", "--device",
                         "cpu")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "no match (best: q3  score 1.0000, threshold not reached)"
    assert lines[1:3] == ["  question: my old horse", "  answer:   Horses are in the barn."]

    # An answer over several lines keeps its lines, indented under the first.
    multi = tmp_path / "multi.csv"
    multi.write_text('id,question,answer\nq9,a big plane,"Planes land on time.\nMost days."\n', encoding="utf-8")
    assert run(capsys, "kb", "add", "--kb", built, "--input", multi, "--device", "cpu")[0] == 0
    code, out, err = run(capsys, "kb", "search", "--kb", built, "a big plane", "--top-k", "1", "--device", "cpu")
    assert out.splitlines()[1:4] == ["  question: a big plane", "  answer:   Planes land on time.",
                                     " " * 12 + "Most days."]

    assert run(capsys, "kb", "delete", "--kb", built, "--ids", "q1", "q2", "q3", "q4", "q5", "q9")[0] == 0
    code, out, err = run(capsys, "kb", "search", "--kb", built, "small goat", "--device", "cpu")
    assert code == 0, err
    assert out == "no match: the knowledge base is empty\n"


def test_add_replaces_by_id_inserts_new_ids_and_is_idempotent(built, tmp_path, capsys, tiny_bert_dir,
                                                              monkeypatch):
    update = write_faq(tmp_path / "update.csv", [("q2", "a red bus now", "The bus now leaves at ten."),
                                                 ("q6", "the dog is there", "Dogs wait outside.")])
    for _ in range(2):  # the same add twice: same count, same contents
        code, out, err = run(capsys, "kb", "add", "--kb", built, "--input", update, "--device", "cpu")
        assert code == 0, err
        assert out == f"wrote 2 entries to {built}\n"
        count, entries = contents(built)
        assert count == 6
        assert entries["q2"] == ("a red bus now", "The bus now leaves at ten.")
        assert entries["q6"] == ("the dog is there", "Dogs wait outside.")
        assert entries["q1"] == ("the cat is here", "Cats live upstairs.")

    result = search(capsys, built, "a red bus now")
    assert (result["id"], result["answer"]) == ("q2", "The bus now leaves at ten.")
    assert result["score"] == pytest.approx(1.0, abs=EXACT)
    result = search(capsys, built, "the dog is there")
    assert (result["id"], result["answer"]) == ("q6", "Dogs wait outside.")
    assert result["score"] == pytest.approx(1.0, abs=EXACT)
    assert len(search(capsys, built, "small goat")["candidates"]) == 5

    # --embedding naming the KB's model (given relatively, from its parent folder) is accepted.
    model = Path(tiny_bert_dir).resolve()
    more = write_faq(tmp_path / "more.csv", [("q7", "a big plane", "Planes land on time.")])
    with monkeypatch.context() as m:
        m.chdir(model.parent)
        code, out, err = run(capsys, "kb", "add", "--kb", built, "--input", more, "--embedding", model.name,
                             "--device", "cpu")
    assert code == 0, err
    assert contents(built)[0] == 7


def test_add_without_ids_uses_the_question_hash(built, tmp_path, capsys):
    plain = tmp_path / "plain.csv"
    plain.write_text("question,answer\nthe cow is here,Cows graze.\n", encoding="utf-8")
    code, out, err = run(capsys, "kb", "add", "--kb", built, "--input", plain, "--device", "cpu")
    assert code == 0, err
    result = search(capsys, built, "the cow is here")
    assert (result["id"], result["answer"]) == (question_id("the cow is here"), "Cows graze.")
    assert contents(built)[0] == 6


def test_delete_removes_entries_and_counts_those_that_existed(built, capsys):
    code, out, err = run(capsys, "kb", "delete", "--kb", built, "--ids", "q1", "q3", "nope")
    assert code == 0, err
    assert out == f"deleted 2 of 3 ids from {built}\n"
    count, entries = contents(built)
    assert count == 3 and set(entries) == {"q2", "q4", "q5"}

    for question in ("the cat is here", "my old horse"):
        result = search(capsys, built, question)
        assert {c["id"] for c in result["candidates"]} == {"q2", "q4", "q5"}
        assert result["id"] not in ("q1", "q3")
    assert search(capsys, built, "small goat")["id"] == "q5"

    code, out, err = run(capsys, "kb", "delete", "--kb", built, "--ids", "q1", "q1")
    assert code == 0, err
    assert out == f"deleted 0 of 2 ids from {built}\n"
    assert contents(built)[0] == 3


# ── refusals: exit 2, a clear message, the KB untouched ──────────

def test_build_refuses_an_existing_kb(built, tmp_path, capsys, tiny_bert_dir):
    before = contents(built)
    other = write_faq(tmp_path / "other.csv", [("z1", "a train", "Other answer.")])
    code, out, err = run(capsys, "kb", "build", "--embedding", tiny_bert_dir, "--input", other, "--kb", built,
                         "--device", "cpu")
    assert_user_error(code, err, str(built), "already holds a knowledge base")
    assert out == ""
    assert contents(built) == before


def test_add_refuses_another_embedding_model_naming_both(built, tmp_path, capsys, tiny_bert_dir, tiny_qwen_dir):
    before = contents(built)
    update = write_faq(tmp_path / "update.csv", [("q1", "the cat is here", "Changed."), ("q6", "a dog", "New.")])
    code, out, err = run(capsys, "kb", "add", "--kb", built, "--input", update, "--embedding", tiny_qwen_dir,
                         "--device", "cpu")
    assert_user_error(code, err, "built with the embedding model", str(Path(tiny_bert_dir).resolve()),
                      str(Path(tiny_qwen_dir).resolve()))
    assert out == ""
    assert contents(built) == before


def test_bad_faq_file_names_file_line_and_field_and_creates_nothing(tmp_path, capsys, tiny_bert_dir):
    faq = tmp_path / "faq.csv"
    faq.write_text("id,question,answer\nq1,the cat is here,Upstairs.\nq2,a red bus now,\n", encoding="utf-8")
    kb = tmp_path / "new.db"
    code, out, err = run(capsys, "kb", "build", "--embedding", tiny_bert_dir, "--input", faq, "--kb", kb,
                         "--device", "cpu")
    assert_user_error(code, err, f"{faq}:3", "field 'answer'", "empty text")
    assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faq.csv"]


def test_bad_faq_file_for_add_leaves_the_kb_untouched(built, tmp_path, capsys):
    before = contents(built)
    faq = tmp_path / "bad.csv"
    faq.write_text("id,question,answer\nq1,the cat is here,Changed.\nq1,small goat,Dup.\n", encoding="utf-8")
    code, out, err = run(capsys, "kb", "add", "--kb", built, "--input", faq, "--device", "cpu")
    assert_user_error(code, err, f"{faq}:3", "field 'id'", "duplicate id 'q1'")
    assert contents(built) == before


def test_commands_refuse_a_missing_kb_without_creating_it(tmp_path, capsys):
    missing = tmp_path / "missing.db"
    code, out, err = run(capsys, "kb", "search", "--kb", missing, "the cat is here", "--device", "cpu")
    assert_user_error(code, err, str(missing), "no knowledge base there", "qtune kb build")
    assert out == ""
    code, out, err = run(capsys, "kb", "delete", "--kb", missing, "--ids", "q1")
    assert_user_error(code, err, str(missing), "no knowledge base there")
    faq = write_faq(tmp_path / "faq.csv", FAQ[:1])
    code, out, err = run(capsys, "kb", "add", "--kb", missing, "--input", faq, "--device", "cpu")
    assert_user_error(code, err, str(missing), "no knowledge base there")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faq.csv"]


def test_search_refuses_an_empty_query_and_a_non_db_path(built, tmp_path, capsys):
    code, out, err = run(capsys, "kb", "search", "--kb", built, "   ", "--device", "cpu")
    assert_user_error(code, err, "the query is empty")
    code, out, err = run(capsys, "kb", "search", "--kb", tmp_path / "faq.sqlite", "cat", "--device", "cpu")
    assert_user_error(code, err, "must end in .db")


def test_serve_refuses_before_starting_a_server(built, tmp_path, capsys, tiny_qwen_dir, tiny_bert_dir):
    code, out, err = run(capsys, "serve", "--kb", built)
    assert_user_error(code, err, "nothing to serve: give --embedding, --classifier, --reranker and/or --extractor")
    code, out, err = run(capsys, "serve", "--embedding", tiny_qwen_dir, "--kb", built, "--device", "cpu")
    assert_user_error(code, err, "built with the embedding model", str(Path(tiny_bert_dir).resolve()),
                      str(Path(tiny_qwen_dir).resolve()))
    missing = tmp_path / "missing.db"
    code, out, err = run(capsys, "serve", "--embedding", tiny_bert_dir, "--kb", missing, "--device", "cpu")
    assert_user_error(code, err, str(missing), "no knowledge base there")
    assert not missing.exists()
    assert contents(built)[0] == 5


# ── /v1/match end to end ────────────────────────────────────────

def test_match_endpoint_over_a_cli_built_kb(built, tiny_bert_dir):
    from qtune.api import faq_matcher, load
    from qtune.serving import ServerSettings, create_app

    embedder = load(tiny_bert_dir, task="embedding", device="cpu")
    matcher = faq_matcher(str(built), embedder)
    try:
        with TestClient(create_app({"bert": embedder}, ServerSettings(), matcher=matcher)) as client:
            response = client.post("/v1/match", json={"query": "my old horse"})
            assert response.status_code == 200, response.text
            body = response.json()
            assert set(body) == {"matched", "id", "question", "answer", "score", "candidates"}
            assert body["matched"] is True
            assert (body["id"], body["question"], body["answer"]) == ("q3", "my old horse",
                                                                      "Horses are in the barn.")
            assert body["score"] == pytest.approx(1.0, abs=EXACT)
            assert len(body["candidates"]) == 5
            assert body["candidates"][0] == {"id": "q3", "question": "my old horse",
                                             "answer": "Horses are in the barn.", "score": body["score"]}
            # The same answer as the CLI's matcher gives in-process.
            direct = matcher.match("my old horse")
            assert [c["id"] for c in body["candidates"]] == [c["id"] for c in direct["candidates"]]

            response = client.post("/v1/match", json={"query": "my old horse", "top_k": 2, "threshold": 1.01})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["matched"] is False and body["id"] == "q3"
            assert len(body["candidates"]) == 2

            for payload, status in (({"query": ""}, 400), ({"query": "   "}, 400), ({}, 422),
                                    ({"query": "cat", "top_k": 0}, 422), ({"query": 5}, 422)):
                response = client.post("/v1/match", json=payload)
                assert response.status_code == status, (payload, response.text)
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}
            empty = client.post("/v1/match", json={"query": ""}).json()["error"]
            assert empty["message"] == "query must not be empty" and empty["code"] == "empty_input"
            assert empty["param"] == "query"
            assert "top_k must be at least 1" in client.post(
                "/v1/match", json={"query": "cat", "top_k": 0}).json()["error"]["message"]
    finally:
        matcher.kb.close()
    assert contents(built)[0] == 5  # matching writes nothing; the file reopens after the server closed it


def test_ids_with_quotes_and_backslashes_can_be_read_and_deleted(tiny_bert_dir, tmp_path, capsys):
    faq = tmp_path / "faq.csv"
    faq.write_text('id,question,answer\n"c\'d",the cat,yes\n"e\\\\f",a dog,no\nplain,my bus,maybe\n', encoding="utf-8")
    kb = tmp_path / "quotes.db"
    code, _, err = run(capsys, "kb", "build", "--embedding", tiny_bert_dir, "--input", faq, "--kb", kb,
                       "--device", "cpu")
    assert code == 0, err
    from qtune.kb.store import KnowledgeBase

    with KnowledgeBase.open(str(kb)) as store:
        assert [e.id for e in store.get(["c'd", "e\\\\f", "plain"])] == ["c'd", "e\\\\f", "plain"]
    code, out, err = run(capsys, "kb", "delete", "--kb", kb, "--ids", "c'd", "e\\\\f")
    assert code == 0, err
    assert "deleted 2 of 2" in out
    with KnowledgeBase.open(str(kb)) as store:
        assert store.count() == 1 and [e.id for e in store.get(["plain"])] == ["plain"]
