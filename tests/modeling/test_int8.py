"""CPU int8 through ONNX Runtime (`--quantize int8`): the export is exact, int8 stays close, same API."""

from __future__ import annotations

import numpy as np
import pytest

from support import assert_user_error, run, synthetic_pairs, write_pairs_csv
from qtune import api
from qtune.errors import QtuneError
from qtune.modeling.int8 import OnnxModel, quantize_int8
from qtune.tasks import load_model

TEXTS = ["cat", "the big red dog is here now", "a small green bus", "my old train is there", "horse",
         "the cow and the goat and the sheep are here now in the old red barn"]


def test_onnx_export_equals_pytorch_for_any_batch_shape(tiny_bert_dir):
    """The fp32 ONNX graph gives the PyTorch vectors for batch sizes and lengths other than the
    export's probe, padded or not."""
    torch_side = api.load(tiny_bert_dir, task="embedding", device="cpu", precision="fp32")
    onnx_side = api.load(tiny_bert_dir, task="embedding", device="cpu", precision="fp32")
    quantize_int8(onnx_side.loaded, output="last_hidden_state", int8=False)
    assert isinstance(onnx_side.loaded.model, OnnxModel)
    for batch_size in (1, 4, 6):
        np.testing.assert_allclose(onnx_side.embed(TEXTS, batch_size=batch_size),
                                   torch_side.embed(TEXTS, batch_size=batch_size), atol=1e-5)


def test_int8_embeddings_are_close_and_batch_invariant(tiny_bert_dir):
    fp32 = api.load(tiny_bert_dir, task="embedding", device="cpu", precision="fp32")
    int8 = api.load(tiny_bert_dir, task="embedding", precision="int8")  # device auto -> the CPU
    assert int8.loaded.precision == "int8" and int8.loaded.device.type == "cpu"
    assert int8.dimension == fp32.dimension
    a, b = fp32.embed(TEXTS), int8.embed(TEXTS)
    assert b.dtype == np.float32 and b.shape == a.shape
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cosine = (a * b).sum(axis=1)
    assert cosine.min() > 0.98, cosine
    assert np.abs(a - b).max() > 1e-4  # the weights really are int8 (the fp32 export agrees to 1e-6)
    # Dynamic quantization scales activations per batch, so a text alone and the same text in a
    # padded batch agree closely, not to the last bit as in fp32.
    alone = int8.embed(TEXTS[:1])
    assert float(alone[0] @ b[0]) > 0.9999
    np.testing.assert_allclose(alone, b[:1], atol=3e-3)


def test_int8_pair_classifier_predicts_like_fp32(tiny_bert_dir, tmp_path, capsys):
    files = {"train": write_pairs_csv(tmp_path / "train.csv", synthetic_pairs(64, seed=3))}
    code, _, err = run(capsys, "train", "pair-cls", "--model", tiny_bert_dir, "--train", files["train"],
                       "--output", tmp_path / "run", "--epochs", "1", "--batch-size", "16", "--device", "cpu")
    assert code == 0, err
    best = tmp_path / "run" / "best"  # a LoRA adapter: merged before the export
    pairs = [(a, b) for a, b, _ in synthetic_pairs(20, seed=4)]
    fp32 = api.load(best, device="cpu").predict_proba(pairs)
    int8 = api.load(best, precision="int8").predict_proba(pairs)
    np.testing.assert_allclose(int8, fp32, atol=0.02)
    out = tmp_path / "pred.csv"
    code, _, err = run(capsys, "predict", "pair-cls", "--model", best, "--input", files["train"], "--output", out,
                       "--quantize", "int8")
    assert code == 0, err
    assert out.read_text().count("\n") == 65


def test_eval_retrieval_with_quantize_flag(tiny_bert_dir, tmp_path, capsys):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(
        f'{{"_id": "d{i}", "text": "{t}"}}\n' for i, t in enumerate(TEXTS)))
    (folder / "queries.jsonl").write_text('{"_id": "q0", "text": "red dog"}\n{"_id": "q1", "text": "green bus"}\n')
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td1\t1\nq1\td2\t1\n")
    code, out, err = run(capsys, "eval", "retrieval", "--model", tiny_bert_dir, "--data", folder,
                         "--output", tmp_path / "r8", "--quantize", "int8")
    assert code == 0, err
    code, out, err = run(capsys, "eval", "retrieval", "--model", tiny_bert_dir, "--data", folder,
                         "--output", tmp_path / "r32", "--device", "cpu")
    assert code == 0, err
    import json

    m8 = json.loads((tmp_path / "r8" / "metrics.json").read_text())[tiny_bert_dir]
    m32 = json.loads((tmp_path / "r32" / "metrics.json").read_text())[tiny_bert_dir]
    assert m8["ndcg@10"] == pytest.approx(m32["ndcg@10"], abs=0.2)


def test_int8_is_refused_where_it_cannot_work(tiny_qwen_dir, tiny_bert_dir, tmp_path, capsys):
    with pytest.raises(QtuneError, match="BERT-family encoders"):
        load_model(tiny_qwen_dir, task="embedding", precision="int8")
    with pytest.raises(QtuneError, match="inference only"):
        load_model(tiny_bert_dir, task="embedding", precision="int8", trainable=True)
    loaded = load_model(tiny_bert_dir, task="embedding", precision="int8")
    with pytest.raises(QtuneError, match="inference only"):
        loaded.model.train()
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"input": "x"}\n')
    code, _, err = run(capsys, "extract", "--model", tiny_qwen_dir, "--input", inputs, "--output",
                       tmp_path / "o.jsonl", "--quantize", "int8")
    assert_user_error(code, err, "BERT-family encoders")
    assert not (tmp_path / "o.jsonl").exists()


def test_served_int8_embeddings_equal_embed(tiny_bert_dir):
    from fastapi.testclient import TestClient

    from qtune.serving import ServerSettings, create_app

    int8 = api.load(tiny_bert_dir, task="embedding", precision="int8")
    with TestClient(create_app({"m": int8}, ServerSettings())) as client:
        response = client.post("/v1/embeddings", json={"model": "m", "input": TEXTS})
    assert response.status_code == 200, response.text
    served = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
    np.testing.assert_allclose(served, int8.embed(TEXTS), atol=3e-3)  # batches may differ: see above
