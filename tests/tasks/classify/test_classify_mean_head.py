"""classify on an encoder whose sentence-transformers config pools the mean (the tiny BERT saved
with `1_Pooling/config.json`, as all-MiniLM-L6-v2 ships): the head classifies
classifier(dropout(mean of the last hidden state)) and qtune.json records it, so training,
qtune.load, the server's batch function, int8 and the sentence-transformers export give the same
probabilities; a plain BERT, a decoder and a folder saved before mean heads keep the transformers
head. The cause the mean head and --head-lr fix: a head reading the pooler, or a new head trained
at the body's learning rate, does not learn an easy rule in steps where the mean head with its own
learning rate does."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import qtune
from classify_helpers import LABELS, PROBE, mean_pooled_copy, synthetic_texts, write_csv
from support import assert_user_error, run
from qtune.errors import QtuneError
from qtune.modeling import heads
from qtune.modeling.packing import head_model
from qtune.tasks import get, load_model
from qtune.tasks.classify.config import ClassifyConfig
from qtune.tasks.classify.data import TextExample
from qtune.tasks.classify.model import TextClassifier

train_classify = get("classify").train


@pytest.fixture(scope="module")
def mean_bert_dir(tiny_bert_dir, tmp_path_factory) -> str:
    return mean_pooled_copy(tiny_bert_dir, tmp_path_factory.mktemp("tiny-bert-mean"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("texts")
    return {"train": write_csv(folder / "train.csv", synthetic_texts(120, seed=1)),
            "eval": write_csv(folder / "eval.csv", synthetic_texts(40, seed=2))}


@pytest.fixture(scope="module")
def trained(mean_bert_dir, files, tmp_path_factory):
    """(loaded model at the end of training, run folder): LoRA, one epoch."""
    output = tmp_path_factory.mktemp("mean-run") / "run"
    loaded, _ = train_classify(ClassifyConfig(model=mean_bert_dir, train=str(files["train"]), eval=str(files["eval"]),
                                              output=str(output), epochs=1.0, batch_size=16, lr=1e-2, max_length=16,
                                              device="cpu", logging_steps=5, report_to=["none"]))
    return loaded, output


def _batch(clf: TextClassifier, texts) -> dict:
    return clf.loaded.collate([clf.encoder().encode(t) for t in texts])


def test_the_head_classifies_the_mean_of_the_last_hidden_state(trained):
    loaded, output = trained
    assert loaded.meta.settings.pooling == "mean"
    for folder in ("best", "last"):
        assert json.loads((output / folder / "qtune.json").read_text(encoding="utf-8"))["pooling"] == "mean"
    clf = TextClassifier(loaded)
    batch = _batch(clf, PROBE)
    with loaded.inference():
        logits = heads.class_logits(loaded.model, batch)
        hf = head_model(loaded.model)
        hidden = hf.bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        by_hand = hf.classifier((hidden * mask).sum(1) / mask.sum(1))
        pooler = loaded.model(**batch).logits  # what the transformers head computes
    torch.testing.assert_close(logits, by_hand, rtol=0, atol=1e-6)
    assert (logits - pooler).abs().max() > 1e-2  # the two heads differ: the check above can fail


def test_reloads_batches_and_the_servers_batch_function_agree(trained):
    loaded, output = trained
    in_process = TextClassifier(loaded).predict_proba(PROBE)
    assert np.ptp(in_process[:, 0]) > 1e-2  # the texts score differently
    for folder in ("best", "last"):
        reloaded = qtune.load(output / folder, device="cpu")
        assert reloaded.loaded.meta.settings.pooling == "mean" and heads.mean_pooled(reloaded.loaded.model)
    last = qtune.load(output / "last", device="cpu")
    np.testing.assert_allclose(last.predict_proba(PROBE), in_process, atol=1e-5)
    # padding stays out of the mean: a text scores the same alone and in any padded batch
    alone = np.concatenate([last.predict_proba([t]) for t in PROBE])
    np.testing.assert_allclose(alone, in_process, atol=1e-5)
    np.testing.assert_allclose(last.run_batch([last.encoder().encode(t) for t in PROBE]), in_process, atol=1e-5)


def test_int8_exports_the_mean_into_its_graph(trained):
    from qtune.modeling.int8 import quantize_int8

    loaded, output = trained
    fp32 = qtune.load(output / "last", device="cpu")
    expected = fp32.predict_proba(PROBE)
    with fp32.loaded.inference():
        pooler = torch.softmax(fp32.loaded.model(**_batch(fp32, PROBE)).logits, -1).numpy()
    assert np.abs(pooler - expected).max() > 0.05  # an export of the pooler head would be caught
    onnx = qtune.load(output / "last", device="cpu")
    quantize_int8(onnx.loaded, output="logits", int8=False)  # the exported graph itself, in fp32
    np.testing.assert_allclose(onnx.predict_proba(PROBE), expected, atol=1e-5)
    int8 = qtune.load(output / "last", device="cpu", precision="int8")
    np.testing.assert_allclose(int8.predict_proba(PROBE), expected, atol=0.02)
    assert not heads.mean_pooled(int8.loaded.model)  # the ONNX graph returns the logits itself


def test_export_is_a_sentence_transformers_folder_with_qtunes_probabilities(trained, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    _, output = trained
    source = output / "best"
    code, _, err = run(capsys, "export", "--model", source, "--output", tmp_path / "plain", "--format", "transformers")
    assert_user_error(code, err, "a text classifier exports as sentence-transformers, not transformers")
    assert not (tmp_path / "plain").exists()

    code, out, err = run(capsys, "export", "--model", source, "--output", tmp_path / "st", "--check")
    assert code == 0, err
    assert out.splitlines()[0] == f"wrote sentence-transformers export to {tmp_path / 'st'}"
    assert "sentence-transformers, batched" in out and "OVER" not in out
    expected = qtune.load(source, device="cpu").predict_proba(PROBE)
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    for batch_size in (1, len(PROBE)):
        logits = st.encode(PROBE, batch_size=batch_size, convert_to_tensor=True)
        np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(qtune.load(tmp_path / "st", device="cpu").predict_proba(PROBE), expected, atol=1e-5)

    tampered = shutil.copytree(tmp_path / "st", tmp_path / "tampered")
    pooling = json.loads((tampered / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (tampered / "1_Pooling" / "config.json").write_text(json.dumps(pooling), encoding="utf-8")
    code, out, err = run(capsys, "check-export", tampered, "--model", source)
    assert_user_error(code, err, "sentence-transformers", "differ")
    assert out.count("OVER 1e-05") == 2


def test_the_transformers_writer_refuses_a_mean_head(trained, tmp_path):
    from qtune.modeling.export import write_classifier_export

    loaded, _ = trained
    with pytest.raises(QtuneError, match="--format sentence-transformers"):
        write_classifier_export(loaded, tmp_path, end=[])


def test_plain_encoders_decoders_and_older_folders_keep_the_transformers_head(tiny_bert_dir, tiny_qwen_dir,
                                                                              mean_bert_dir, tmp_path):
    for base in (tiny_bert_dir, tiny_qwen_dir):
        loaded = load_model(base, task="classify", labels=LABELS, device="cpu")
        assert loaded.meta.settings.pooling is None and not heads.mean_pooled(loaded.model)
        assert not hasattr(head_model(loaded.model).config, heads.POOLING_ATTR)
    # a folder saved before mean heads (qtune.json pooling null) on a mean-pooled base reads the pooler
    from qtune.modeling.checkpoint import save_checkpoint
    from qtune.modeling.loading import LoraSettings

    loaded = load_model(mean_bert_dir, task="classify", labels=LABELS, lora=LoraSettings(), device="cpu")
    loaded.meta.settings.pooling = None
    save_checkpoint(loaded, tmp_path / "old")
    assert not heads.mean_pooled(qtune.load(tmp_path / "old", device="cpu").loaded.model)
    assert get("classify").formats_of(loaded.meta) == ("transformers",)


@pytest.mark.parametrize("pooling, family, head", [
    ({"pooling_mode_mean_tokens": True}, ("bert", False), "mean"),
    ({"pooling_mode": "mean"}, ("bert", False), "mean"),  # sentence-transformers 6
    ({"pooling_mode": "mean"}, ("ernie", False), "mean"),
    ({"pooling_mode_cls_token": True}, ("bert", False), None),  # bge: the pooler head, as before
    ({"pooling_mode_max_tokens": True}, ("bert", False), None),  # a pooling qtune does not compute
    ({"pooling_mode": ["mean", "max"]}, ("bert", False), None),
    ({"pooling_mode": "mean"}, ("roberta", False), None),  # a dense + tanh head over [CLS]: its own
    ({"pooling_mode": "mean"}, ("qwen3", True), None),
])
def test_which_encoders_get_a_mean_head(pooling, family, head, tmp_path):
    from qtune.modeling.family import Family

    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling), encoding="utf-8")
    assert heads.classifier_pooling(str(tmp_path), Family(*family)) == head
    assert heads.classifier_pooling(str(tmp_path / "1_Pooling"), Family("bert", False)) is None  # no config


def test_the_head_has_its_own_learning_rate(mean_bert_dir, tiny_qwen_dir):
    from qtune.modeling.loading import LoraSettings
    from qtune.training.trainer import _param_groups

    assert ClassifyConfig(model="m", train="t", output="o").head_lr == 3e-2
    for base, lora, head in ((mean_bert_dir, None, "classifier."), (mean_bert_dir, LoraSettings(), "classifier."),
                             (tiny_qwen_dir, LoraSettings(), "score.")):
        loaded = load_model(base, task="classify", labels=LABELS, lora=lora, device="cpu", trainable=True)
        model = loaded.model
        groups = _param_groups(model, 0.01)
        assert heads.head_param_groups(model, groups, None) is groups
        split = heads.head_param_groups(model, groups, 5e-3)
        named = {id(p): name for name, p in model.named_parameters()}
        in_head = sorted(named[id(p)] for g in split if g.get("lr") == 5e-3 for p in g["params"])
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert in_head == sorted(name for name in trainable if head in name)  # the head, and only it
        assert all(name.startswith(head) or "modules_to_save" in name for name in in_head)
        body = [named[id(p)] for g in split if "lr" not in g for p in g["params"]]
        assert sorted(body + in_head) == sorted(trainable)
        decay = {named[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
        assert {named[id(p)]: g["weight_decay"] for g in split for p in g["params"]} == decay  # kept per parameter
        assert "lr" not in split[0]  # group 0 keeps --lr (what the trainer logs)


def _accuracy_after_training(base: str, lr: float, head_lr: float, train, dev) -> float:
    """Full fine-tuning for 3 epochs (24 steps of 16 texts) with the head at `head_lr`, then dev accuracy."""
    torch.manual_seed(0)
    loaded = load_model(base, task="classify", labels=LABELS, device="cpu", trainable=True)
    encoder = TextClassifier(loaded).encoder()
    features = encoder.encode_examples([TextExample(text, LABELS.index(label)) for text, label in train])
    groups = [{"params": [p for p in loaded.model.parameters() if p.requires_grad]}]
    optimizer = torch.optim.AdamW(heads.head_param_groups(loaded.model, groups, head_lr), lr=lr)
    loaded.model.train()
    for _ in range(3):
        for start in range(0, len(features), 16):
            heads.class_loss(loaded.model, heads.collate_labelled(loaded.tokenizer, features[start:start + 16])).backward()
            optimizer.step()
            optimizer.zero_grad()
    probs = TextClassifier(loaded).predict_proba([text for text, _ in dev])
    return float((probs.argmax(axis=1) == [LABELS.index(label) for _, label in dev]).mean())


def test_the_mean_head_with_its_own_learning_rate_learns_where_the_pooler_head_does_not(mean_bert_dir, tmp_path):
    plain = shutil.copytree(mean_bert_dir, tmp_path / "plain")
    shutil.rmtree(plain / "1_Pooling")  # the same weights, read through BERT's pooler
    train, dev = synthetic_texts(120, seed=1), synthetic_texts(60, seed=2)
    majority = max(sum(label == name for _, label in dev) for name in LABELS) / len(dev)
    mean = _accuracy_after_training(mean_bert_dir, 1e-3, 1e-2, train, dev)
    assert mean >= 0.85
    assert _accuracy_after_training(str(plain), 1e-3, 1e-2, train, dev) <= majority + 0.05
    assert _accuracy_after_training(mean_bert_dir, 1e-4, 1e-4, train, dev) <= majority + 0.05  # one small lr
