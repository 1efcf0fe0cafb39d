"""The FAQ knowledge base: Milvus Lite store, FAQ files, matcher, crash durability."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qtune.errors import DataError, QtuneError
from qtune.kb import (
    FaqEntry,
    FaqMatcher,
    KnowledgeBase,
    add_entries,
    build_kb,
    delete_entries,
    read_faq,
)
from qtune.kb.faq import question_id

from support import FAQ_QUESTIONS

E = [FaqEntry("a", "how do I reset my password", "Use the reset link."),
     FaqEntry("b", "where is my parcel", "Track it on the orders page."),
     FaqEntry("c", "can I pay by card", "Yes, all major cards.")]
V = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=np.float32)


@pytest.fixture
def kb_path(tmp_path):
    return str(tmp_path / "kb.db")


@pytest.fixture
def kb(kb_path):
    with KnowledgeBase.create(kb_path, model="tiny/model", dimension=4) as store:
        yield store


def test_create_then_open_reads_back_from_disk(kb, kb_path):
    kb.upsert(E, V)
    kb.close()
    with KnowledgeBase.open(kb_path) as again:
        assert (again.model, again.dimension) == ("tiny/model", 4)
        assert again.count() == 3
        assert again.get(["c", "missing", "a"]) == [E[2], E[0]]
        assert again.search(V[1], top_k=1)[0].id == "b"


def test_create_refuses_an_existing_kb_and_open_a_missing_one(kb, kb_path, tmp_path):
    with pytest.raises(QtuneError, match="already holds a knowledge base"):
        KnowledgeBase.create(kb_path, model="tiny/model", dimension=4)
    with pytest.raises(QtuneError, match="no knowledge base there"):
        KnowledgeBase.open(str(tmp_path / "nothing.db"))
    with pytest.raises(QtuneError, match="must end in .db"):
        KnowledgeBase.open(str(tmp_path / "kb.sqlite"))


def test_open_refuses_another_model_or_dimension(kb, kb_path):
    kb.close()
    with pytest.raises(QtuneError, match="built with the embedding model 'tiny/model', not 'other/model'"):
        KnowledgeBase.open(kb_path, model="other/model")
    with pytest.raises(QtuneError, match="holds 4-dimensional vectors; the embedding model gives 8"):
        KnowledgeBase.open(kb_path, model="tiny/model", dimension=8)
    with KnowledgeBase.open(kb_path, model="tiny/model", dimension=4) as again:
        again.check_model("tiny/model", 4)
        with pytest.raises(QtuneError, match=r"expected vectors of shape \(1, 4\), got \(1, 8\)"):
            again.upsert(E[:1], np.ones((1, 8), dtype=np.float32))


def test_upsert_is_idempotent_by_id_and_replaces_text(kb):
    assert kb.upsert(E, V) == 3
    assert kb.upsert(E, V) == 3
    assert kb.count() == 3
    changed = FaqEntry("a", "how can I change my password", "Settings > Security.")
    kb.upsert([changed], V[2:3])
    assert kb.count() == 3
    assert kb.get(["a"]) == [changed]
    assert {h.id for h in kb.search(V[2], top_k=2)} == {"a", "c"}  # its vector moved too
    with pytest.raises(QtuneError, match="duplicate ids in one upsert"):
        kb.upsert([E[0], E[0]], V[:2])


def test_delete_removes_only_existing_ids(kb):
    kb.upsert(E, V)
    assert delete_entries(kb, ["b", "zzz"]) == 1
    assert kb.count() == 2
    assert kb.get(["b"]) == []
    assert {h.id for h in kb.search(V[1], top_k=3)} == {"a", "c"}  # both at cosine 0: order unspecified


def test_search_ranks_by_cosine(kb):
    kb.upsert(E, V)
    query = np.array([0.6, 0.8, 0, 0], dtype=np.float32)  # cos 0.6 with a, 0.8 with b, 0 with c
    hits = kb.search(query, top_k=3)
    assert [h.id for h in hits] == ["b", "a", "c"]
    assert [h.score for h in hits] == pytest.approx([0.8, 0.6, 0.0], abs=1e-5)
    assert (hits[0].question, hits[0].answer) == (E[1].question, E[1].answer)
    assert len(kb.search(query, top_k=1)) == 1


# ── FAQ files ───────────────────────────────────────────────────

def test_read_faq_csv_with_ids_jsonl_without_and_headerless_tsv(tmp_path):
    csv_path = tmp_path / "faq.csv"
    csv_path.write_text("id,question,answer\n7,Reset password?,Use the link.\nq2,Parcel?,Orders page.\n",
                        encoding="utf-8")
    assert read_faq(csv_path) == [FaqEntry("7", "Reset password?", "Use the link."),
                                  FaqEntry("q2", "Parcel?", "Orders page.")]
    jsonl = tmp_path / "faq.jsonl"
    jsonl.write_text(json.dumps({"question": " Pay by card? ", "answer": "Yes."}) + "\n"
                     + json.dumps({"id": 3, "question": "Refund?", "answer": "30 days."}) + "\n", encoding="utf-8")
    entries = read_faq(jsonl)
    assert entries[0] == FaqEntry(question_id("Pay by card?"), "Pay by card?", "Yes.")
    assert len(entries[0].id) == 16 and entries[0].id == question_id(" Pay by card?")  # stable, trimmed
    assert entries[1].id == "3"
    tsv = tmp_path / "faq.tsv"
    tsv.write_text("Reset password?\tUse the link.\n", encoding="utf-8")
    assert read_faq(tsv) == [FaqEntry(question_id("Reset password?"), "Reset password?", "Use the link.")]


@pytest.mark.parametrize("content, line, field, reason", [
    ("question,answer\nok?,fine\nempty answer?,  \n", 3, "answer", "empty text"),
    ("question,answer\n,no question\n", 2, "question", "empty text"),
    ("id,question,answer\nx,one?,1\ny,two?,2\nx,three?,3\n", 4, "id", "duplicate id 'x' (first on line 2)"),
    ("question,answer\nsame?,1\nsame?,2\n", 3, "question", "the same question as line 2"),
    ("id,answer\n1,no question column\n", 2, "question", "missing column"),
])
def test_read_faq_errors_name_file_line_and_field(tmp_path, content, line, field, reason):
    path = tmp_path / "faq.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_faq(path)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), line, field)
    assert reason in str(info.value)
    assert str(info.value).startswith(f"{path}:{line}, field '{field}': ")


# ── matcher with tiny models ────────────────────────────────────

def test_build_kb_stores_every_entry_with_its_model(faq_kb, embedder):
    assert faq_kb.count() == len(FAQ_QUESTIONS)
    assert (faq_kb.model, faq_kb.dimension) == ("tiny-bert", embedder.dimension)
    entry = faq_kb.get([question_id("my old horse")])[0]
    assert (entry.question, entry.answer) == ("my old horse", "answer 2")


def test_build_kb_checks_the_file_before_creating_anything(tmp_path, embedder):
    faq = tmp_path / "faq.csv"
    faq.write_text("question,answer\nfine?,yes\nbroken?,\n", encoding="utf-8")
    with pytest.raises(DataError, match="field 'answer'"):
        build_kb(embedder, faq, str(tmp_path / "kb.db"), model_name="tiny-bert")
    assert not (tmp_path / "kb.db").exists()


def test_matcher_finds_the_exact_question_and_follows_the_threshold(faq_kb, embedder):
    matcher = FaqMatcher(embedder, faq_kb)
    assert matcher.threshold == 0.8
    for i, question in enumerate(FAQ_QUESTIONS):
        result = matcher.match(question)
        assert (result["id"], result["question"], result["answer"]) == (question_id(question), question,
                                                                        f"answer {i}")
        assert result["score"] == pytest.approx(1.0, abs=1e-4)
        assert result["matched"] is True
    result = matcher.match("my old horse", top_k=3, threshold=1.01)
    assert result["matched"] is False and result["id"] == question_id("my old horse")
    scores = [c["score"] for c in result["candidates"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    # The recall scores are the embedder's own cosines.
    vectors = embedder.embed(["my old horse"] + [c["question"] for c in result["candidates"]])
    assert scores == pytest.approx((vectors[1:] @ vectors[0]).tolist(), abs=1e-4)
    assert FaqMatcher(embedder, faq_kb, threshold=1.01).match("my old horse")["matched"] is False


def test_matcher_rescores_with_the_pair_classifier(faq_kb, embedder, clf):
    matcher = FaqMatcher(embedder, faq_kb, rescorer=clf)
    assert matcher.threshold == 0.5
    query = "the big cat"
    result = matcher.match(query, top_k=4)
    candidates = result["candidates"]
    assert len(candidates) == 4
    probs = clf.predict_proba([(query, c["question"]) for c in candidates])[:, 1]
    assert [c["score"] for c in candidates] == pytest.approx(probs.tolist(), abs=1e-6)
    assert result["score"] == pytest.approx(float(probs.max()), abs=1e-6)
    assert result["id"] == candidates[0]["id"]
    assert result["matched"] == (result["score"] >= 0.5)
    assert matcher.match(query, threshold=result["score"])["matched"] is True
    assert matcher.match(query, threshold=result["score"] + 1e-3)["matched"] is False


def test_add_and_delete_entries_change_what_matches(faq_kb, embedder):
    matcher = FaqMatcher(embedder, faq_kb)
    new = FaqEntry("train", "big green train there", "the replaced answer")
    assert add_entries(embedder, faq_kb, [new]) == 1
    assert faq_kb.count() == len(FAQ_QUESTIONS) + 1
    assert delete_entries(faq_kb, [question_id("big green train there")]) == 1
    result = matcher.match("big green train there")
    assert (result["id"], result["answer"]) == ("train", "the replaced answer")


def test_matcher_refuses_a_kb_of_another_dimension(tmp_path, embedder):
    with KnowledgeBase.create(str(tmp_path / "kb.db"), model="x", dimension=embedder.dimension + 1) as store:
        with pytest.raises(QtuneError, match="dimensional vectors"):
            FaqMatcher(embedder, store)
        with pytest.raises(QtuneError, match="dimensional vectors"):
            add_entries(embedder, store, [E[0]])


def test_matcher_on_an_empty_kb_matches_nothing(kb, tmp_path, embedder):
    with KnowledgeBase.create(str(tmp_path / "empty.db"), model="x", dimension=embedder.dimension) as store:
        result = FaqMatcher(embedder, store).match("anything")
    assert result == {"matched": False, "id": None, "question": None, "answer": None, "score": None,
                      "candidates": []}


# ── crash durability ────────────────────────────────────────────

WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from qtune.kb import FaqEntry, KnowledgeBase
    kb = KnowledgeBase.open(sys.argv[1])
    for i in range(100000):
        vector = np.zeros((1, 4), dtype=np.float32)
        vector[0, i % 4] = 1.0
        kb.upsert([FaqEntry(f"id{i}", f"question {i}", f"answer {i}")], vector)
        print(f"id{i}", flush=True)  # the acknowledgement: printed only after upsert returned
""")


def test_acknowledged_writes_survive_sigkill(kb, kb_path):
    kb.close()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, kb_path], stdout=subprocess.PIPE, text=True)
    acked = []
    try:
        for line in proc.stdout:
            acked.append(line.strip())
            if len(acked) == 8:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        acked += proc.stdout.read().split()  # acks already in the pipe when the kill landed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 8
    with KnowledgeBase.open(kb_path, model="tiny/model", dimension=4) as again:
        found = again.get(acked)
        assert [e.id for e in found] == acked
        assert found[-1].answer == f"answer {len(acked) - 1}"
        assert len(acked) <= again.count() <= len(acked) + 1  # at most one write was cut short
        again.upsert([FaqEntry("after", "q", "a")], np.eye(4, dtype=np.float32)[:1])  # still writable
        assert again.get(["after"])


# ── ids: control characters refused, quotes, backslashes and unicode kept ──

CONTROL_IDS = ["a\x00b", "a\x01b", "a\x1fb", "tab\there", "new\nline", "cr\rx", "del\x7fx"]


@pytest.mark.parametrize("bad", CONTROL_IDS)
def test_upsert_refuses_an_id_with_a_control_character(kb, bad):
    with pytest.raises(QtuneError) as info:
        kb.upsert([FaqEntry("fine", "q", "a"), FaqEntry(bad, "q2", "a2")], V[:2])
    code = next(c for c in bad if ord(c) < 32 or ord(c) == 127)
    assert f"id {bad!r}" in str(info.value)
    assert f"control character U+{ord(code):04X}" in str(info.value)
    assert kb.count() == 0  # nothing of the batch was written


def test_read_faq_refuses_a_control_character_in_an_id_naming_file_line_and_field(tmp_path):
    path = tmp_path / "faq.jsonl"
    path.write_text(json.dumps({"id": "ok", "question": "a?", "answer": "b"}) + "\n"
                    + json.dumps({"id": "x\u0001y", "question": "c?", "answer": "d"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_faq(path)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 2, "id")
    assert str(info.value).startswith(f"{path}:2, field 'id': ")
    assert "control character U+0001" in str(info.value)


def test_ids_with_quotes_backslashes_and_unicode_round_trip(kb):
    ids = ["c'd", 'say "hi"', "e\\f", "\\", "\\n", "end\\", "'\"\\'", "日本語", "emoji😀", "u\u2028x", "nel\x85x",
           "x y", "[1, 2]", "id in [\"a\"]"]
    vectors = np.eye(len(ids), 4, dtype=np.float32) + 0.01  # (n, 4): no zero vector
    assert kb.upsert([FaqEntry(i, f"q {n}", f"a {n}") for n, i in enumerate(ids)], vectors) == len(ids)
    assert [e.id for e in kb.get(list(reversed(ids)))] == list(reversed(ids))
    assert {h.id for h in kb.search(vectors[0], top_k=len(ids))} == set(ids)
    assert kb.delete(ids[:7]) == 7
    assert kb.count() == len(ids) - 7
    assert [e.id for e in kb.get(ids)] == ids[7:]
    assert kb.delete(ids) == len(ids) - 7 and kb.count() == 0


def test_reads_and_deletes_of_control_character_ids_answer_instead_of_failing(kb):
    # Such ids cannot be written any more; asking for one (a KB written by an older qtune, a typo
    # on the command line) is an ordinary miss, not a Milvus filter error.
    kb.upsert(E, V)
    assert kb.get(CONTROL_IDS + ["a"]) == [E[0]]
    assert kb.delete(CONTROL_IDS) == 0
    assert kb.count() == 3
    # Ids with a tab, newline or CR that an older qtune wrote are still read and deleted.
    from qtune.kb.store import ENTRIES

    old = [FaqEntry(i, "q", "a") for i in ("tab\there", "new\nline", "cr\rx")]
    kb.client.upsert(ENTRIES, [{"id": e.id, "vector": [0.0, 0.0, 0.0, 1.0], "question": e.question,
                                "answer": e.answer} for e in old])
    assert kb.get([e.id for e in old]) == old
    assert kb.delete([e.id for e in old]) == 3 and kb.count() == 3


def test_an_index_file_left_empty_by_a_killed_writer_is_rebuilt(kb, kb_path):
    """Milvus Lite writes its per-segment index cache in place; a kill at that moment leaves it
    empty and loading failed. Opening drops the empty cache, Milvus Lite rebuilds it from the rows."""
    from pathlib import Path

    kb.upsert(E, V)
    kb.close()
    indexes = sorted(Path(kb_path, "collections").glob("*/partitions/*/indexes/*.idx"))
    entries = [p for p in indexes if "_meta" not in str(p.relative_to(kb_path))]
    assert entries
    entries[0].write_bytes(b"")  # as the kill leaves it
    with KnowledgeBase.open(kb_path, model="tiny/model", dimension=4) as again:
        assert again.count() == len(E)
        assert entries[0].stat().st_size > 0  # rebuilt
