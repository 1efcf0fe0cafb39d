"""Exports of text classifiers that another engine loads and that give
`qtune.load(DIR).predict_proba(texts)` there.

- transformers (a head of its own, as transformers builds it): `transformers.pipeline(
  "text-classification", model=OUT)`. Encoders need nothing beyond the merged checkpoint; decoders
  get qtune's closing EOS as the tokenizer's template (`text <eos>`, cut before the EOS), left
  padding and the pad token in the config.
- sentence-transformers (a head over the mean of the last hidden state, which no transformers
  head computes): `SentenceTransformer(OUT).encode(texts)` gives the logits, their softmax the
  probabilities.
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
        write_mean_classifier_export(loaded, output, "text classifier", '["where is my parcel"]')
    else:
        write_classifier_export(loaded, output, end=closing_tokens(loaded.tokenizer))


def check_export(output: Path, model, texts: list[str]) -> dict[str, float]:
    texts = list(texts)
    if is_sentence_transformers_export(output):
        return sentence_transformers_differences(output, texts, model.predict_proba(texts))
    return pipeline_differences(output, model.labels, texts, model.predict_proba(texts))
