"""Settings of `qtune train|eval|predict pair-cls`."""

from __future__ import annotations

from dataclasses import dataclass

from qtune.config import InferenceConfig, TrainConfig, opt


@dataclass(kw_only=True)
class PairClsConfig(TrainConfig):
    """`qtune train pair-cls`: LoRA on a sequence-classification head over sentence pairs."""

    text_columns: list[str] = opt(["sentence1", "sentence2"], "the two text columns")
    label_column: str = opt("label", "the label column")
    labels: list[str] = opt(["0", "1"], "label values in the file, in class order (last = positive)")
    group_by_length: bool = opt(True, "length-grouped batches (less padding)")
    max_length: int = opt(128, "maximum tokens per pair, both sentences together", low=4)
    # Default: --lr. 3e-2 (classify's default) was measured on text classification only; on the demo's
    # paraphrase pairs it scored below one rate (0.752 against 0.775 dev accuracy).
    head_lr: float | None = opt(None, "peak learning rate of the classification head, which starts untrained "
                                "(its own AdamW group, scheduled like --lr; default: --lr)", low=0, low_open=True)


@dataclass(kw_only=True)
class PairClsEvalConfig(InferenceConfig):
    """`qtune eval pair-cls`: accuracy, macro-F1, per-class P/R, confusion, best threshold."""

    data: str = opt("", "labelled pair file", required=True)
    compare: str | None = opt(None, "a second model, evaluated side by side")
    output: str | None = opt(None, "folder for metrics.json, report.md and confusion.png")
    text_columns: list[str] = opt(["sentence1", "sentence2"], "the two text columns", count=2,
                                  metavar=("COL1", "COL2"))
    label_column: str = opt("label", "the label column")


@dataclass(kw_only=True)
class PairClsPredictConfig(InferenceConfig):
    """`qtune predict pair-cls`: probability and label for every row, in input order."""

    input: str = opt("", "pair file (CSV, TSV, JSONL, Parquet, datasets FOLDER[:SPLIT] or "
                     "hf://datasets/NAME[:SPLIT]; labels not needed)", required=True)
    output: str = opt("", "output file (CSV, TSV or JSONL by extension)", required=True)
    threshold: float | None = opt(None, "positive when P(positive) >= this (default: argmax)")
    text_columns: list[str] = opt(["sentence1", "sentence2"], "the two text columns", count=2,
                                  metavar=("COL1", "COL2"))
