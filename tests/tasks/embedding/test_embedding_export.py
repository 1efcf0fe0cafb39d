"""`qtune export` of embedders: sentence-transformers (and plain transformers) load the folder and
give qtune's vectors for documents, queries and Matryoshka cuts, in mixed-length batches, for an
encoder with CLS or mean pooling and for Qwen3 (last token, left padding, appended end token);
`qtune check-export` passes a good export and fails a tampered one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import qtune
from support import assert_user_error, run
from export_cases import drop_tokenizer_template, edit_json, lora_source
from qtune.api import check_export, export

QWEN3_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
TEXTS = ["cat", "the big green train is there now", "my old horse", "如何修改绑定的手机号码",
         "a small red bus and a big boat " * 8, "dog"]  # the long one is cut at 24 tokens
CASES = {  # case -> (base fixture, qtune.json overrides, expected pooling flag, query prompt)
    "bert-cls": ("tiny_bert_dir", {}, "pooling_mode_cls_token", ""),
    "bert-mean": ("tiny_bert_dir", {"pooling": "mean", "query_instruction": "query: "}, "pooling_mode_mean_tokens",
                  "query: "),
    "qwen3": ("tiny_qwen_dir", {}, "pooling_mode_lasttoken", QWEN3_PROMPT),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(case name, source folder, export folder, source Embedder)."""
    base, meta, _, _ = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    source = lora_source(request.getfixturevalue(base), "embedding", folder / "run", meta=meta,
                         run_settings={"matryoshka_dims": [8, 16]} if request.param == "qwen3" else None)
    output = export(str(source), str(folder / "export"))
    return request.param, source, output, qtune.load(source, device="cpu")


def test_sentence_transformers_embeds_like_qtune(case):
    from sentence_transformers import SentenceTransformer

    _, _, output, embedder = case
    st = SentenceTransformer(str(output), device="cpu")
    documents = embedder.embed(TEXTS)
    np.testing.assert_allclose(st.encode(TEXTS), documents, atol=1e-5, rtol=0)
    # one text alone equals it inside the padded batch (padding side, last-token position)
    np.testing.assert_allclose(st.encode(TEXTS[:1]), documents[:1], atol=1e-5, rtol=0)
    queries = st.encode(TEXTS, prompt_name="query")
    np.testing.assert_allclose(queries, embedder.embed(TEXTS, is_query=True), atol=1e-5, rtol=0)
    # sentence-transformers cuts the unit vector; normalised again it is qtune's Matryoshka vector
    cut = st.encode(TEXTS, truncate_dim=8, normalize_embeddings=True)
    np.testing.assert_allclose(cut, embedder.embed(TEXTS, dimensions=8), atol=1e-5, rtol=0)
    assert np.linalg.norm(st.encode(TEXTS, truncate_dim=8), axis=1).max() < 0.99  # not normalised unless asked


def test_the_files_say_how_qtune_embeds(case):
    from transformers import AutoTokenizer

    name, source, output, embedder = case
    _, _, flag, prompt = CASES[name]
    pooling = json.loads((output / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    assert [key for key, on in pooling.items() if key.startswith("pooling_mode") and on] == [flag]
    assert pooling["word_embedding_dimension"] == 32 and pooling["include_prompt"] is True
    settings = json.loads((output / "config_sentence_transformers.json").read_text(encoding="utf-8"))
    assert settings["prompts"] == {"query": prompt, "document": ""} and settings["similarity_fn_name"] == "cosine"
    assert json.loads((output / "sentence_bert_config.json").read_text(encoding="utf-8"))["max_seq_length"] == 24
    assert [m["path"] for m in json.loads((output / "modules.json").read_text(encoding="utf-8"))] == [
        "", "1_Pooling", "2_Normalize"]
    note = json.loads((output / "qtune_export.json").read_text(encoding="utf-8"))
    assert note["source"] == str(source.resolve()) and note["format"] == "sentence-transformers"
    # qtune.load(export) is the same embedder
    np.testing.assert_allclose(qtune.load(output, device="cpu").embed(TEXTS), embedder.embed(TEXTS), atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(output)
    ids = tokenizer(TEXTS[4], truncation=True)["input_ids"]
    assert ids == embedder.features(TEXTS[4:5], is_query=False)[0]["input_ids"] and len(ids) == 24
    if name == "qwen3":
        assert tokenizer.padding_side == "left" and ids[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_check_export_passes_and_finds_the_source_itself(case, capsys):
    name, _, output, _ = case
    code, out, err = run(capsys, "check-export", output)
    assert code == 0, err
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines()[2:]}
    dims = (8, 16) if name == "qwen3" else (16,)  # the run's Matryoshka dimensions, else half the width
    assert set(lines) == {"sentence-transformers", 'sentence-transformers, prompt_name="query"',
                          *(f"sentence-transformers, truncate_dim={d}" for d in dims)}
    assert all(line.endswith("ok") for line in lines.values())


def test_the_export_lists_the_trained_matryoshka_dimensions(case):
    name, _, output, _ = case
    readme = (output / "README.md").read_text(encoding="utf-8")
    assert ("Matryoshka dimensions trained: 8, 16." in readme) == (name == "qwen3")


def test_check_export_fails_on_a_tampered_export(case, tmp_path, capsys):
    name, source, output, _ = case
    tampered = shutil.copytree(output, tmp_path / "tampered")
    if name == "qwen3":  # without the end token the last position is another token
        drop_tokenizer_template(tampered)
        code, out, err = run(capsys, "check-export", tampered)  # the note still names the source
    else:
        other = "pooling_mode_mean_tokens" if name != "bert-mean" else "pooling_mode_cls_token"
        edit_json(tampered / "1_Pooling" / "config.json",
                  lambda c: c.update({k: k == other for k in c if k.startswith("pooling_mode")}))
        code, out, err = run(capsys, "check-export", tampered, "--model", source, "--tolerance", "1e-5")
    assert_user_error(code, err, "sentence-transformers", "differ", "1e-05")
    assert out.count("OVER 1e-05") == len(out.splitlines()) - 2  # documents, queries and cuts all differ


def test_the_transformers_format_has_no_sentence_transformers_modules(tiny_bert_dir, tmp_path):
    source = lora_source(tiny_bert_dir, "embedding", tmp_path / "run", meta={"pooling": "mean"})
    output = export(str(source), str(tmp_path / "export"), "transformers")
    assert not (output / "modules.json").exists() and (output / "qtune.json").is_file()
    differences = check_export(output)
    assert list(differences) == ["transformers (AutoModel + pooling)"]
    assert differences["transformers (AutoModel + pooling)"] < 1e-5
