"""Many LoRA adapters on one base: `qtune serve --embedding a=DIR --embedding b=DIR2` loads the base
once, each request runs with the adapter its `model` names, batches never mix adapters, and
adapters that cannot share a base are refused."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import qtune
import qtune.serving
from qtune.errors import QtuneError
from qtune.modeling.adapters import load_adapters
from qtune.modeling.checkpoint import save_model_files
from qtune.modeling.loading import LoraSettings
from qtune.serving import ServerSettings, create_app
from qtune.tasks import get, load_model

from support import ANIMALS, VEHICLES, assert_user_error, run

TEXTS = ["the cat is here", "a big red bus", "my old dog", "train"]


def save_adapter(base: str, folder: Path, task: str, seed: int, labels=None, **meta) -> str:
    """A LoRA checkpoint of `base` whose adapter changes the model (LoRA's B starts at zero), with
    `meta` written into its qtune.json."""
    import torch

    torch.manual_seed(seed)  # also draws the head of a classifier (saved with the adapter)
    loaded = load_model(base, task=task, device="cpu", trainable=True, labels=labels,
                        lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    for name, weight in loaded.model.named_parameters():
        if "lora_B" in name:
            weight.data.normal_(0.0, 0.5)
    save_model_files(loaded, folder)
    if meta:
        settings = json.loads((folder / "qtune.json").read_text(encoding="utf-8"))
        (folder / "qtune.json").write_text(json.dumps({**settings, **meta}), encoding="utf-8")
    return str(folder)


@pytest.fixture(scope="module")
def adapters(tiny_bert_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {"a": save_adapter(tiny_bert_dir, root / "a", "embedding", 1, pooling="mean"),
            "b": save_adapter(tiny_bert_dir, root / "b", "embedding", 2, pooling="cls", max_length=16)}


def serve_flags(capsys, served, *flags) -> dict:
    code, _, err = run(capsys, "serve", *flags, "--device", "cpu")
    assert code == 0, err
    return served["models"]


def test_adapters_share_one_base_and_answer_with_their_own_vectors(adapters, served, capsys):
    models = serve_flags(capsys, served, "--embedding", f"a={adapters['a']}", f"b={adapters['b']}")
    a, b = models["a"], models["b"]
    assert a.loaded.model is b.loaded.model  # one copy of the base weights
    assert (a.loaded.meta.settings.pooling, b.loaded.meta.settings.pooling, b.loaded.meta.max_length) == ("mean", "cls", 16)
    alone = {name: qtune.load(folder, device="cpu").embed(TEXTS) for name, folder in adapters.items()}
    assert np.abs(alone["a"] - alone["b"]).max() > 0.1  # the adapters differ: the test can tell them apart
    with TestClient(create_app(models, ServerSettings())) as client:
        for name in ("a", "b", "a"):  # switching back and forth
            answer = client.post("/v1/embeddings", json={"model": name, "input": TEXTS})
            assert answer.status_code == 200 and answer.json()["model"] == name
            got = np.array([d["embedding"] for d in answer.json()["data"]], dtype=np.float32)
            np.testing.assert_allclose(got, alone[name], atol=1e-5)
        listed = client.get("/v1/models")
        assert [m["id"] for m in listed.json()["data"]] == ["a", "b"]
        unknown = client.post("/v1/embeddings", json={"model": "c", "input": TEXTS})
        assert unknown.status_code == 404
        assert unknown.json()["error"] == {"message": "model 'c' is not loaded (loaded: a, b)",
                                           "type": "not_found_error", "param": "model", "code": "model_not_found"}
        root = str(Path(adapters["a"]).parent)
        assert all(root not in r.text for r in (listed, unknown, answer, client.get("/health")))


def test_concurrent_requests_are_batched_per_adapter(adapters, served, capsys):
    models = serve_flags(capsys, served, "--embedding", f"a={adapters['a']}", f"b={adapters['b']}")
    peft_model = models["a"].loaded.model
    tokenizer = models["a"].loaded.tokenizer
    words = {"a": ANIMALS, "b": VEHICLES}  # each adapter's requests use words of their own
    ids = {name: {tokenizer.convert_tokens_to_ids(w) for w in ws} for name, ws in words.items()}
    calls = []  # (active adapter, the words' adapter of every row) of each model call

    def record(module, args, kwargs):
        rows = kwargs["input_ids"].tolist()
        owners = [{name for name, known in ids.items() if known & set(row)} for row in rows]
        calls.append((peft_model.active_adapter, owners))

    hook = peft_model.get_base_model().register_forward_pre_hook(record, with_kwargs=True)
    requests = [(name, [f"the {w}", f"my old {w} here"]) for name in ("a", "b") for w in words[name]]
    answers = {}
    try:
        with TestClient(create_app(models, ServerSettings(max_wait_ms=300))) as client:
            def send(name, texts):
                answers[(name, tuple(texts))] = client.post("/v1/embeddings", json={"model": name, "input": texts})

            threads = [threading.Thread(target=send, args=request) for request in requests]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            batchers = {name: client.app.state.qtune.models[name].batcher for name in ("a", "b")}
    finally:
        hook.remove()
    internal = {"a": models["a"].loaded.adapter_name, "b": models["b"].loaded.adapter_name}
    for active, owners in calls:
        (name,) = {n for n, a in internal.items() if a == active}
        assert all(owner == {name} for owner in owners), (active, owners)  # one adapter's rows only
    assert {active for active, _ in calls} == set(internal.values())
    assert len(calls) == sum(b.model_calls for b in batchers.values()) < len(requests)  # batched
    for (name, texts), response in answers.items():
        got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, models[name].embed(list(texts)), atol=1e-5)


def test_classifier_adapters_keep_their_labels_and_heads(tiny_bert_dir, tmp_path, served, capsys):
    pairs = [("the cat", "a dog"), ("a bus", "the big train now")]
    x = save_adapter(tiny_bert_dir, tmp_path / "x", "pair-cls", 3, labels=["no", "yes"])
    y = save_adapter(tiny_bert_dir, tmp_path / "y", "pair-cls", 4, labels=["different", "same"])
    models = serve_flags(capsys, served, "--classifier", f"x={x}", f"y={y}")
    assert models["x"].loaded.model is models["y"].loaded.model
    assert (models["x"].labels, models["y"].labels) == (["no", "yes"], ["different", "same"])
    with TestClient(create_app(models, ServerSettings())) as client:
        for name, folder in (("x", x), ("y", y)):
            answer = client.post("/v1/classify", json={"model": name, "input": [list(p) for p in pairs]})
            assert answer.status_code == 200, answer.text
            got = np.array([row["probs"] for row in answer.json()["data"]], dtype=np.float32)  # (pairs, labels)
            np.testing.assert_allclose(got, qtune.load(folder, device="cpu").predict_proba(pairs), atol=1e-5)
            assert [row["label"] for row in answer.json()["data"]] == [models[name].labels[i] for i in got.argmax(1)]
    assert np.abs(models["x"].predict_proba(pairs) - models["y"].predict_proba(pairs)).max() > 1e-3


def test_adapters_that_cannot_share_a_base_are_refused(tiny_bert_dir, tiny_qwen_dir, adapters, tmp_path, served,
                                                      capsys):
    two = save_adapter(tiny_bert_dir, tmp_path / "two", "classify", 5, labels=["billing", "login"])
    three = save_adapter(tiny_bert_dir, tmp_path / "three", "classify", 6, labels=["billing", "login", "other"])
    code, _, err = run(capsys, "serve", "--classifier", two, three, "--device", "cpu")
    assert_user_error(code, err, two, three, "need different heads (num_labels: 2 vs 3)", "--separate-adapters")
    assert served == {}
    separate = serve_flags(capsys, served, "--classifier", two, three, "--separate-adapters")
    assert separate["two"].loaded.model is not separate["three"].loaded.model

    other_words = Path(shutil.copytree(adapters["b"], tmp_path / "other-words"))
    tokenizer = qtune.load(adapters["b"], device="cpu").loaded.tokenizer
    tokenizer.add_tokens(["zebra"])
    tokenizer.save_pretrained(other_words)
    with pytest.raises(QtuneError, match="different tokenizer vocabularies"):
        load_adapters([adapters["a"], str(other_words)], get("embedding"), device="cpu")
    qwen = save_adapter(tiny_qwen_dir, tmp_path / "qwen", "embedding", 7)
    with pytest.raises(QtuneError, match=f"{adapters['a']} is an adapter of .*, {qwen} of {tiny_qwen_dir}"):
        load_adapters([adapters["a"], qwen], get("embedding"), device="cpu")
    with pytest.raises(QtuneError, match="not a qtune LoRA adapter folder"):
        load_adapters([adapters["a"], tiny_bert_dir], get("embedding"), device="cpu")
    # adapters of different bases in one role are served too, each on its own base
    mixed = serve_flags(capsys, served, "--embedding", adapters["a"], qwen)
    assert mixed["a"].loaded.model is not mixed["qwen"].loaded.model


def test_views_of_one_base_are_safe_from_several_threads(adapters):
    views = load_adapters([adapters["a"], adapters["b"]], get("embedding"), device="cpu")
    embedders = [get("embedding").wrap(view) for view in views]
    expected = [qtune.load(adapters[name], device="cpu").embed(TEXTS) for name in ("a", "b")]
    results, errors = {}, []

    def embed_often(i: int) -> None:
        try:
            results[i] = [embedders[i].embed(TEXTS, batch_size=1) for _ in range(10)]
        except Exception as error:  # noqa: BLE001 -- reported below
            errors.append(error)

    threads = [threading.Thread(target=embed_often, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i in (0, 1):
        for got in results[i]:
            np.testing.assert_allclose(got, expected[i], atol=1e-5)
