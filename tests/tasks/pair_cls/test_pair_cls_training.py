"""Pair classification with tiny random models: learning, round trips, padding, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qtune.api import evaluate, export, load
from qtune.tasks import get, load_model
from qtune.tasks.pair_cls.config import PairClsConfig
from qtune.tasks.pair_cls.encode import PairEncoder
from qtune.tasks.pair_cls.model import PairClassifier

_train_pair_cls = get("pair-cls").train

from support import synthetic_pairs

PROBE = [(a, b) for a, b, _ in synthetic_pairs(24, seed=7)]


def _config(model, files, output, **overrides) -> PairClsConfig:
    settings = dict(model=model, train=str(files["train"]), eval=str(files["eval"]), output=str(output),
                    epochs=1.0, batch_size=16, lr=5e-3, max_length=32, device="cpu", logging_steps=5)
    settings.update(overrides)
    return PairClsConfig(**settings)


def test_training_learns_a_rule_only_training_can_teach(tiny_bert_dir, synthetic_files, tmp_path):
    before = evaluate("pair-cls", model=tiny_bert_dir, data=str(synthetic_files["eval"]), device="cpu")[tiny_bert_dir]
    _, result = _train_pair_cls(_config(tiny_bert_dir, synthetic_files, tmp_path / "run", full=True, epochs=40.0,
                                        lr=2e-3))
    assert before["accuracy"] < 0.7
    assert result["best"]["accuracy"] >= 0.95
    assert result["best"]["macro_f1"] >= 0.95
    # best/ really holds the best model: evaluating it again gives the recorded number
    again = evaluate("pair-cls", model=str(tmp_path / "run" / "best"), data=str(synthetic_files["eval"]), device="cpu")
    assert again[str(tmp_path / "run" / "best")]["accuracy"] == pytest.approx(result["best"]["accuracy"])


@pytest.mark.parametrize("family", ["bert", "qwen"])
def test_training_process_reload_and_export_predict_the_same(family, tiny_bert_dir, tiny_qwen_dir,
                                                             synthetic_files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    base = tiny_bert_dir if family == "bert" else tiny_qwen_dir
    loaded, _ = _train_pair_cls(_config(base, synthetic_files, tmp_path / "run", eval=None, lr=1e-2))
    in_process = PairClassifier(loaded).predict_proba(PROBE)
    reloaded = load(tmp_path / "run" / "last", device="cpu").predict_proba(PROBE)
    best = load(tmp_path / "run" / "best", device="cpu").predict_proba(PROBE)
    export(str(tmp_path / "run" / "last"), str(tmp_path / "merged"))
    merged = load(tmp_path / "merged", device="cpu").predict_proba(PROBE)

    # training moved the weights away from the untrained head (the round trip is not trivially equal)
    untrained = load(base, task="pair-cls", device="cpu").predict_proba(PROBE)
    assert np.abs(in_process - untrained).max() > 1e-3
    np.testing.assert_allclose(reloaded, in_process, atol=1e-5)
    np.testing.assert_allclose(best, in_process, atol=1e-5)
    np.testing.assert_allclose(merged, in_process, atol=1e-5)

    # the export is a plain transformers checkpoint: no peft, no qtune code needed to load it
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    clf = load(tmp_path / "merged", device="cpu")
    encoder = PairEncoder(clf.loaded.tokenizer, clf.loaded.family.is_decoder, 32)
    ids = encoder.encode(*PROBE[0])
    with torch.no_grad():
        logits = plain(**{k: torch.tensor([v]) for k, v in ids.items()}).logits
    np.testing.assert_allclose(torch.softmax(logits, -1)[0].numpy(), in_process[0], atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "qwen"])
def test_a_pair_alone_and_inside_a_padded_batch_score_the_same(family, tiny_bert_dir, tiny_qwen_dir):
    torch.manual_seed(3)
    loaded = load_model(tiny_bert_dir if family == "bert" else tiny_qwen_dir, task="pair-cls", device="cpu",
                        packing=False)  # padded batches (packed ones are checked in test_packing.py)
    head = loaded.model.classifier if family == "bert" else loaded.model.score
    with torch.no_grad():  # a larger random head, so an error in the pooled vector shows in the output
        head.weight.normal_(0.0, 3.0)
    clf = PairClassifier(loaded)
    target = ("the cat", "a dog")
    batch = [("my old big small red green cow is here", "the bus there now now"), target,
             ("a", "b"), ("the tiger is here now", "my plane")]
    alone = clf.predict_proba([target])[0]
    np.testing.assert_allclose(clf.predict_proba(batch, batch_size=4)[1], alone, atol=1e-5)

    # The check is sharp enough to catch the classic bugs: padding an encoder on the left
    # (shifted absolute positions), or a decoder padded on the right whose head has a wrong
    # pad id (it pools a pad token).
    if family == "bert":
        loaded.tokenizer.padding_side = "left"
    else:
        loaded.tokenizer.padding_side = "right"
        loaded.model.config.pad_token_id = 0
    assert np.abs(clf.predict_proba(batch, batch_size=4)[1] - alone).max() > 1e-4


def test_decoder_pairs_are_left_padded_and_end_with_eos(tiny_qwen_dir):
    loaded = load_model(tiny_qwen_dir, task="pair-cls", device="cpu")
    tok = loaded.tokenizer
    assert tok.padding_side == "left"
    assert loaded.model.config.pad_token_id == tok.pad_token_id
    ids = PairEncoder(tok, True, 64).encode("你好", "世界")["input_ids"]
    assert ids[-1] == tok.eos_token_id != tok.pad_token_id
    assert tok.decode(ids) == "你好\n世界" + tok.eos_token


def test_truncation_is_longest_first_and_respects_max_length(tiny_qwen_dir, tiny_bert_dir):
    for folder, is_decoder in ((tiny_qwen_dir, True), (tiny_bert_dir, False)):
        tok = load_model(folder, task="pair-cls", device="cpu").tokenizer
        encoder = PairEncoder(tok, is_decoder, 16)
        ids = encoder.encode("cat " * 40, "dog")["input_ids"]
        assert len(ids) == 16
        assert "dog" in tok.decode(ids)  # the short side survives


def test_resume_after_a_crash_ends_where_an_uninterrupted_run_ends(tiny_bert_dir, synthetic_files, tmp_path,
                                                                   monkeypatch):
    from qtune.modeling import heads as task  # where the classification loss is looked up

    settings = dict(eval_steps=5, epochs=2.0, full=True, lr=2e-3)
    straight, _ = _train_pair_cls(_config(tiny_bert_dir, synthetic_files, tmp_path / "straight", **settings))
    expected = PairClassifier(straight).predict_proba(PROBE)

    real_loss, calls = task.class_loss, {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 53:  # mid-epoch 2, between two saves
            raise KeyboardInterrupt
        return real_loss(model, batch)

    monkeypatch.setattr(task, "class_loss", crashing_loss)
    with pytest.raises(KeyboardInterrupt):
        _train_pair_cls(_config(tiny_bert_dir, synthetic_files, tmp_path / "crashed", **settings))
    monkeypatch.setattr(task, "class_loss", real_loss)
    assert (tmp_path / "crashed" / "last" / "trainer_state.pt").is_file()

    resumed, result = _train_pair_cls(_config(tiny_bert_dir, synthetic_files, tmp_path / "crashed", resume=True,
                                              **settings))
    np.testing.assert_allclose(PairClassifier(resumed).predict_proba(PROBE), expected, atol=1e-5)
    assert result["train"]["steps"] == 76  # 2 epochs of ceil(600 / 16) batches


def test_rerun_without_resume_refuses_to_overwrite(tiny_bert_dir, synthetic_files, tmp_path):
    from qtune.errors import QtuneError

    _train_pair_cls(_config(tiny_bert_dir, synthetic_files, tmp_path / "run", epochs=0.1))
    with pytest.raises(QtuneError, match="already holds a run"):
        _train_pair_cls(_config(tiny_bert_dir, synthetic_files, tmp_path / "run", epochs=0.1))
    with pytest.raises(QtuneError, match="nothing to resume"):
        _train_pair_cls(_config(tiny_bert_dir, synthetic_files, tmp_path / "other", resume=True))


def test_same_seed_same_model_other_seed_other_model(tiny_bert_dir, synthetic_files, tmp_path):
    def run(name, seed):
        loaded, _ = _train_pair_cls(_config(tiny_bert_dir, synthetic_files, tmp_path / name, epochs=0.5, seed=seed))
        return PairClassifier(loaded).predict_proba(PROBE)

    first, second, other = run("a", 1), run("b", 1), run("c", 2)
    np.testing.assert_array_equal(first, second)
    assert np.abs(first - other).max() > 1e-4


def test_bf16_path_keeps_frozen_weights_in_bf16_and_trained_ones_in_fp32(tiny_qwen_dir, synthetic_files, tmp_path):
    # The GPU default (bf16 autocast, frozen base in bf16) runs on a CPU too, so it is tested here.
    loaded, result = _train_pair_cls(_config(tiny_qwen_dir, synthetic_files, tmp_path / "run", eval=None,
                                             epochs=0.2, precision="bf16", dev_fraction=0.0))
    dtypes = {p.dtype for p in loaded.model.parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in loaded.model.parameters() if p.requires_grad} == {torch.float32}
    probs = load(tmp_path / "run" / "last", device="cpu", precision="bf16").predict_proba(PROBE)
    reference = load(tmp_path / "run" / "last", device="cpu", precision="fp32").predict_proba(PROBE)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs, reference, atol=0.05)  # bf16 has ~3 significant digits
    assert result["train"]["steps"] == math.ceil(0.2 * 38)


def test_the_shipped_yaml_recipe_is_a_valid_config():
    from pathlib import Path

    from qtune.config import build_config, load_yaml

    recipe = Path(__file__).parents[3] / "configs" / "pair-cls.yaml"
    config = build_config(PairClsConfig, load_yaml(recipe), source=str(recipe))
    assert config.model == "Qwen/Qwen3-Embedding-0.6B"
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (8, 32, 0.1)
