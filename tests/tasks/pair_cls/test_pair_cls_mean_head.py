"""pair-cls on an encoder whose sentence-transformers config pools the mean (the tiny BERT saved
with `1_Pooling/config.json`): the head classifies the mean of the last hidden state of
`[CLS] a [SEP] b [SEP]`, recorded in qtune.json; qtune.load, int8 and the sentence-transformers
export (`encode([[a, b], ...])`, cut longest-first as qtune cuts) give the same probabilities, and
the transformers format is refused for it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import qtune
from support import assert_user_error, run
from export_cases import lora_source
from qtune.modeling import heads
from qtune.modeling.packing import head_model
from qtune.tasks.pair_cls.config import PairClsConfig

PAIRS = [("the cat is here", "a dog"), ("my old red bus", "the big green train is there now"),
         ("如何修改绑定的手机号码", "花呗的账单什么时候出"), ("bike", "bike"),
         ("a small red bus and a big boat " * 4, "the old tiger and the goat " * 4)]  # both sides cut at 24 tokens


@pytest.fixture(scope="module")
def source(tiny_bert_dir, tmp_path_factory):
    """A LoRA pair classifier (adapters and head moved off their start) on the mean-pooled tiny BERT."""
    folder = tmp_path_factory.mktemp("tiny-bert-mean")
    shutil.copytree(tiny_bert_dir, folder, dirs_exist_ok=True)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}),
                                                       encoding="utf-8")
    return lora_source(str(folder), "pair-cls", tmp_path_factory.mktemp("pair-mean") / "run")


def test_the_pair_head_reads_the_mean_and_int8_agrees(source):
    assert json.loads((source / "qtune.json").read_text(encoding="utf-8"))["pooling"] == "mean"
    clf = qtune.load(source, device="cpu")
    loaded = clf.loaded
    batch = loaded.collate([clf.encoder().encode(a, b) for a, b in PAIRS])
    assert "token_type_ids" in batch
    with loaded.inference():
        hf = head_model(loaded.model)
        hidden = hf.bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        by_hand = hf.classifier((hidden * mask).sum(1) / mask.sum(1))
        torch.testing.assert_close(heads.class_logits(loaded.model, batch), by_hand, rtol=0, atol=1e-6)
    expected = clf.predict_proba(PAIRS)
    np.testing.assert_allclose(np.concatenate([clf.predict_proba([p]) for p in PAIRS]), expected, atol=1e-5)
    # the ONNX graph holds the mean: exported in fp32 it gives the same probabilities; int8 weights
    # cost some accuracy (this head and these adapters are random and large)
    from qtune.modeling.int8 import quantize_int8

    onnx = qtune.load(source, device="cpu")
    quantize_int8(onnx.loaded, output="logits", int8=False)
    np.testing.assert_allclose(onnx.predict_proba(PAIRS), expected, atol=1e-5)
    int8 = qtune.load(source, device="cpu", precision="int8")
    np.testing.assert_allclose(int8.predict_proba(PAIRS), expected, atol=0.1)


def test_export_gives_the_probabilities_through_sentence_transformers(source, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    code, _, err = run(capsys, "export", "--model", source, "--output", tmp_path / "plain", "--format", "transformers")
    assert_user_error(code, err, "a pair classifier exports as sentence-transformers, not transformers")
    code, out, err = run(capsys, "export", "--model", source, "--output", tmp_path / "st", "--check")
    assert code == 0, err
    assert out.splitlines()[0] == f"wrote sentence-transformers export to {tmp_path / 'st'}"
    expected = qtune.load(source, device="cpu").predict_proba(PAIRS)
    assert np.abs(expected - expected[0]).max() > 1e-2  # the pairs score differently: the comparison can fail
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    for batch_size in (1, len(PAIRS)):
        logits = st.encode([list(p) for p in PAIRS], batch_size=batch_size, convert_to_tensor=True)
        np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), expected, atol=1e-5)


def test_pair_cls_has_a_head_learning_rate():
    assert PairClsConfig(model="m", train="t", output="o").head_lr is None  # pair-cls: one rate unless asked
