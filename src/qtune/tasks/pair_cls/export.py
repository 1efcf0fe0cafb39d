"""Exports of pair classifiers that another engine loads and that give
`qtune.load(DIR).predict_proba([(a, b)])` there.

transformers (a head of its own, as transformers builds it): `transformers.pipeline(
"text-classification", model=OUT)` with `{"text": a, "text_pair": b}`. Encoders need nothing
beyond the merged checkpoint (the tokenizer's own pair template is qtune's). Decoders get qtune's
pair text as the tokenizer's pair template, `a \\n b <eos>` with each text tokenized on its own, left
padding and the pad token in the config. Pairs over the max length are cut longest-first by both;
the one difference: when both texts are cut and the room left for them (max length - 2) is odd,
the tokenizer keeps the odd token in the first text, qtune in the second.

sentence-transformers (a head over the mean of the last hidden state, which no transformers head
computes): `SentenceTransformer(OUT).encode([[a, b], ...])` gives the logits (the tokenizer's pair
template, cut longest-first as qtune cuts encoder pairs), their softmax the probabilities.
"""

from __future__ import annotations

from pathlib import Path

from qtune.modeling.export import (
    is_sentence_transformers_export,
    pipeline_differences,
    sentence_transformers_differences,
    write_classifier_export,
    write_mean_classifier_export,
)
from qtune.modeling.heads import closing_tokens


def write_export(loaded, output: Path, fmt: str) -> None:
    if fmt == "sentence-transformers":
        write_mean_classifier_export(loaded, output, "pair classifier", '[["how do I pay", "payment methods"]]')
        return
    tokenizer = loaded.tokenizer
    separator = tokenizer("\n", add_special_tokens=False)["input_ids"]
    write_classifier_export(loaded, output, end=closing_tokens(tokenizer), pair_separator=separator)


def check_export(output: Path, model, texts: list[str]) -> dict[str, float]:
    """Pairs of the sample texts (each with the next one), through the pipeline vs `model`."""
    texts = list(texts)
    pairs = list(zip(texts, texts[1:] + texts[:1]))
    if is_sentence_transformers_export(output):
        return sentence_transformers_differences(output, [list(pair) for pair in pairs], model.predict_proba(pairs))
    inputs = [{"text": a, "text_pair": b} for a, b in pairs]
    return pipeline_differences(output, model.labels, inputs, model.predict_proba(pairs))
