"""Tests for the offline demo data set (qtune.demo.data)."""

from __future__ import annotations

import csv

import pytest

from qtune.demo import data as demo_data
from qtune.demo.data import CONFUSABLE_PAIRS, INTENTS, make_pairs, sibling_id, write_demo_files

INTENT_OF = {s: i.id for i in INTENTS for s in (i.question, *i.paraphrases)}


def _key(pair):
    return frozenset(pair[:2])


@pytest.fixture(scope="module")
def splits():
    return make_pairs(seed=0)


# --- the table ------------------------------------------------------------------------------

def test_table_shape():
    assert 35 <= len(INTENTS) <= 45
    assert len({i.id for i in INTENTS}) == len(INTENTS)
    for intent in INTENTS:
        assert 6 <= len(intent.paraphrases) <= 8, intent.id
        assert intent.question.strip() and intent.answer.strip()


def test_every_sentence_belongs_to_exactly_one_intent():
    # Otherwise a "negative" pair could hold two copies of the same question.
    sentences = [s for i in INTENTS for s in (i.question, *i.paraphrases)]
    assert len({s.strip().lower() for s in sentences}) == len(sentences)


def test_every_intent_has_exactly_one_confusable_sibling():
    ids = [i for pair in CONFUSABLE_PAIRS for i in pair]
    assert sorted(ids) == sorted(i.id for i in INTENTS)
    for intent in INTENTS:
        assert sibling_id(sibling_id(intent.id)) == intent.id != sibling_id(intent.id)


def test_intents_are_immutable():
    with pytest.raises(AttributeError):
        INTENTS[0].question = "changed"  # type: ignore[misc]
    assert isinstance(INTENTS, tuple) and isinstance(INTENTS[0].paraphrases, tuple)


# --- the pairs ------------------------------------------------------------------------------

def test_sizes_and_positive_ratio(splits):
    train, dev = splits
    assert 350 <= len(train) <= 450
    assert 120 <= len(dev) <= 180
    for split in (train, dev):
        ratio = sum(label for *_, label in split) / len(split)
        assert 0.3 <= ratio <= 0.5


def test_labels_match_the_table(splits):
    for split in splits:
        for s1, s2, label in split:
            assert label in (0, 1) and type(label) is int
            assert s1 != s2
            assert label == int(INTENT_OF[s1] == INTENT_OF[s2])


def test_negatives_are_half_confusable(splits):
    for split in splits:
        negatives = [(s1, s2) for s1, s2, label in split if label == 0]
        confusable = sum(sibling_id(INTENT_OF[s1]) == INTENT_OF[s2] for s1, s2 in negatives)
        assert abs(confusable / len(negatives) - 0.5) < 0.05


def test_every_intent_appears_in_positives(splits):
    for split in splits:
        covered = {INTENT_OF[s1] for s1, _, label in split if label == 1}
        assert covered == {i.id for i in INTENTS}


def test_deterministic_per_seed():
    assert make_pairs(seed=0) == make_pairs(seed=0)
    assert make_pairs(seed=7) == make_pairs(seed=7)
    assert make_pairs(seed=0) != make_pairs(seed=1)


def test_does_not_touch_global_random_state():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    make_pairs(seed=5)
    assert random.random() == expected


def test_no_duplicate_pairs_within_or_across_splits(splits):
    train, dev = splits
    train_keys = [_key(p) for p in train]
    dev_keys = [_key(p) for p in dev]
    assert len(set(train_keys)) == len(train_keys)
    assert len(set(dev_keys)) == len(dev_keys)
    assert not set(train_keys) & set(dev_keys)


def test_dev_is_built_from_held_out_paraphrases(splits):
    train, dev = splits
    train_sentences = {s for s1, s2, _ in train for s in (s1, s2)}
    for s1, s2, _ in dev:
        assert not (s1 in train_sentences and s2 in train_sentences)
    dev_sentences = {s for s1, s2, _ in dev for s in (s1, s2)}
    assert not dev_sentences & train_sentences
    assert not dev_sentences & {i.question for i in INTENTS}


def test_pair_order_is_mixed(splits):
    # The canonical question should not always sit on the same side of a pair.
    train, _ = splits
    questions = {i.question for i in INTENTS}
    left = sum(s1 in questions for s1, _, _ in train)
    right = sum(s2 in questions for _, s2, _ in train)
    assert left > 0 and right > 0


# --- the files ------------------------------------------------------------------------------

def _read(path):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_write_demo_files_round_trip(tmp_path):
    out = tmp_path / "nested" / "demo"
    paths = write_demo_files(out, seed=3)
    assert set(paths) == {"train", "dev", "faq"}
    assert paths["train"] == out / "train.csv"

    train, dev = make_pairs(seed=3)
    for name, expected in (("train", train), ("dev", dev)):
        header, rows = _read(paths[name])
        assert header == ["sentence1", "sentence2", "label"]
        assert [(r["sentence1"], r["sentence2"], int(r["label"])) for r in rows] == expected

    header, rows = _read(paths["faq"])
    assert header == ["id", "question", "answer"]
    assert [(r["id"], r["question"], r["answer"]) for r in rows] == [
        (i.id, i.question, i.answer) for i in INTENTS
    ]
    assert len({r["id"] for r in rows}) == len(INTENTS)


def test_csv_escapes_commas_and_quotes(tmp_path):
    # Several sentences contain commas and apostrophes; they must survive as single fields.
    paths = write_demo_files(tmp_path)
    _, rows = _read(paths["train"])
    assert any("," in r["sentence1"] or "," in r["sentence2"] for r in rows)
    assert all(set(r) == {"sentence1", "sentence2", "label"} and None not in r for r in rows)


def test_no_temp_files_left_and_overwrite_works(tmp_path):
    write_demo_files(tmp_path, seed=0)
    write_demo_files(tmp_path, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.csv", "faq.csv", "train.csv"]
    _, rows = _read(tmp_path / "train.csv")
    assert len(rows) == len(make_pairs(seed=1)[0])


def test_module_imports_only_stdlib():
    import ast
    import sys

    tree = ast.parse(open(demo_data.__file__, encoding="utf-8").read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots - {"qtune", "__future__"} <= set(sys.stdlib_module_names)
