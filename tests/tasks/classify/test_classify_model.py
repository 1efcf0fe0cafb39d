"""classify with tiny random models: what training leaves in memory, in last/ and best/, and in an
export predicts the same; a text scores the same alone or in any batch, padded or packed; a run
that continues from a text classifier keeps its labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qtune
from classify_helpers import LABELS, PROBE, synthetic_texts, write_csv
from support import run, write_lines
from qtune.errors import DataError, QtuneError
from qtune.modeling import packing
from qtune.tasks import get, load_model
from qtune.tasks.classify.config import ClassifyConfig
from qtune.tasks.classify.model import TextClassifier, TextPrediction

train_classify = get("classify").train


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("texts")
    return {"train": write_csv(folder / "train.csv", synthetic_texts(120, seed=1)),
            "eval": write_csv(folder / "eval.csv", synthetic_texts(40, seed=2))}


def _config(model, output, files, **overrides) -> ClassifyConfig:
    settings = dict(model=str(model), train=str(files["train"]), eval=str(files.get("eval")), output=str(output),
                    epochs=1.0, batch_size=16, lr=1e-2, max_length=16, device="cpu", logging_steps=5)
    settings.update(overrides)
    return ClassifyConfig(**settings)


@pytest.mark.parametrize("family", ["bert", "qwen"])
def test_in_process_reload_and_export_predict_the_same(family, tiny_bert_dir, tiny_qwen_dir, files, tmp_path,
                                                       capsys):
    from transformers import AutoModelForSequenceClassification

    base = tiny_bert_dir if family == "bert" else tiny_qwen_dir
    loaded, result = train_classify(_config(base, tmp_path / "run", files))
    assert result["best"]["step"] == 8 and set(result["best"]["per_class"]) == set(LABELS)  # ceil(120 / 16) steps
    in_process = TextClassifier(loaded).predict_proba(PROBE)
    assert in_process.dtype == np.float32 and in_process.shape == (len(PROBE), 3)
    np.testing.assert_allclose(in_process.sum(axis=1), 1.0, atol=1e-6)

    last, best = qtune.load(tmp_path / "run" / "last", device="cpu"), qtune.load(tmp_path / "run" / "best", device="cpu")
    code, _, err = run(capsys, "export", "--model", tmp_path / "run" / "last", "--output", tmp_path / "merged")
    assert code == 0, err
    merged = qtune.load(tmp_path / "merged", device="cpu")
    assert isinstance(merged, TextClassifier) and last.labels == best.labels == merged.labels == LABELS
    # training moved the adapters off their zero start: the round trips below are not trivially equal
    lora_b = [p for name, p in loaded.model.named_parameters() if "lora_B" in name]
    assert lora_b and min(float(p.abs().max()) for p in lora_b) > 1e-4
    for other in (last, best, merged):
        np.testing.assert_allclose(other.predict_proba(PROBE), in_process, atol=1e-5)

    predictions = last.predict(PROBE)
    assert all(isinstance(p, TextPrediction) for p in predictions)
    assert [p.label for p in predictions] == [LABELS[i] for i in in_process.argmax(axis=1)]
    np.testing.assert_allclose([p.probs for p in predictions], in_process, atol=1e-5)
    assert [p.probability for p in predictions] == [max(p.probs) for p in predictions]
    # a single string is one text
    np.testing.assert_allclose(last.predict_proba(PROBE[3]), in_process[3:4], atol=1e-5)
    assert last.predict(PROBE[3])[0].label == predictions[3].label

    # the export is a plain transformers checkpoint with the labels named: no peft, no qtune code
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert plain.config.id2label == dict(enumerate(LABELS))
    ids = merged.encoder().encode(PROBE[0])
    with torch.no_grad():
        logits = plain(**{k: torch.tensor([v]) for k, v in ids.items()}).logits
    np.testing.assert_allclose(torch.softmax(logits, -1)[0].numpy(), in_process[0], atol=1e-5)


TEXTS = ["the big red old cow is here now there", "bus", "a small green plane", "my goat", "a",
         "the old tram is there now"]


def _sharp_classifier(base: str, is_bert: bool, packed: bool) -> TextClassifier:
    loaded = load_model(base, task="classify", labels=LABELS, device="cpu", packing=packed)
    head = loaded.model.classifier if is_bert else loaded.model.score
    torch.manual_seed(3)  # the same larger random head for every load, so an error in the pooled vector shows
    with torch.no_grad():
        head.weight.normal_(0.0, 3.0)
    return TextClassifier(loaded)


@pytest.mark.parametrize("family", ["bert", "qwen"])
def test_a_text_scores_the_same_alone_and_in_any_batch_padded_or_packed(family, tiny_bert_dir, tiny_qwen_dir,
                                                                         monkeypatch):
    is_bert = family == "bert"
    base = tiny_bert_dir if is_bert else tiny_qwen_dir
    padded = _sharp_classifier(base, is_bert, packed=False)
    alone = np.concatenate([padded.predict_proba([t]) for t in TEXTS])
    assert np.ptp(alone[:, 0]) > 1e-3  # the texts score differently (far beyond the 1e-5 tolerance)
    features = [padded.encoder().encode(t) for t in TEXTS]
    runs = {"padded": padded}
    if not is_bert:
        monkeypatch.setattr(packing, "MIN_PADDING_WITHOUT_KERNEL", 0.0)  # pack every batch, even on a CPU
        runs["packed"] = _sharp_classifier(base, is_bert, packed=True)
        assert runs["packed"].loaded.packs(features) and not padded.loaded.packs(features)
    for name, clf in runs.items():
        for batch_size in (1, 2, 4, 64):
            np.testing.assert_allclose(clf.predict_proba(TEXTS, batch_size=batch_size), alone, atol=1e-5,
                                       err_msg=f"{name}, batch size {batch_size}")
        np.testing.assert_allclose(clf.run_batch(features), alone, atol=1e-5, err_msg=name)  # the server's path

    # The check is sharp: an encoder padded on the left (shifted positions), or a decoder padded on
    # the right whose head has a wrong pad id (it pools a pad token), scores differently in a batch.
    if is_bert:
        padded.loaded.tokenizer.padding_side = "left"
    else:
        padded.loaded.tokenizer.padding_side = "right"
        padded.loaded.model.config.pad_token_id = 0
    assert np.abs(padded.predict_proba(TEXTS, batch_size=64) - alone).max() > 1e-4


def test_empty_input_and_non_text_are_refused(tiny_bert_dir):
    clf = qtune.load(tiny_bert_dir, task="classify", labels=LABELS, device="cpu")
    assert clf.predict_proba([]).shape == (0, 3) and clf.predict([]) == []
    with pytest.raises(QtuneError, match="text 1 is empty"):
        clf.predict_proba(["cow", ""])
    with pytest.raises(QtuneError, match="text 0 must be a string, got tuple"):
        clf.predict([("a", "b")])


def test_continuing_from_a_text_classifier_keeps_its_labels(tiny_bert_dir, files, tmp_path):
    order = ["travel", "road", "farm"]
    _, half = train_classify(_config(tiny_bert_dir, tmp_path / "first", files, eval=None, epochs=0.5, labels=order))
    first = tmp_path / "first" / "last"
    assert qtune.load(first, device="cpu").labels == order

    # the data is read against the model's labels (before it loads): two of them are enough here
    two = write_lines(tmp_path / "two.csv", "text,label", "a cow,farm", "my bus,road", "the goat,farm")
    train_classify(_config(first, tmp_path / "second", {"train": two}, eval=None, epochs=1.0))
    assert qtune.load(tmp_path / "second" / "last", device="cpu").labels == order
    other = write_lines(tmp_path / "other.csv", "text,label", "a cow,farm", "a ship,sea")
    with pytest.raises(DataError, match="'sea' is not one of \\['travel', 'road', 'farm'\\]"):
        train_classify(_config(first, tmp_path / "third", {"train": other}, eval=None))
    with pytest.raises(QtuneError, match="the model has labels \\['travel', 'road', 'farm'\\], the data "
                                         "\\['farm', 'road', 'travel'\\]"):
        train_classify(_config(first, tmp_path / "fourth", files, eval=None, labels=LABELS))
    assert not (tmp_path / "third").exists() and not (tmp_path / "fourth" / "config.yaml").exists()

    # --resume reads the labels of last/ too, and continues the run
    loaded, result = train_classify(_config(tiny_bert_dir, tmp_path / "first", files, eval=None, epochs=1.0,
                                            resume=True))
    assert loaded.meta.settings.labels == order
    assert (half["train"]["steps"], result["train"]["steps"]) == (4, 8)
    assert half["train"]["samples"] + result["train"]["samples"] == 120  # the rest of the epoch, once
