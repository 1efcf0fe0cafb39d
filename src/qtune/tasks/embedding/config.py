"""Settings of `qtune train embedding` and `qtune eval retrieval`."""

from __future__ import annotations

from dataclasses import dataclass

from qtune.config import InferenceConfig, TrainConfig, opt


@dataclass(kw_only=True)
class EmbeddingConfig(TrainConfig):
    """`qtune train embedding`: InfoNCE over in-batch and mined hard negatives."""

    eval: str | None = opt(None, "BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv) evaluated during training")
    batch_size: int = opt(64, "query groups per batch (in-batch negatives grow with it)", low=1)
    lr: float = opt(2e-4, "peak learning rate (AdamW); about 2e-5 for --full", low=0, low_open=True)
    epochs: float = opt(1.0, "training epochs (fractions allowed)", low=0, low_open=True)
    max_length: int = opt(256, "maximum tokens per query or passage", low=4)
    temperature: float = opt(0.05, "InfoNCE temperature", low=0, low_open=True)
    hard_negatives: int = opt(7, "mined negatives used per query (0: in-batch negatives only)", low=0)
    false_negative_offset: float | None = opt(None, "mask in-batch candidates scoring above the positive plus "
                                               "this (Qwen3-Embedding uses 0.1); off when unset")
    cached: bool = opt(False, "GradCache: same gradients, memory of --mini-batch-size rows")
    mini_batch_size: int = opt(32, "rows per forward pass with --cached", low=1)
    matryoshka_dims: list[int] | None = opt(None, "also train these leading dimensions (e.g. 256 128 64)")
    query_instruction: str | None = opt(None, "instruction for queries (default: the model family's; '' for none)")
    eval_top_k: int = opt(100, "passages retrieved per query when evaluating", low=1)


@dataclass(kw_only=True)
class RetrievalEvalConfig(InferenceConfig):
    """`qtune eval retrieval`: nDCG@k, Recall@k, MRR@10, MAP@100 on a BEIR folder."""

    model: str = opt("", "embedding model: trained folder or base model", required=True)
    data: str = opt("", "BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)", required=True)
    compare: str | None = opt(None, "a second model, side by side (e.g. the base model)")
    output: str | None = opt(None, "folder for metrics.json, report.md and retrieval.png")
    triplets: str | None = opt(None, "JSONL with negatives: also report mean sim(q,pos) - sim(q,neg)")
    top_k: int = opt(100, "passages retrieved per query", low=1)
    reranker: str | None = opt(None, "also rerank each model's top --rerank-top-k with this reranker")
    rerank_top_k: int = opt(100, "passages reranked per query", low=1)
    rerank_batch_size: int = opt(32, "pairs per reranker forward pass", low=1)
