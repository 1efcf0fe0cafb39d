"""`qtune export` of pair classifiers: `transformers.pipeline("text-classification")` loads the
folder with the labels named and gives qtune's probabilities for {"text", "text_pair"} inputs, one
at a time and batched, for an encoder (its own pair template) and for Qwen3 (`a \\n b <eos>` as the
tokenizer's template, left padding); `qtune check-export` passes it and fails a tampered one."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from support import assert_user_error, run
from export_cases import LABELS, drop_tokenizer_template, edit_json, exported_case

PAIRS = [("the cat is here", "a dog"), ("my old red bus", "the big green train is there now"),
         ("如何修改绑定的手机号码", "花呗的账单什么时候出"), ("bike", "bike")]
LONG = ("a small red bus and a big boat " * 4, "the old tiger and the goat " * 4)  # cut at 24 tokens, both sides


@pytest.fixture(scope="module", params=["bert", "qwen3"])
def case(request, tmp_path_factory):
    """(family, source folder, export folder, source PairClassifier)."""
    return exported_case(request, tmp_path_factory, "pair-cls")


def _pipeline_probs(classifier, pairs, **kwargs) -> np.ndarray:
    rows = classifier([{"text": a, "text_pair": b} for a, b in pairs], top_k=None, **kwargs)
    return np.array([[{r["label"]: r["score"] for r in row}[label] for label in LABELS] for row in rows])


def test_the_pipeline_gives_qtunes_probabilities(case):
    from transformers import pipeline

    family, _, output, clf = case
    classifier = pipeline("text-classification", model=str(output), device="cpu")
    assert classifier.model.config.id2label == dict(enumerate(LABELS))
    assert classifier.model.config.label2id == {label: i for i, label in enumerate(LABELS)}
    expected = clf.predict_proba(PAIRS)
    assert np.abs(expected - expected[0]).max() > 1e-2  # the pairs score differently: the comparison can fail
    np.testing.assert_allclose(_pipeline_probs(classifier, PAIRS), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_pipeline_probs(classifier, PAIRS, batch_size=4), expected, atol=1e-5, rtol=0)
    if family == "qwen3":
        assert classifier.tokenizer.padding_side == "left"
        assert classifier.model.config.pad_token_id == classifier.tokenizer.pad_token_id


def test_the_tokenizer_encodes_pairs_as_qtune_does(case):
    from transformers import AutoTokenizer

    family, _, output, clf = case
    tokenizer = AutoTokenizer.from_pretrained(output)
    for a, b in [*PAIRS, LONG]:
        assert tokenizer(a, b, truncation=True)["input_ids"] == clf.encoder().encode(a, b)["input_ids"]
    if family == "qwen3":  # the difference the export documents: an odd room left for two cut texts
        qtune_ids = replace(clf.encoder(), max_length=25).encode(*LONG)["input_ids"]
        ids = tokenizer(*LONG, truncation=True, max_length=25)["input_ids"]
        assert len(ids) == len(qtune_ids) == 25 and ids != qtune_ids


def test_check_export_passes_and_fails_when_tampered(case, tmp_path, capsys):
    family, source, output, _ = case
    code, out, err = run(capsys, "check-export", output)
    assert code == 0, err
    assert [line.split("  ")[0] for line in out.splitlines()[2:]] == ["transformers pipeline",
                                                                      "transformers pipeline, batched"]
    tampered = shutil.copytree(output, tmp_path / "tampered")
    if family == "qwen3":
        drop_tokenizer_template(tampered)  # no separator, no EOS: the head reads another position
    else:
        edit_json(tampered / "config.json", lambda c: c.update(id2label={"0": "pos", "1": "neg", "2": "mid"}))
    code, out, err = run(capsys, "check-export", tampered, "--model", source)
    assert_user_error(code, err, "transformers pipeline", "differ")
    assert out.count("OVER 1e-05") == 2


def test_a_pair_classifier_has_no_sentence_transformers_format(case, tmp_path, capsys):
    _, source, _, _ = case
    code, _, err = run(capsys, "export", "--model", source, "--output", tmp_path / "st", "--format",
                       "sentence-transformers")
    assert_user_error(code, err, "a pair classifier exports as transformers, not sentence-transformers")
    assert not (tmp_path / "st").exists()
    assert json.loads((case[2] / "qtune_export.json").read_text(encoding="utf-8"))["format"] == "transformers"
