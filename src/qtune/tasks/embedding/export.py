"""Exports of embedders: a sentence-transformers folder on top of the merged weights.

`SentenceTransformer(OUT).encode(texts)` gives `qtune.load(DIR).embed(texts)`, and
`.encode(queries, prompt_name="query")` gives `.embed(queries, is_query=True)`:

- modules: Transformer (max_seq_length = qtune's max length) -> Pooling (the model's own pooling
  as qtune reads it: last token, mean or CLS; prompt tokens included, as qtune pools them) ->
  Normalize;
- the query instruction is the prompt "query", exactly the text qtune puts before a query
  (`Instruct: {task}\\nQuery:` for Qwen3); documents get the empty prompt "document"; cosine;
- decoders: the end token qtune appends is appended by the tokenizer's template (so a truncated
  text still ends with it), and padding is on the left.

Matryoshka: sentence-transformers cuts the normalised vector and normalises the cut one only when
asked, so `encode(texts, truncate_dim=d, normalize_embeddings=True)` is `embed(texts,
dimensions=d)` (without `normalize_embeddings` the vectors are shorter than 1: cosine scores
agree, dot products do not). The dimensions the run trained are listed in the export's README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from qtune.modeling.checkpoint import save_model_files
from qtune.modeling.export import append_to_template, keep_tokenizer_settings, max_abs_difference, source_setting
from qtune.tasks.embedding.encode import end_token_id, format_text

# qtune's pooling -> the sentence-transformers Pooling flag that does the same
POOLING_FLAGS = {"last": "pooling_mode_lasttoken", "mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}
POOLING_NAMES = {"last": "the last token", "mean": "the mean of the tokens", "cls": "the first ([CLS]) token"}
PLAIN_ENGINE = "transformers (AutoModel + pooling)"
ALL_POOLING_FLAGS = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                     "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


def query_prompt(loaded) -> str:
    """What qtune puts before every query (empty without an instruction)."""
    return format_text("", is_query=True, instruction=loaded.meta.settings.query_instruction,
                       is_decoder=loaded.family.is_decoder)


def write_export(loaded, output: Path, fmt: str) -> None:
    """The merged model with a tokenizer that encodes as qtune does; with fmt "sentence-transformers"
    also the modules, prompts and a README with the Matryoshka dimensions."""
    tokenizer = loaded.tokenizer
    if loaded.family.is_decoder:
        append_to_template(tokenizer, [end_token_id(tokenizer)])
    keep_tokenizer_settings(tokenizer, loaded.meta.max_length)
    save_model_files(loaded, output)
    if fmt == "sentence-transformers":
        write_sentence_transformers_files(loaded, output)


def write_sentence_transformers_files(loaded, output: Path) -> None:
    """modules.json, the module configs and config_sentence_transformers.json, in the layout
    sentence-transformers has always read (legacy module names and pooling flags load in every
    version)."""
    meta = loaded.meta
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    pooling = {"word_embedding_dimension": int(loaded.model.config.hidden_size),
               **{flag: flag == POOLING_FLAGS[meta.settings.pooling] for flag in ALL_POOLING_FLAGS},
               "include_prompt": True}
    settings = {"model_type": "SentenceTransformer", "prompts": {"query": query_prompt(loaded), "document": ""},
                "default_prompt_name": None, "similarity_fn_name": "cosine"}
    _write_json(output / "modules.json", modules)
    _write_json(output / "sentence_bert_config.json", {"max_seq_length": meta.max_length, "do_lower_case": False})
    _write_json(output / "1_Pooling" / "config.json", pooling)
    (output / "2_Normalize").mkdir()
    _write_json(output / "config_sentence_transformers.json", settings)
    (output / "README.md").write_text(model_card(loaded, source_setting(output, "matryoshka_dims")), encoding="utf-8")


def model_card(loaded, matryoshka_dims) -> str:
    """How to use the export, with the Matryoshka dimensions the run trained (if any)."""
    meta = loaded.meta
    lines = ["# qtune embedding export", "",
             (f"Pooling: {POOLING_NAMES[meta.settings.pooling]}, L2-normalised; max length {meta.max_length} tokens; "
              "similarity: cosine."), "",
             "```python", "from sentence_transformers import SentenceTransformer", "",
             'model = SentenceTransformer("PATH")', "docs = model.encode(passages)",
             'queries = model.encode(questions, prompt_name="query")', "```", ""]
    if matryoshka_dims:
        dims = ", ".join(str(d) for d in matryoshka_dims)
        lines += [(f"Matryoshka dimensions trained: {dims}. For a shorter vector pass `truncate_dim=d` and "
                   "`normalize_embeddings=True` (sentence-transformers cuts the normalised vector and does not "
                   "normalise it again unless asked)."), ""]
    return "\n".join(lines)


def check_export(output: Path, model, texts: list[str]) -> dict[str, float]:
    """{engine: max abs difference} from `model` (the source's Embedder): sentence-transformers for
    documents, queries (prompt "query") and Matryoshka cuts; an export without its modules (format
    transformers): the exported tokenizer and AutoModel with qtune's pooling."""
    texts = list(texts)
    documents = model.embed(texts)
    if not (output / "modules.json").is_file():
        return {PLAIN_ENGINE: max_abs_difference(plain_transformers(output, model, texts), documents)}
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(output), device="cpu")
    differences = {"sentence-transformers": max_abs_difference(st.encode(texts), documents)}
    differences['sentence-transformers, prompt_name="query"'] = max_abs_difference(
        st.encode(texts, prompt_name="query"), model.embed(texts, is_query=True))
    for d in source_setting(output, "matryoshka_dims") or [model.dimension // 2]:
        differences[f"sentence-transformers, truncate_dim={d}"] = max_abs_difference(
            st.encode(texts, truncate_dim=d, normalize_embeddings=True), model.embed(texts, dimensions=d))
    return differences


def plain_transformers(output: Path, model, texts: list[str]):
    """(texts, dim) vectors from the export with transformers alone: its tokenizer's plain call
    (padded batch, truncated at its max length), AutoModel, qtune's pooling."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from qtune.modeling.pooling import normalize, pool

    tokenizer = AutoTokenizer.from_pretrained(output)
    encoder = AutoModel.from_pretrained(output).eval()
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state  # (texts, seq, hidden)
    return normalize(pool(hidden, batch["attention_mask"], model.loaded.meta.settings.pooling)).numpy()


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
