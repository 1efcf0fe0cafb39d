"""`qtune export` of text classifiers: `transformers.pipeline("text-classification")` loads the
folder with the labels named and gives qtune's probabilities, one at a time and batched, for an
encoder and for Qwen3 (`text <eos>` as the tokenizer's template, cut before the EOS, left padding);
`qtune check-export` passes it and fails a tampered one."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from support import assert_user_error, run
from export_cases import LABELS, drop_tokenizer_template, edit_json, exported_case

# mixed lengths, two languages; the last is cut at 24 tokens
TEXTS = ["the cat is here", "bus", "如何修改绑定的手机号码", "a small red bus and a big boat " * 8]


@pytest.fixture(scope="module", params=["bert", "qwen3"])
def case(request, tmp_path_factory):
    """(family, source folder, export folder, source TextClassifier)."""
    return exported_case(request, tmp_path_factory, "classify")


def test_the_pipeline_gives_qtunes_probabilities(case):
    from transformers import pipeline

    family, _, output, clf = case
    classifier = pipeline("text-classification", model=str(output), device="cpu")
    assert classifier.model.config.id2label == dict(enumerate(LABELS))
    expected = clf.predict_proba(TEXTS)
    assert np.abs(expected - expected[0]).max() > 1e-2  # the texts score differently: the comparison can fail
    for batch_size in (1, len(TEXTS)):
        rows = classifier(TEXTS, top_k=None, truncation=True, batch_size=batch_size)
        probs = np.array([[{r["label"]: r["score"] for r in row}[label] for label in LABELS] for row in rows])
        np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    ids = classifier.tokenizer(TEXTS[3], truncation=True)["input_ids"]
    assert ids == clf.encoder().encode(TEXTS[3])["input_ids"] and len(ids) == 24
    if family == "qwen3":
        assert ids[-1] == classifier.tokenizer.eos_token_id and classifier.tokenizer.padding_side == "left"


def test_check_export_passes_and_fails_when_tampered(case, tmp_path, capsys):
    family, source, output, _ = case
    code, out, err = run(capsys, "export", "--model", source, "--output", tmp_path / "again", "--check")
    assert code == 0, err
    assert out.splitlines()[0] == f"wrote transformers export to {tmp_path / 'again'}"
    assert [line.split("  ")[0] for line in out.splitlines()[3:]] == ["transformers pipeline",
                                                                      "transformers pipeline, batched"]
    tampered = shutil.copytree(output, tmp_path / "tampered")
    if family == "qwen3":
        drop_tokenizer_template(tampered)  # no EOS: the head reads the last word instead
    else:
        edit_json(tampered / "config.json", lambda c: c.update(id2label={"0": "pos", "1": "neg", "2": "mid"}))
    code, out, err = run(capsys, "check-export", tampered)
    assert_user_error(code, err, "transformers pipeline", "differ")
    assert out.count("OVER 1e-05") == 2
