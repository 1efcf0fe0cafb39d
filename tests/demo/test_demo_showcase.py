"""The pairs `qtune demo` predicts at the end: their labels are what the demo's data says, their
wording was held out of training, and each question gets a match and a hard non-match."""

from __future__ import annotations

import random

from qtune.demo import SHOWCASE
from qtune.demo.data import INTENTS, _split_sentences, make_pairs, sibling_id

INTENT_OF = {s: i.id for i in INTENTS for s in (i.question, *i.paraphrases)}


def test_showcase_labels_are_the_data_s():
    for question, candidate, same in SHOWCASE:
        assert same == (INTENT_OF[question] == INTENT_OF[candidate]), (question, candidate)


def test_showcase_pairs_ask_held_out_wording_against_faq_questions():
    train_sents, dev_sents = _split_sentences(random.Random(0))  # the split the demo trains on
    held_out = {s for sents in dev_sents.values() for s in sents}
    faq = {i.question for i in INTENTS}
    train_pairs = {frozenset(p[:2]) for p in make_pairs(0)[0]}
    for question, candidate, _ in SHOWCASE:
        assert question in faq and candidate in held_out, (question, candidate)
        assert frozenset((question, candidate)) not in train_pairs


def test_each_question_has_a_match_and_a_confusable_non_match():
    questions = {q for q, _, _ in SHOWCASE}
    assert len(questions) >= 3
    for question in questions:
        rows = [(c, same) for q, c, same in SHOWCASE if q == question]
        assert sorted(same for _, same in rows) == [False, True]
        other = next(c for c, same in rows if not same)
        assert INTENT_OF[other] == sibling_id(INTENT_OF[question])  # the hard negative, not a random one


def test_the_served_questions_name_real_faq_entries_and_are_judged_as_a_customer_would():
    from qtune.demo import SERVE_QUESTIONS, _answered_right
    from qtune.demo.data import INTENTS

    ids = {intent.id for intent in INTENTS}
    assert all(expected is None or expected in ids for _, expected in SERVE_QUESTIONS)
    assert any(expected is None for _, expected in SERVE_QUESTIONS)  # one the FAQ cannot answer
    assert _answered_right({"matched": True, "id": "delivery-delay"}, "delivery-delay")
    assert not _answered_right({"matched": True, "id": "transfer-pending"}, "delivery-delay")
    assert not _answered_right({"matched": False, "id": "delivery-delay"}, "delivery-delay")
    assert _answered_right({"matched": False, "id": "delivery-delay"}, None)
    assert not _answered_right({"matched": True, "id": "delivery-delay"}, None)


def test_a_rerun_removes_the_previous_knowledge_base_file_folder_or_link(tmp_path):
    from qtune.demo import remove_previous_kb

    folder = tmp_path / "kb.db"  # Milvus Lite 3 keeps a knowledge base as a folder
    (folder / "collections").mkdir(parents=True)
    (folder / "LOCK").write_text("")
    remove_previous_kb(folder)
    assert not folder.exists()
    single = tmp_path / "old.db"
    single.write_text("x")
    remove_previous_kb(single)
    assert not single.exists()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "keep").mkdir(parents=True)
    link = tmp_path / "linked.db"
    link.symlink_to(elsewhere, target_is_directory=True)
    remove_previous_kb(link)
    assert not link.exists() and not link.is_symlink() and (elsewhere / "keep").is_dir()
    remove_previous_kb(tmp_path / "never-made.db")  # nothing there: nothing to do
