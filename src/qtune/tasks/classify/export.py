"""Exports of text classifiers: `transformers.pipeline("text-classification", model=OUT)` gives
`qtune.load(DIR).predict_proba(texts)`.

Encoders need nothing beyond the merged checkpoint; decoders get qtune's closing EOS as the
tokenizer's template (`text <eos>`, cut before the EOS), left padding and the pad token in the config.
"""

from __future__ import annotations

from pathlib import Path

from qtune.modeling.export import pipeline_differences, write_classifier_export
from qtune.modeling.heads import closing_tokens


def write_export(loaded, output: Path, fmt: str) -> None:
    write_classifier_export(loaded, output, end=closing_tokens(loaded.tokenizer))


def check_export(output: Path, model, texts: list[str]) -> dict[str, float]:
    texts = list(texts)
    return pipeline_differences(output, model.labels, texts, model.predict_proba(texts))
