"""Reranker exports: the cross-encoder folder (sentence-transformers and transformers), the decoder's
one-logit classifier and LM with their prompt file, and `check_export`.

The source models are LoRA checkpoints with random adapter weights (so merging changes the
scores) of the tiny BERT cross-encoder and the tiny Qwen3."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support import run
from reranker_cases import (  # noqa: F401 (fixtures)
    EXPECTED_PROMPT,
    PAIRS,
    ce_dir,
    qwen_tokenizer,
)

import qtune
from qtune.errors import QtuneError
from qtune.modeling.checkpoint import merge_lora, save_model_files
from qtune.modeling.loading import LoraSettings
from qtune.tasks import load_model
from qtune.tasks.reranker.export import PROMPT_FILE, check_export, write_export

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LONG = "the old red train is here now and the small green boat is there " * 3
# the pair (LONG, LONG) is cut at these; every pair of PAIRS fits the decoder's
CE_MAX_LENGTH, QWEN_MAX_LENGTH = 24, 128


def lora_source(base: str, folder, max_length: int | None = None) -> str:
    """A reranker LoRA checkpoint of `base` whose adapters are random (B is zero when fresh)."""
    loaded = load_model(base, task="reranker", lora=LoraSettings(), device="cpu", precision="fp32")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    if max_length is not None:
        loaded.meta.max_length = max_length
    save_model_files(loaded, folder)
    return str(folder)


def exported(source: str, folder, fmt: str):
    """`write_export` of `source` as the framework calls it: loaded on the CPU in fp32, LoRA merged."""
    loaded = merge_lora(load_model(source, task="reranker", device="cpu", precision="fp32"))
    folder.mkdir()
    write_export(loaded, folder, fmt)
    return folder


@pytest.fixture(scope="module")
def ce_source(ce_dir, tmp_path_factory) -> str:  # noqa: F811
    return lora_source(ce_dir, tmp_path_factory.mktemp("ce-lora") / "src", max_length=CE_MAX_LENGTH)


@pytest.fixture(scope="module")
def qwen_source(tiny_qwen_dir, tmp_path_factory) -> str:
    return lora_source(tiny_qwen_dir, tmp_path_factory.mktemp("qwen-lora") / "src", max_length=QWEN_MAX_LENGTH)


@pytest.fixture(scope="module")
def qwen_reranker(qwen_source):
    return qtune.load(qwen_source, task="reranker", device="cpu")


@pytest.fixture(scope="module")
def qwen_exports(qwen_source, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("qwen-exports")
    return {fmt: exported(qwen_source, folder / fmt, fmt) for fmt in ("cross-encoder", "causal-lm")}


def engine_prompt(spec: dict, query: str, document: str) -> str:
    """What a client of an engine sends for a pair, following the prompt file."""
    pair = spec["pair"].replace("{instruction}", spec["instruction"]).replace("{query}", query)
    return spec["prefix"] + pair.replace("{document}", document) + spec["suffix"]


def assert_spread(scores) -> None:
    """The scores differ from pair to pair, so matching them means something."""
    assert np.ptp(scores) > 1e-3, scores


# ---------------------------------------------------------------- encoders


def test_cross_encoder_folder_scores_as_qtune_in_sentence_transformers_and_transformers(ce_source, tmp_path):
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = exported(ce_source, tmp_path / "out", "cross-encoder")
    reranker = qtune.load(ce_source, task="reranker", device="cpu")
    pairs = PAIRS + [(LONG, LONG), ("animal", LONG)]
    assert len(reranker.features([(LONG, LONG)], truncate=False)[0]["input_ids"]) > CE_MAX_LENGTH
    expected = reranker.score(pairs)
    assert_spread(expected)

    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["sentence_transformers"] == {"activation_fn": "torch.nn.modules.activation.Sigmoid"}
    assert json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))["model_max_length"] == CE_MAX_LENGTH

    np.testing.assert_allclose(CrossEncoder(str(out), device="cpu").predict(pairs), expected, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1
    batch = tokenizer([q for q, _ in pairs], [d for _, d in pairs], padding=True, truncation=True,
                      return_tensors="pt")
    with torch.inference_mode():
        scores = torch.sigmoid(model(**batch).logits[:, 0]).numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    # the folder is still a qtune reranker
    np.testing.assert_allclose(qtune.load(str(out), device="cpu").score(pairs), expected, atol=1e-5)


def test_a_cross_encoder_has_no_causal_lm_export(ce_source, tmp_path):
    with pytest.raises(QtuneError, match="causal-lm is for decoder rerankers.*use --format cross-encoder"):
        exported(ce_source, tmp_path / "out", "causal-lm")


# ---------------------------------------------------------------- decoders


def test_decoder_classifier_gives_p_yes_on_a_left_padded_batch(qwen_exports, qwen_reranker):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = qwen_exports["cross-encoder"]
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "Qwen3ForSequenceClassification"
    assert model.config.num_labels == 1 and model.score.weight.shape[0] == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    assert tokenizer.padding_side == "left"
    assert not (out / "qtune.json").exists()  # qtune loads a decoder reranker as an LM, not this

    expected = qwen_reranker.score(PAIRS)
    assert_spread(expected)
    batch = tokenizer.pad([{"input_ids": f["input_ids"]} for f in qwen_reranker.features(PAIRS)],
                          return_tensors="pt")
    assert (batch["attention_mask"][:, 0] == 0).any() and (batch["attention_mask"][:, -1] == 1).all()
    with torch.inference_mode():
        scores = torch.sigmoid(model(**batch).logits[:, 0]).numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_the_prompt_file_reproduces_qtune_token_ids(qwen_exports, qwen_reranker, qwen_tokenizer):  # noqa: F811
    spec = json.loads((qwen_exports["cross-encoder"] / PROMPT_FILE).read_text(encoding="utf-8"))
    assert spec == json.loads((qwen_exports["causal-lm"] / PROMPT_FILE).read_text(encoding="utf-8"))
    assert engine_prompt(spec, "what is qtune", "a toolkit") == EXPECTED_PROMPT
    assert (spec["yes_id"], spec["no_id"]) == tuple(qwen_tokenizer.convert_tokens_to_ids(["yes", "no"]))
    assert qwen_reranker.features(PAIRS) == qwen_reranker.features(PAIRS, truncate=False)  # all fit
    for (query, document), feature in zip(PAIRS, qwen_reranker.features(PAIRS)):
        ids = qwen_tokenizer(engine_prompt(spec, query, document), add_special_tokens=False)["input_ids"]
        assert ids == feature["input_ids"], (query, document)


def test_decoder_lm_export_gives_p_yes_from_the_yes_and_no_logits(qwen_exports, qwen_reranker):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = qwen_exports["causal-lm"]
    spec = json.loads((out / PROMPT_FILE).read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = tokenizer([engine_prompt(spec, q, d) for q, d in PAIRS], add_special_tokens=False, padding=True,
                      return_tensors="pt")
    assert (batch["attention_mask"][:, 0] == 0).any()  # left-padded by the exported tokenizer
    with torch.inference_mode():
        logits = model(**batch).logits[:, -1, :]  # (pairs, vocab)
    scores = torch.softmax(logits[:, [spec["yes_id"], spec["no_id"]]], dim=-1)[:, 0].numpy()
    expected = qwen_reranker.score(PAIRS)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    np.testing.assert_allclose(qtune.load(str(out), device="cpu").score(PAIRS), expected, atol=1e-5)


# ---------------------------------------------------------------- check_export and the CLI


def test_check_export_compares_every_engine_and_sees_another_model(ce_source, ce_dir, qwen_exports,  # noqa: F811
                                                                   qwen_reranker, tiny_qwen_dir, tmp_path):
    texts = ["what is qtune", "a toolkit", "花呗怎么还款", LONG]
    ce_out = exported(ce_source, tmp_path / "ce", "cross-encoder")
    ce = check_export(ce_out, qtune.load(ce_source, task="reranker", device="cpu"), texts)
    assert set(ce) == {"sentence-transformers", "transformers"} and max(ce.values()) < 1e-5, ce
    for out in qwen_exports.values():
        found = check_export(out, qwen_reranker, texts)
        # (LONG, LONG) is cut at max_length: the prompt-file check leaves that pair out
        assert set(found) == {"transformers (qtune's token ids)", "transformers (prompt from qtune_prompt.json)"}
        assert max(found.values()) < 1e-5, found
    other = check_export(qwen_exports["cross-encoder"], qtune.load(tiny_qwen_dir, task="reranker", device="cpu"),
                         texts)
    assert min(other.values()) > 1e-3, other


def test_export_and_check_export_commands(qwen_source, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "export", "--model", qwen_source, "--output", out)
    assert code == 0, err
    assert "cross-encoder" in stdout
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["architectures"] == \
        ["Qwen3ForSequenceClassification"]
    code, stdout, err = run(capsys, "check-export", out)
    assert code == 0, err
    assert "transformers (prompt from qtune_prompt.json)" in stdout and "OVER" not in stdout
