"""`qtune eval rerank` (the retriever alone, then its top-k reranked, side by side) and `qtune calibrate`.

Under `torchrun` / `accelerate launch` the ranks share the embedding and scoring (the same numbers
as one process, see `qtune.evaluation.sharded`) and rank 0 alone writes."""

from __future__ import annotations

from pathlib import Path

from qtune.data.pairs import PAIR_COLUMNS, QUERY_DOCUMENT, read_pairs
from qtune.data.retrieval import read_beir
from qtune.distributed import init_process_group
from qtune.errors import QtuneError
from qtune.evaluation.metrics import calibrate_threshold, threshold_warning
from qtune.evaluation.report import mark_untrained, short_name
from qtune.evaluation.retrieval import (rerank_run, retrieval_report, retrieve, two_stage_legend,
                                        write_retrieval_outputs)
from qtune.evaluation.retrieval_metrics import retrieval_metrics
from qtune.evaluation.sharded import is_main, sharded_call
from qtune.io import write_json
from qtune.tasks.reranker.config import CalibrateConfig, RerankEvalConfig


def evaluate(config: RerankEvalConfig, load) -> dict:
    """Two-stage quality on a BEIR folder: the retriever alone, then its top `top_k` reranked by
    `model` (and by `compare`), side by side. Keys: the retriever's name, then one per reranker."""
    data_set = read_beir(config.data)
    init_process_group()  # under a launcher: the ranks share the model work below
    load_args = dict(device=config.device, precision=config.load_precision)
    embedder = load(config.retriever, "embedding", **load_args)
    run = retrieve(embedder, data_set, top_k=config.top_k, batch_size=config.retriever_batch_size, progress=True,
                   sharded=True)
    del embedder
    results = {config.retriever: retrieval_metrics(run, data_set.qrels)}
    legend = {config.retriever: f"retriever ({short_name(config.retriever)})"}
    for name in [config.model] + ([config.compare] if config.compare else []):
        reranker = load(name, "reranker", **load_args)
        reranked = rerank_run(reranker, data_set, run, top_k=config.top_k, batch_size=config.batch_size, progress=True,
                              sharded=True)
        key = f"{short_name(config.retriever)} + {short_name(name)}"
        results[key] = mark_untrained(retrieval_metrics(reranked, data_set.qrels), reranker)
        legend[key] = two_stage_legend(config.retriever, name)
    if config.output and is_main():
        write_retrieval_outputs(results, str(config.data), config.output, baseline=config.retriever, title="Reranking",
                                legend=legend)
    return results


def show_evaluation(config: RerankEvalConfig, results: dict) -> str:
    text = retrieval_report(results, config.data, baseline=config.retriever, title="Reranking")
    if config.output:
        text += f"\nwrote {config.output}/metrics.json, report.md, retrieval.png"
    return text


def calibrate(config: CalibrateConfig, load) -> dict:
    """Find the reranker score threshold for "a good answer" on labelled (query, document, 0/1)
    pairs and store it in the model folder's qtune.json, where the server reads it."""
    from dataclasses import replace

    folder = Path(config.model)
    if not folder.is_dir():
        raise QtuneError(f"{config.model}: the threshold is stored in the model folder; give a local folder "
                         "(a hub model can be saved with save_pretrained first)")
    # (query, document, label) files, the usual shape of relevance judgements, need no flags either
    alternatives = [QUERY_DOCUMENT] if tuple(config.text_columns) == PAIR_COLUMNS else []
    pairs = read_pairs(config.data, text_columns=config.text_columns, label_column=config.label_column,
                       labels=["0", "1"], alternative_columns=alternatives, labels_flag=None)
    init_process_group()  # under a launcher: the ranks share the scoring
    reranker = load(config.model, "reranker", device=config.device, precision=config.load_precision)
    scores = sharded_call(reranker, "score", [(p.sentence1, p.sentence2) for p in pairs],
                          batch_size=config.batch_size, progress=True)
    try:
        found = calibrate_threshold([p.label for p in pairs], scores, min_precision=config.min_precision)
    except ValueError as e:
        raise QtuneError(f"{config.data}: {e}") from None
    found["warning"] = threshold_warning(found)
    if not is_main():
        return found
    meta = reranker.loaded.meta
    settings = replace(meta.settings, threshold=found["threshold"], threshold_warning=found["warning"])
    replace(meta, settings=settings, adapter=reranker.loaded.is_adapter).save(folder)
    if config.output:
        write_json(Path(config.output) / "metrics.json", {"model": config.model, "data": str(config.data), **found})
    return found


def show_calibration(config: CalibrateConfig, found: dict) -> str:
    return (f"threshold {found['threshold']:.6f}: precision {found['precision']:.4f}, recall {found['recall']:.4f}, "
            f"F1 {found['f1']:.4f} on {found['pairs']} pairs ({found['relevant']} relevant)\n"
            f"stored in {config.model}/qtune.json"
            + (f"\nwarning: {found['warning']}" if found.get("warning") else ""))
