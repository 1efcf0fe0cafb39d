"""Settings of `qtune train|eval|predict classify`."""

from __future__ import annotations

from dataclasses import dataclass

from qtune.config import InferenceConfig, TrainConfig, opt


@dataclass(kw_only=True)
class ClassifyConfig(TrainConfig):
    """`qtune train classify`: LoRA on a sequence-classification head over single texts (intents, categories)."""

    text_column: str = opt("text", "the text column")
    label_column: str = opt("label", "the label column")
    labels: list[str] | None = opt(None, "label values in class order; any other label in a file is an error "
                                   "(default: the sorted labels found in --train)")
    group_by_length: bool = opt(True, "length-grouped batches (less padding)")
    max_length: int = opt(128, "maximum tokens per text (special tokens included)", low=4)
    head_lr: float | None = opt(3e-2, "peak learning rate of the classification head, which starts untrained "
                                "(its own AdamW group, scheduled like --lr; null in a YAML recipe: --lr)", low=0,
                                low_open=True)


@dataclass(kw_only=True)
class ClassifyEvalConfig(InferenceConfig):
    """`qtune eval classify`: accuracy, macro-F1, per-class P/R/F1, confusion matrix."""

    data: str = opt("", "labelled text file (CSV, TSV, JSONL, Parquet, datasets FOLDER[:SPLIT] or "
                    "hf://datasets/NAME[:SPLIT])", required=True)
    compare: str | None = opt(None, "a second model, evaluated side by side")
    output: str | None = opt(None, "folder for metrics.json, report.md and confusion.png")
    text_column: str = opt("text", "the text column")
    label_column: str = opt("label", "the label column")


@dataclass(kw_only=True)
class ClassifyPredictConfig(InferenceConfig):
    """`qtune predict classify`: the predicted label and its probability for every row, in input order."""

    input: str = opt("", "text file (CSV, TSV, JSONL, Parquet, datasets FOLDER[:SPLIT] or "
                     "hf://datasets/NAME[:SPLIT]; labels not needed)", required=True)
    output: str = opt("", "output file (CSV, TSV or JSONL by extension)", required=True)
    text_column: str = opt("text", "the text column")
