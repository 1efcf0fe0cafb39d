"""Served model names: NAME=DIR, folder-name defaults, one folder in two roles, clashes refused at
start, and no server path in any answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import assert_user_error, run
from fastapi.testclient import TestClient

from qtune.errors import QtuneError
from qtune.serving import ServerSettings, create_app
from qtune.serving.names import default_name, served_sources, split_flag


def test_a_flag_is_name_equals_folder_or_a_folder(tmp_path):
    odd = tmp_path / "lr=1e-4"
    odd.mkdir()
    assert split_flag("fin=runs/fin/best") == ("fin", "runs/fin/best")
    assert split_flag("runs/fin/best") == (None, "runs/fin/best")
    assert split_flag(str(odd)) == (None, str(odd))  # an existing folder is a folder, '=' and all
    assert split_flag("org/model") == (None, "org/model")
    for bad, why in [("=runs/x", "the name before '=' is empty"), ("fin=", "nothing after '='"),
                     ("my model=runs/x", "without spaces"), ("/abs=runs/x", "does not start with '/'")]:
        with pytest.raises(QtuneError, match=why):
            split_flag(bad)


def test_default_names_are_folder_names_never_paths(tmp_path):
    for sub in ("fin-emb/best", "fin-emb/last", "fin-emb/checkpoint-300", "plain-model"):
        (tmp_path / sub).mkdir(parents=True)
    assert default_name(str(tmp_path / "fin-emb" / "best")) == "fin-emb-best"
    assert default_name(str(tmp_path / "fin-emb" / "last")) == "fin-emb-last"
    assert default_name(str(tmp_path / "fin-emb" / "checkpoint-300")) == "fin-emb-checkpoint-300"
    assert default_name(str(tmp_path / "plain-model")) == "plain-model"
    assert default_name(str(tmp_path / "fin-emb" / "best" / ".." / "best")) == "fin-emb-best"
    assert default_name("BAAI/bge-small-en-v1.5") == "BAAI/bge-small-en-v1.5"  # a hub id, as given


def test_clashing_defaults_get_their_role_and_given_names_stay(tmp_path):
    (tmp_path / "a" / "best").mkdir(parents=True)
    (tmp_path / "b" / "best").mkdir(parents=True)
    folder = str(tmp_path / "a" / "best")
    names = [(s.name, s.role) for s in served_sources({"embedding": [folder], "reranker": [folder]})]
    assert names == [("a-best-embedding", "embedding"), ("a-best-reranker", "reranker")]
    named = served_sources({"embedding": [f"emb={folder}"], "reranker": [folder]})
    assert [s.name for s in named] == ["emb", "a-best"]
    # an explicit name takes the default of another model: that one gets its role
    taken = served_sources({"embedding": [f"a-best={tmp_path / 'b' / 'best'}"], "reranker": [folder]})
    assert [s.name for s in taken] == ["a-best", "a-best-reranker"]


def test_names_that_cannot_be_told_apart_are_refused(tmp_path):
    for run_dir in ("x/run", "y/run"):
        (tmp_path / run_dir / "best").mkdir(parents=True)
    first, second = str(tmp_path / "x" / "run" / "best"), str(tmp_path / "y" / "run" / "best")
    with pytest.raises(QtuneError, match=r"two models would be served as 'run-best-classifier'.*NAME="):
        served_sources({"classifier": [first, second]})
    with pytest.raises(QtuneError, match="'m' is given to more than one model"):
        served_sources({"embedding": [f"m={first}"], "reranker": [f"m={second}"]})
    with pytest.raises(QtuneError, match="given more than once as --embedding"):
        served_sources({"embedding": [first, f"other={first}"]})
    assert [s.name for s in served_sources({"classifier": [f"x={first}", f"y={second}"]})] == ["x", "y"]


def test_cli_names_one_folder_in_two_roles_and_refuses_clashes(tiny_bert_dir, served, capsys):
    code, _, err = run(capsys, "serve", "--embedding", tiny_bert_dir, "--reranker", tiny_bert_dir, "--device", "cpu")
    assert code == 0, err
    folder = Path(tiny_bert_dir).name
    kinds = {name: type(model).__name__ for name, model in served["models"].items()}
    assert kinds == {f"{folder}-embedding": "Embedder", f"{folder}-reranker": "Reranker"}

    code, _, err = run(capsys, "serve", "--embedding", f"emb={tiny_bert_dir}", "--reranker", f"rr={tiny_bert_dir}",
                       "--classifier", f"clf={tiny_bert_dir}", "--device", "cpu")
    assert code == 0, err
    assert list(served["models"]) == ["emb", "clf", "rr"]

    served.clear()
    code, _, err = run(capsys, "serve", "--embedding", f"same={tiny_bert_dir}", "--reranker", f"same={tiny_bert_dir}")
    assert_user_error(code, err, "served model name 'same' is given to more than one model")
    code, _, err = run(capsys, "serve", "--embedding", f"=={tiny_bert_dir}")
    assert_user_error(code, err, "the name before '=' is empty")
    assert served == {}  # refused before anything loaded


def test_one_folder_in_two_roles_is_listed_twice_and_no_answer_carries_a_path(tiny_bert_dir, served, capsys):
    code, _, err = run(capsys, "serve", "--embedding", tiny_bert_dir, "--reranker", tiny_bert_dir, "--device", "cpu")
    assert code == 0, err
    folder = Path(tiny_bert_dir).name
    bodies = []
    with TestClient(create_app(served["models"], ServerSettings())) as client:
        listed = client.get("/v1/models")
        assert [(m["id"], m["task"]) for m in listed.json()["data"]] == [(f"{folder}-embedding", "embedding"),
                                                                         (f"{folder}-reranker", "reranker")]
        embedded = client.post("/v1/embeddings", json={"input": ["the cat"]})
        assert embedded.status_code == 200 and embedded.json()["model"] == f"{folder}-embedding"
        reranked = client.post("/v1/rerank", json={"model": f"{folder}-reranker", "query": "cat",
                                                   "documents": ["the cat", "a bus"]})
        assert reranked.status_code == 200 and reranked.json()["model"] == f"{folder}-reranker"
        unknown = client.post("/v1/embeddings", json={"model": tiny_bert_dir, "input": ["the cat"]})
        assert unknown.status_code == 404 and f"{folder}-embedding" in unknown.json()["error"]["message"]
        bodies += [listed, embedded, reranked, client.get("/health"), client.get("/metrics")]
        bodies.append(unknown)
    # the 404 quotes the name the client sent (the path here); every other answer is free of it
    for response in bodies[:-1]:
        assert str(Path(tiny_bert_dir).parent) not in response.text
    assert json.loads(bodies[-1].text)["error"]["message"].count(str(Path(tiny_bert_dir).parent)) == 1


def test_the_knowledge_base_uses_the_served_embedder_that_built_it(tiny_bert_dir, tiny_qwen_dir, served, capsys,
                                                                    tmp_path):
    faq = tmp_path / "faq.csv"
    faq.write_text("question,answer\nthe cat is here,answer 0\na red bus now,answer 1\n", encoding="utf-8")
    kb = tmp_path / "faq.db"
    code, _, err = run(capsys, "kb", "build", "--embedding", tiny_bert_dir, "--input", faq, "--kb", kb,
                       "--device", "cpu")
    assert code == 0, err
    code, _, err = run(capsys, "serve", "--embedding", f"qwen={tiny_qwen_dir}", f"bert={tiny_bert_dir}",
                       "--kb", kb, "--device", "cpu")
    assert code == 0, err
    served["matcher"].kb.close()
    assert served["matcher"].embedder is served["models"]["bert"]
    code, _, err = run(capsys, "serve", "--embedding", f"qwen={tiny_qwen_dir}", "--kb", kb, "--device", "cpu")
    assert_user_error(code, err, "built with the embedding model", str(Path(tiny_qwen_dir).resolve()))
