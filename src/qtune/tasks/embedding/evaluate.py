"""`qtune eval retrieval`: nDCG/Recall/MRR/MAP of one embedder (or two side by side) on a BEIR folder,
optionally followed by a reranker (two stages)."""

from __future__ import annotations

from qtune.data.retrieval import read_beir, read_query_groups
from qtune.evaluation.report import short_name
from qtune.evaluation.retrieval import (rerank_run, retrieval_report, retrieve, triplet_margin,
                                        write_retrieval_outputs)
from qtune.evaluation.retrieval_metrics import retrieval_metrics
from qtune.tasks.embedding.config import RetrievalEvalConfig


def two_stage_name(retriever: str, reranker: str) -> str:
    return f"{short_name(retriever)} + {short_name(reranker)}"


def evaluate(config: RetrievalEvalConfig, load) -> dict:
    """With `reranker`, each embedder's top `rerank_top_k` are also reranked and scored (two stages).
    `load(name, task, device=, precision=)` gives a loaded model (`qtune.load`)."""
    data_set = read_beir(config.data)
    groups = read_query_groups(config.triplets) if config.triplets else None
    load_args = dict(device=config.device, precision=config.load_precision)
    scorer = load(config.reranker, "reranker", **load_args) if config.reranker else None
    top_k = config.top_k
    results = {}
    for name in [config.model] + ([config.compare] if config.compare else []):
        embedder = load(name, "embedding", **load_args)
        run = retrieve(embedder, data_set, top_k=max(top_k, config.rerank_top_k if scorer else 0),
                       batch_size=config.batch_size, progress=True)
        results[name] = retrieval_metrics({q: docs[:top_k] for q, docs in run.items()}, data_set.qrels)
        if groups is not None:
            results[name]["triplet_margin"] = triplet_margin(embedder, groups, batch_size=config.batch_size)
        if scorer is not None:
            reranked = rerank_run(scorer, data_set, run, top_k=config.rerank_top_k,
                                  batch_size=config.rerank_batch_size, progress=True)
            results[two_stage_name(name, config.reranker)] = retrieval_metrics(
                {q: docs[:top_k] for q, docs in reranked.items()}, data_set.qrels)
    if config.output:
        write_retrieval_outputs(results, str(config.data), config.output, baseline=_baseline(config))
    return results


def _baseline(config: RetrievalEvalConfig) -> str | None:
    return config.model if config.reranker and not config.compare else None


def show_evaluation(config: RetrievalEvalConfig, results: dict) -> str:
    text = retrieval_report(results, config.data, baseline=_baseline(config))
    if config.output:
        text += f"\nwrote {config.output}/metrics.json, report.md, retrieval.png"
    return text
