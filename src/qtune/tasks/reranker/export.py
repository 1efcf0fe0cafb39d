"""Reranker exports: folders other engines load and score with exactly qtune's numbers.

Formats (`RerankerTask.export_formats`; the first is what `--format auto` picks):
- "cross-encoder": a one-logit sequence classifier whose sigmoid is qtune's score.
  Encoders: the merged cross-encoder, with sentence-transformers' activation (sigmoid) named in
  config.json and the max length in the tokenizer, so `CrossEncoder(OUT).predict(pairs)` returns
  qtune's scores and `AutoModelForSequenceClassification` gives the logit.
  Decoders: a `*ForSequenceClassification` whose one-row score head is lm_head[yes] - lm_head[no],
  so its logit is logit(yes) - logit(no) and its sigmoid is exactly P(yes) of the two-way softmax.
  It reads the last non-pad token, so inputs are left-padded; engines must build the prompt
  themselves, from PROMPT_FILE.
- "causal-lm" (decoders): the merged LM and PROMPT_FILE, as engines that serve Qwen3-Reranker
  as an LM load it (P(yes) from the "yes" and "no" logits at the last position).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from qtune.errors import QtuneError
from qtune.modeling.checkpoint import save_model_files
from qtune.modeling.export import keep_tokenizer_settings, max_abs_difference
from qtune.tasks.reranker.encode import decoder_prompt, pair_text

PROMPT_FILE = "qtune_prompt.json"
PLACEHOLDER = re.compile(r"\{(instruction|query|document)\}")


def write_export(loaded, output: Path, fmt: str) -> None:
    """Write the `fmt` export of a merged reranker (CPU, fp32) into the empty folder `output`."""
    output = Path(output)
    if loaded.is_adapter:
        raise QtuneError("merge the LoRA adapter before exporting a reranker")
    decoder = loaded.family.is_decoder
    if fmt == "cross-encoder":
        (_write_classifier_head if decoder else _write_cross_encoder)(loaded, output)
    elif fmt == "causal-lm":
        if not decoder:
            raise QtuneError(f"--format causal-lm is for decoder rerankers (Qwen3-Reranker); "
                             f"{loaded.family.model_type} is a cross-encoder: use --format cross-encoder")
        keep_tokenizer_settings(loaded.tokenizer, loaded.meta.max_length)
        save_model_files(loaded, output)
    else:
        raise QtuneError(f"a reranker exports as cross-encoder or causal-lm, not {fmt!r}")
    if decoder:
        write_prompt(loaded, output)


def _write_cross_encoder(loaded, output: Path) -> None:
    """The merged encoder, loadable by sentence-transformers' CrossEncoder and transformers alike."""
    import torch

    config = loaded.model.config
    if config.num_labels != 1:
        raise QtuneError(f"a cross-encoder reranker has one logit, this model has {config.num_labels}")
    # CrossEncoder reads the activation from config.json's `sentence_transformers` section; only
    # paths under `torch.` are taken without trust_remote_code.
    config.sentence_transformers = {"activation_fn": f"{torch.nn.Sigmoid.__module__}.{torch.nn.Sigmoid.__qualname__}"}
    # CrossEncoder cuts pairs "longest_first", as qtune does, at the tokenizer's model_max_length
    keep_tokenizer_settings(loaded.tokenizer, loaded.meta.max_length)
    save_model_files(loaded, output)


def _write_classifier_head(loaded, output: Path) -> None:
    """A one-logit `*ForSequenceClassification` sharing the merged LM's body; its score head is the
    difference of the LM head's "yes" and "no" rows. No qtune.json: qtune loads rerankers as LMs."""
    import copy

    import torch
    import transformers

    lm = loaded.model
    name = type(lm).__name__.replace("ForCausalLM", "ForSequenceClassification")
    head_class = getattr(transformers, name, None)
    if head_class is None:
        raise QtuneError(f"transformers has no {name} to export {type(lm).__name__} as a one-logit classifier; "
                         "use --format causal-lm")
    lm_head = lm.get_output_embeddings()  # with tied embeddings this is the input embedding matrix
    if getattr(lm_head, "bias", None) is not None:
        raise QtuneError(f"{type(lm).__name__}'s LM head has a bias, which a {name} score head cannot hold; "
                         "use --format causal-lm")
    prompt = decoder_prompt(loaded.tokenizer)
    config = copy.deepcopy(lm.config)
    config.architectures = [name]
    config.num_labels = 1
    config.pad_token_id = loaded.tokenizer.pad_token_id  # the classifier reads the last non-pad token
    config.tie_word_embeddings = False  # no LM head left to tie
    with torch.device("meta"):  # no weights drawn: the body is the LM's, the head set below
        model = head_class(config)
    setattr(model, model.base_model_prefix, getattr(lm, lm.base_model_prefix))
    weight = lm_head.weight.detach()  # (vocab, hidden)
    model.score = torch.nn.Linear(weight.shape[1], 1, bias=False, dtype=weight.dtype)
    with torch.no_grad():
        model.score.weight.copy_(weight[prompt.yes_id] - weight[prompt.no_id])  # (1, hidden)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise QtuneError(f"{name} has weights the LM does not provide: {', '.join(left)}")
    keep_tokenizer_settings(loaded.tokenizer, loaded.meta.max_length)
    model.save_pretrained(output)
    loaded.tokenizer.save_pretrained(output)


def write_prompt(loaded, output: Path) -> None:
    """PROMPT_FILE: the text an engine must send for a (query, document) pair, and how to score it.
    prefix + `pair` (placeholders filled) + suffix, tokenized without special tokens, gives qtune's
    token ids for every pair that fits max_length (qtune cuts longer ones inside the pair text)."""
    tokenizer = loaded.tokenizer
    prompt = decoder_prompt(tokenizer)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    spec = {"prefix": decode(prompt.prefix), "pair": pair_text("{query}", "{document}", "{instruction}"),
            "suffix": decode(prompt.suffix), "instruction": loaded.meta.settings.instruction,
            "max_length": loaded.meta.max_length, "padding_side": "left",
            "yes_token": tokenizer.convert_ids_to_tokens(prompt.yes_id), "yes_id": prompt.yes_id,
            "no_token": tokenizer.convert_ids_to_tokens(prompt.no_id), "no_id": prompt.no_id,
            "score": "causal-lm: softmax over the [yes, no] logits at the last position, P(yes); "
                     "classifier: sigmoid(logit)"}
    (output / PROMPT_FILE).write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def prompt_texts(spec: dict, pairs: list[tuple[str, str]], instruction: str | None = None) -> list[str]:
    """The engine-side prompt of each pair, built from a PROMPT_FILE's contents (one pass over the
    placeholders, so braces in a query or document stay as they are)."""

    def fill(query: str, document: str) -> str:
        values = {"instruction": instruction or spec["instruction"], "query": query, "document": document}
        return PLACEHOLDER.sub(lambda m: values[m[1]], spec["pair"])

    return [spec["prefix"] + fill(query, document) + spec["suffix"] for query, document in pairs]


def sample_pairs(texts: list[str]) -> list[tuple[str, str]]:
    """Pairs of different lengths from the sample texts: each with the next one, and with itself."""
    if not texts:
        raise QtuneError("checking an export needs at least one sample text")
    return [(t, texts[(i + 1) % len(texts)]) for i, t in enumerate(texts)] + [(t, t) for t in texts]


def check_export(output: Path, model, texts: list[str]) -> dict[str, float]:
    """{engine: max abs difference from qtune's scores} on pairs made of `texts`; `model` is the
    source reranker (`qtune.load`).

    Decoder exports are scored twice: on the prompt built from PROMPT_FILE, as an engine is given
    it, for the pairs that fit max_length (qtune cuts a longer pair inside the pair text, which an
    engine does not do), and on qtune's own token ids for every pair (left-padded), which checks
    the weights whatever the length."""
    output = Path(output)
    pairs = sample_pairs(texts)
    expected = model.score(pairs)  # (pairs,)
    if not (output / PROMPT_FILE).is_file():
        return {engine: max_abs_difference(scores, expected)
                for engine, scores in _cross_encoder_scores(output, pairs).items()}
    spec = json.loads((output / PROMPT_FILE).read_text(encoding="utf-8"))
    scorer = _DecoderExport(output, spec)
    features = model.features(pairs)
    whole = model.features(pairs, truncate=False)
    fits = [i for i, (cut, full) in enumerate(zip(features, whole)) if cut["input_ids"] == full["input_ids"]]
    found = {"transformers (qtune's token ids)": max_abs_difference(scorer.scores_of(features), expected)}
    if fits:
        prompts = scorer.tokenizer(prompt_texts(spec, [pairs[i] for i in fits]), add_special_tokens=False)
        found["transformers (prompt from qtune_prompt.json)"] = max_abs_difference(
            scorer.scores_of([{"input_ids": ids} for ids in prompts["input_ids"]]), expected[fits])
    return found


def _cross_encoder_scores(output: Path, pairs) -> dict[str, np.ndarray]:
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    st = CrossEncoder(str(output), device="cpu").predict(pairs)  # (pairs,), the activation applied
    tokenizer = AutoTokenizer.from_pretrained(output)
    model = AutoModelForSequenceClassification.from_pretrained(output).eval()
    batch = tokenizer([q for q, _ in pairs], [d for _, d in pairs], padding=True, truncation="longest_first",
                      return_tensors="pt")  # cut at the model_max_length written in the export
    with torch.inference_mode():
        logits = model(**batch).logits[:, 0]  # (pairs,)
    return {"sentence-transformers": np.asarray(st, dtype=np.float64),
            "transformers": torch.sigmoid(logits).double().numpy()}


class _DecoderExport:
    """A decoder export loaded with transformers: the one-logit classifier (P(yes) = sigmoid of its
    logit) or the LM (P(yes) from the two-way softmax over the "yes" and "no" logits)."""

    def __init__(self, output: Path, spec: dict):
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(output)  # left padding (tokenizer_config.json)
        architectures = AutoConfig.from_pretrained(output).architectures or []
        self.is_lm = any(a.endswith("ForCausalLM") for a in architectures)
        auto = AutoModelForCausalLM if self.is_lm else AutoModelForSequenceClassification
        self.model = auto.from_pretrained(output).eval()

    def scores_of(self, features: list[dict]) -> np.ndarray:
        """(rows,) P(yes) of unpadded token ids, in one batch padded as the tokenizer pads."""
        import torch

        batch = self.tokenizer.pad([{"input_ids": f["input_ids"]} for f in features], return_tensors="pt")
        with torch.inference_mode():
            if not self.is_lm:
                return torch.sigmoid(self.model(**batch).logits[:, 0].double()).numpy()
            logits = self.model(**batch, logits_to_keep=1).logits[:, -1, :]  # (rows, vocab)
            answer = logits[:, [self.spec["yes_id"], self.spec["no_id"]]].double()  # (rows, 2)
            return torch.softmax(answer, dim=-1)[:, 0].numpy()
