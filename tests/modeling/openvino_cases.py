"""Static int8 through OpenVINO: `qtune quantize` calibrates a graph on the user's texts and writes it
into the model folder; `--quantize int8` runs it while it matches the weights, and falls back to
the dynamic ONNX Runtime path (saying why) when it does not."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from support import assert_user_error, run
from qtune import api
from qtune.data.retrieval import read_calibration_texts
from qtune.modeling.int8 import OPENVINO_FOLDER

pytest.importorskip("openvino")  # run by test_int8_openvino.py in a process of its own
pytest.importorskip("nncf")

TEXTS = ["cat", "the big red dog is here now", "a small green bus", "my old train is there", "horse",
         "the cow and the goat and the sheep are here now in the old red barn"]
CALIBRATION = [f"the {a} and the {b} are here now" for a in ("cat", "dog", "cow", "goat", "horse")
               for b in ("bus", "train", "car", "bike")] + ["a small red bus", "my old green train is there"]


@pytest.fixture()
def embedder_dir(tiny_bert_dir, tmp_path):
    """A model folder of its own (quantize writes into it), with a calibration file beside it."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, folder)
    (tmp_path / "calibration.txt").write_text("\n".join(CALIBRATION) + "\n", encoding="utf-8")
    return folder


def test_quantize_writes_a_static_graph_that_int8_runs(embedder_dir, tmp_path, capsys):
    code, out, err = run(capsys, "quantize", "--model", embedder_dir, "--calibration", tmp_path / "calibration.txt",
                         "--task", "embedding", "--samples", "12")
    assert code == 0, err
    assert "calibrated on 12 texts" in out
    written = embedder_dir / OPENVINO_FOLDER
    assert sorted(p.name for p in written.iterdir()) == ["int8.bin", "int8.json", "int8.xml"]
    note = json.loads((written / "int8.json").read_text(encoding="utf-8"))
    assert note["rows"] == 12 and note["calibration"]["passages"] == 12 and note["output"] == "last_hidden_state"

    fp32 = api.load(embedder_dir, task="embedding", device="cpu", precision="fp32")
    int8 = api.load(embedder_dir, task="embedding", precision="int8")
    assert int8.loaded.model.engine == "openvino" and int8.loaded.precision == "int8"
    a, b = fp32.embed(TEXTS), int8.embed(TEXTS)
    assert b.dtype == np.float32 and b.shape == a.shape
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cosine = (a * b).sum(axis=1)
    assert cosine.min() > 0.95, cosine
    assert np.abs(a - b).max() > 1e-4  # quantized, not the fp32 graph
    # static ranges: a text's vector does not depend on what shares its batch
    alone = np.concatenate([int8.embed([t]) for t in TEXTS])
    np.testing.assert_allclose(alone, b, atol=2e-3)


def test_a_graph_made_from_other_weights_is_not_used(embedder_dir, tmp_path, capsys):
    assert api.quantize(embedder_dir, tmp_path / "calibration.txt", task="embedding", samples=8).is_file()
    from safetensors.torch import load_file, save_file

    weights = embedder_dir / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("word_embeddings.weight"))
    tensors[name] = tensors[name] * 1.5  # retrained, say
    save_file(tensors, weights, metadata={"format": "pt"})
    capsys.readouterr()
    int8 = api.load(embedder_dir, task="embedding", precision="int8")
    assert int8.loaded.model.engine == "onnxruntime"
    assert "was calibrated for other weights: run `qtune quantize` again" in capsys.readouterr().err
    assert api.quantize(embedder_dir, tmp_path / "calibration.txt", task="embedding", samples=8).is_file()
    assert api.load(embedder_dir, task="embedding", precision="int8").loaded.model.engine == "openvino"


def test_quantize_refuses_what_it_cannot_do(embedder_dir, tmp_path, capsys):
    calibration = tmp_path / "calibration.txt"
    code, _, err = run(capsys, "quantize", "--model", "org/some-model", "--calibration", calibration, "--task",
                       "embedding")
    assert_user_error(code, err, "'org/some-model' is not a local folder")
    code, _, err = run(capsys, "quantize", "--model", embedder_dir, "--calibration", tmp_path / "missing.txt",
                       "--task", "embedding")
    assert_user_error(code, err, "missing.txt", "file not found")
    code, _, err = run(capsys, "quantize", "--model", embedder_dir, "--calibration", calibration, "--task",
                       "embedding", "--samples", "0")
    assert_user_error(code, err, "--samples must be at least 1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (embedder_dir / OPENVINO_FOLDER).symlink_to(elsewhere)
    code, _, err = run(capsys, "quantize", "--model", embedder_dir, "--calibration", calibration, "--task",
                       "embedding", "--samples", "4")
    assert_user_error(code, err, "is a symbolic link")
    assert list(elsewhere.iterdir()) == []


def test_calibration_texts_come_from_beir_folders_query_groups_and_corpus_files(tmp_path):
    beir = tmp_path / "beir"
    beir.mkdir()
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                               for i, t in enumerate(CALIBRATION[:5])), encoding="utf-8")
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "which bus"}) + "\n", encoding="utf-8")
    assert read_calibration_texts(beir) == (CALIBRATION[:5], ["which bus"])
    groups = tmp_path / "train.jsonl"
    groups.write_text(json.dumps({"query": "q a", "pos": ["p1"], "neg": ["n1", "p1"]}) + "\n"
                      + json.dumps({"query": "q b", "pos": ["p2"], "neg": []}) + "\n", encoding="utf-8")
    assert read_calibration_texts(groups) == (["p1", "n1", "p2"], ["q a", "q b"])
    lines = tmp_path / "corpus.txt"
    lines.write_text("one\n\ntwo\n", encoding="utf-8")
    assert read_calibration_texts(lines) == (["one", "two"], [])


def test_the_openvino_model_serves_calls_from_several_threads(embedder_dir, tmp_path):
    """The server computes batches in worker threads: calls at once give what calls one by one give."""
    from concurrent.futures import ThreadPoolExecutor

    api.quantize(embedder_dir, tmp_path / "calibration.txt", task="embedding", samples=8)
    int8 = api.load(embedder_dir, task="embedding", precision="int8")
    batches = [TEXTS[i:] + TEXTS[:i] for i in range(len(TEXTS))]
    alone = [int8.embed(b, batch_size=2) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda b: int8.embed(b, batch_size=2), batches * 3))
    for i, got in enumerate(together):
        np.testing.assert_array_equal(got, alone[i % len(batches)])
