"""Settings of `qtune train reranker`, `qtune eval rerank` and `qtune calibrate`."""

from __future__ import annotations

from dataclasses import dataclass, field

from qtune.config import InferenceConfig, TrainConfig, opt
from qtune.modeling.loading import SavedSettings, check_optional_text, check_threshold


@dataclass(kw_only=True)
class RerankerConfig(TrainConfig):
    """`qtune train reranker`: groups of (query, positive, hard negatives), listwise or pointwise."""

    train: str = opt("", "training groups, JSONL {query, pos, neg} (e.g. `qtune mine` output)", required=True)
    eval: str | None = opt(None, "held-out groups in the same format; scored by the positive's rank in its group")
    batch_size: int = opt(8, "query groups per batch (times --group-size pairs)", low=1)
    eval_batch_size: int = opt(32, "pairs per evaluation batch", low=1)
    lr: float = opt(1e-4, "peak learning rate (AdamW); about 2e-5 for --full", low=0, low_open=True)
    epochs: float = opt(1.0, "training epochs (fractions allowed)", low=0, low_open=True)
    max_length: int = opt(512, "maximum tokens per (query, document) pair, prompt included", low=16)
    group_size: int = opt(8, "pairs per group: the positive and group_size - 1 negatives", low=2)
    loss: str = opt("listwise", "listwise: softmax cross-entropy over each group; pointwise: binary "
                     "cross-entropy per pair", choices=("listwise", "pointwise"))
    distill: bool = opt(False, "also learn the teacher's scores in the data (pos_scores, neg_scores): KL between "
                        "its softmax and the model's over each group's pairs")
    distill_weight: float = opt(1.0, "with --distill: loss = --loss + this x KL", low=0, low_open=True)
    distill_temperature: float = opt(1.0, "with --distill: the teacher's scores are divided by this before the "
                                     "softmax (FlagEmbedding: 1)", low=0, low_open=True)
    distill_only: bool = opt(False, "with --distill: the KL term alone, without --loss")
    instruction: str | None = opt(None, "decoder rerankers: the <Instruct> text (default: the Qwen3-Reranker one)")
    memory_check: bool = opt(True, "before the first step, estimate a batch's memory: split it with --grad-accum "
                             "when it does not fit in the free memory, stop when one group does not")


@dataclass(kw_only=True)
class RerankEvalConfig(InferenceConfig):
    """`qtune eval rerank`: retriever alone vs retriever + reranker (nDCG@10, MRR@10, ...)"""

    model: str = opt("", "reranker: trained folder or base model", required=True)
    data: str = opt("", "BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)", required=True)
    retriever: str = opt("", "embedding model for the first stage", required=True)
    top_k: int = opt(100, "passages retrieved and reranked per query", low=1)
    compare: str | None = opt(None, "a second reranker, side by side (e.g. the base model)")
    output: str | None = opt(None, "folder for metrics.json, report.md and retrieval.png")
    batch_size: int = opt(32, "pairs per reranker forward pass", low=1)
    retriever_batch_size: int = opt(64, "texts per retriever forward pass", low=1)


@dataclass(kw_only=True)
class CalibrateConfig(InferenceConfig):
    """`qtune calibrate`: the reranker score threshold from labelled pairs, stored with the model."""

    model: str = opt("", "reranker folder (the threshold goes into its qtune.json)", required=True)
    data: str = opt("", "labelled pairs: query, document, label 1 (relevant) or 0", required=True)
    min_precision: float | None = opt(None, "the lowest threshold with at least this precision (default: the "
                                      "F1-best threshold)")
    output: str | None = opt(None, "folder for metrics.json")
    batch_size: int = opt(32, "pairs per forward pass", low=1)
    text_columns: list[str] = opt(["sentence1", "sentence2"], "the query and document columns", count=2,
                                  metavar=("COL1", "COL2"))
    label_column: str = opt("label", "the label column")


@dataclass
class RerankerSaved(SavedSettings):
    """A reranker's own fields of qtune.json."""

    # decoders: the instruction put in every prompt unless a row has one
    instruction: str | None = field(default=None, metadata={"check": check_optional_text})
    # the calibrated score threshold below which there is "no good answer" (`qtune calibrate`)
    threshold: float | None = field(default=None, metadata={"check": check_threshold})
    # why that threshold does not separate relevant from not relevant pairs, when it does not
    # (`qtune calibrate` found so; the model card repeats it)
    threshold_warning: str | None = field(default=None, metadata={"check": check_optional_text})

    def card_lines(self) -> list[str]:
        """The calibrated threshold a server applies, and the calibration's warning when it had one: a
        threshold that accepts every pair makes the server mark unrelated documents relevant."""
        if self.threshold is None:
            return []
        lines = ["## Relevance threshold", "", f"Calibrated with `qtune calibrate`: a score of at least "
                 f"{self.threshold:.6f} marks a document relevant.", ""]
        if self.threshold_warning:
            lines += [f"**Warning:** {self.threshold_warning}.", ""]
        return lines
