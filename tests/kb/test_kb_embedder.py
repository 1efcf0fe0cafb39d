"""Which embedding model a knowledge base belongs to: recognised by its weights (a fingerprint of
the weight files and pooling settings), not by the folder's path; old KBs that recorded only a path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from support import assert_user_error, run
from qtune.kb.faq import embedder_fingerprint
from qtune.kb.store import META, META_ID, KnowledgeBase

FAQ = "id,question,answer\nq1,the cat is here,Upstairs.\nq2,small goat,Goats eat everything.\n"


@pytest.fixture
def model_a(tmp_path, tiny_bert_dir) -> Path:
    return Path(shutil.copytree(tiny_bert_dir, tmp_path / "models" / "A"))


def build(capsys, tmp_path: Path, model: Path) -> Path:
    faq = tmp_path / "faq.csv"
    faq.write_text(FAQ, encoding="utf-8")
    kb = tmp_path / "faq.db"
    code, _, err = run(capsys, "kb", "build", "--embedding", model, "--input", faq, "--kb", kb, "--device", "cpu")
    assert code == 0, err
    return kb


def search(capsys, kb: Path, *extra) -> tuple[int, str, str]:
    return run(capsys, "kb", "search", "--kb", kb, "small goat", "--json", "--device", "cpu", *extra)


def more_faq(tmp_path: Path) -> Path:
    path = tmp_path / "more.csv"
    path.write_text("id,question,answer\nq3,my old horse,Barn.\n", encoding="utf-8")
    return path


def test_the_fingerprint_follows_the_weights_not_the_path(model_a, tmp_path):
    copy = shutil.copytree(model_a, tmp_path / "elsewhere" / "copy")
    fingerprint = embedder_fingerprint(str(model_a))
    assert fingerprint.startswith("sha256:") and len(fingerprint) == len("sha256:") + 64
    assert embedder_fingerprint(str(copy)) == fingerprint
    (copy / "1_Pooling").mkdir()  # another pooling: other vectors from the same weights
    (copy / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert embedder_fingerprint(str(copy)) != fingerprint
    assert embedder_fingerprint(str(tmp_path / "no-such-folder")) is None
    assert embedder_fingerprint(str(tmp_path)) is None or embedder_fingerprint(str(tmp_path)) != fingerprint


def test_a_kb_built_from_a_folder_opens_with_a_copy_of_it_at_another_path(model_a, tmp_path, capsys):
    kb = build(capsys, tmp_path, model_a)
    with KnowledgeBase.open(str(kb)) as store:
        assert store.model == str(model_a.resolve())
        assert store.fingerprint == embedder_fingerprint(str(model_a))
    moved = Path(shutil.copytree(model_a, tmp_path / "exported" / "embedder"))
    shutil.rmtree(model_a)

    # The recorded folder is gone: a clear message saying what to pass, not a hub error.
    code, out, err = search(capsys, kb)
    assert_user_error(code, err, str(model_a.resolve()), "no longer there", "--embedding")
    assert "huggingface" not in err.lower() and "repo" not in err.lower()

    code, out, err = search(capsys, kb, "--embedding", moved)
    assert code == 0, err
    assert json.loads(out)["id"] == "q2"
    code, out, err = run(capsys, "kb", "add", "--kb", kb, "--input", more_faq(tmp_path), "--embedding", moved,
                         "--device", "cpu")
    assert code == 0, err
    assert out == f"wrote 1 entries to {kb}\n"


def test_a_different_model_is_refused_naming_both_even_at_the_same_path(model_a, tmp_path, capsys, tiny_qwen_dir):
    kb = build(capsys, tmp_path, model_a)
    code, _, err = search(capsys, kb, "--embedding", tiny_qwen_dir)  # also 32-dimensional
    assert_user_error(code, err, "built with the embedding model", str(model_a.resolve()),
                      str(Path(tiny_qwen_dir).resolve()))

    # New weights written over the recorded folder: the path matches, the model does not.
    from transformers import BertModel
    import torch

    model = BertModel.from_pretrained(model_a)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.add_(0.5)
    model.save_pretrained(model_a)
    for extra in ((), ("--embedding", model_a)):
        code, _, err = search(capsys, kb, *extra)
        assert_user_error(code, err, "built with the embedding model", str(model_a.resolve()), "weights differ")
    code, _, err = run(capsys, "kb", "add", "--kb", kb, "--input", more_faq(tmp_path), "--device", "cpu")
    assert_user_error(code, err, "weights differ")
    with KnowledgeBase.open(str(kb)) as store:
        assert store.count() == 2


def test_an_old_kb_that_recorded_only_a_path_still_opens(model_a, tmp_path, capsys):
    kb = build(capsys, tmp_path, model_a)
    with KnowledgeBase.open(str(kb)) as store:  # rewrite the metadata as qtune 0.x wrote it
        old = json.dumps({"model": str(model_a.resolve()), "dimension": 32, "format": 1})
        store.client.upsert(META, [{"id": META_ID, "vector": [0.0, 0.0], "value": old}])
        store.client.flush(META)
    with KnowledgeBase.open(str(kb)) as store:
        assert (store.model, store.fingerprint) == (str(model_a.resolve()), None)

    code, out, err = search(capsys, kb)
    assert code == 0, err
    assert json.loads(out)["id"] == "q2"
    code, out, err = search(capsys, kb, "--embedding", model_a)
    assert code == 0, err

    copy = shutil.copytree(model_a, tmp_path / "copy")
    code, _, err = search(capsys, kb, "--embedding", copy)
    assert_user_error(code, err, str(model_a.resolve()), str(copy.resolve()), "records only the path",
                      "qtune kb build")
    shutil.rmtree(model_a)
    code, _, err = search(capsys, kb)
    assert_user_error(code, err, str(model_a.resolve()), "no longer there", "put it back there", "qtune kb build")
