"""`qtune eval retrieval`: nDCG/Recall/MRR/MAP of one embedder (or two side by side) on a BEIR folder,
optionally followed by a reranker (two stages), at each Matryoshka dimension, and query by query
against --compare. `qtune eval sts`: how the pair cosines correlate with gold scores.

Under `torchrun` / `accelerate launch` the ranks share the embedding and reranking (the same
numbers as one process, see `qtune.evaluation.sharded`) and rank 0 alone writes the report folder."""

from __future__ import annotations

from pathlib import Path

from qtune.data.retrieval import read_beir, read_query_groups
from qtune.distributed import init_process_group
from qtune.errors import QtuneError
from qtune.evaluation.query_report import per_query_markdown, query_rows
from qtune.evaluation.report import mark_untrained, short_name
from qtune.evaluation.retrieval import (MATRYOSHKA, embed_set, matryoshka_report, rerank_run, retrieval_report,
                                        search_run, triplet_margin, two_stage_legend, write_retrieval_outputs)
from qtune.evaluation.retrieval_metrics import retrieval_metrics
from qtune.evaluation.sharded import is_main, on_main
from qtune.io import write_jsonl
from qtune.tasks.embedding.config import RetrievalEvalConfig, StsEvalConfig


def two_stage_name(retriever: str, reranker: str) -> str:
    return f"{short_name(retriever)} + {short_name(reranker)}"


def evaluate(config: RetrievalEvalConfig, load) -> dict:
    """With `reranker`, each embedder's top `rerank_top_k` are also reranked and scored (two stages).
    `load(name, task, device=, precision=)` gives a loaded model (`qtune.load`)."""
    data_set = read_beir(config.data)
    groups = read_query_groups(config.triplets) if config.triplets else None
    init_process_group()  # under a launcher: the ranks share the model work below
    load_args = dict(device=config.device, precision=config.load_precision)
    scorer = load(config.reranker, "reranker", **load_args) if config.reranker else None
    top_k = config.top_k
    dims = evaluated_dims(config)
    results, runs = {}, {}
    for name in [config.model] + ([config.compare] if config.compare else []):
        embedder = load(name, "embedding", **load_args)
        if dims and getattr(embedder, "dimension", None):
            refuse_wider(dims, embedder.dimension)  # before embedding the corpus
        vectors = embed_set(embedder, data_set, batch_size=config.batch_size, progress=True, sharded=True)
        run = on_main(search_run, vectors, max(top_k, config.rerank_top_k if scorer else 0))  # rank 0's, everywhere
        runs[name] = {q: docs[:top_k] for q, docs in run.items()}
        results[name] = retrieval_metrics(runs[name], data_set.qrels)
        if dims:
            results[name][MATRYOSHKA] = matryoshka_metrics(vectors, dims, data_set.qrels, top_k, dict(results[name]))
        if groups is not None:
            results[name]["triplet_margin"] = triplet_margin(embedder, groups, batch_size=config.batch_size,
                                                             sharded=True)
        if scorer is not None:
            reranked = rerank_run(scorer, data_set, run, top_k=config.rerank_top_k,
                                  batch_size=config.rerank_batch_size, progress=True, sharded=True)
            results[two_stage_name(name, config.reranker)] = mark_untrained(retrieval_metrics(
                {q: docs[:top_k] for q, docs in reranked.items()}, data_set.qrels), scorer)
    if config.output and is_main():
        sections = []
        if config.compare:
            rows = query_rows(runs[config.compare], runs[config.model], data_set.qrels, data_set.queries,
                              data_set.corpus, depth=top_k)
            sections.append(per_query_markdown(rows, config.compare, config.model, depth=top_k,
                                               top=config.per_query_top))
            write_jsonl(Path(config.output) / "per_query.jsonl", rows)
        legend = ({two_stage_name(n, config.reranker): two_stage_legend(n, config.reranker) for n in runs}
                  if config.reranker else None)
        write_retrieval_outputs(results, str(config.data), config.output, baseline=_baseline(config),
                                sections=sections, legend=legend)
    return results


def evaluated_dims(config: RetrievalEvalConfig) -> list[int]:
    """--dims, else the --matryoshka-dims the model's run was trained with (its config.yaml); [] for neither."""
    from qtune.modeling.export import run_setting

    dims = config.dims if config.dims is not None else run_setting(config.model, "matryoshka_dims")
    if dims is not None and (not isinstance(dims, list) or not all(isinstance(d, int) and d > 0 for d in dims)):
        raise QtuneError(f"Matryoshka dimensions must be positive integers, got {dims!r}")
    return sorted(set(dims or ()), reverse=True)


def refuse_wider(dims: list[int], width: int) -> None:
    too_wide = [d for d in dims if d > width]
    if too_wide:
        raise QtuneError(f"--dims {' '.join(map(str, too_wide))}: the model has {width} dimensions")


def matryoshka_metrics(vectors, dims: list[int], qrels, top_k: int, full_metrics: dict) -> dict[str, dict]:
    """{dimension: metrics} for the full vectors (`full_metrics`) and each of `dims` leading
    dimensions (cut, then normalised again, as `Embedder.embed(dimensions=)` does)."""
    from qtune.tasks.embedding.model import truncate_normalize

    full = vectors.queries.shape[1]
    refuse_wider(dims, full)
    out = {str(full): full_metrics}
    for d in dims:
        if d != full:
            cut = vectors._replace(queries=truncate_normalize(vectors.queries, d),
                                   corpus=truncate_normalize(vectors.corpus, d))
            out[str(d)] = retrieval_metrics(search_run(cut, top_k), qrels)
    return out


def _baseline(config: RetrievalEvalConfig) -> str | None:
    return config.model if config.reranker and not config.compare else None


def show_evaluation(config: RetrievalEvalConfig, results: dict) -> str:
    text = retrieval_report(results, config.data, baseline=_baseline(config))
    extra = ""
    if any(MATRYOSHKA in m for m in results.values()):
        text += "\n" + matryoshka_report(results)
        extra += ", matryoshka.png"
    if config.output:
        extra += ", per_query.jsonl" if config.compare else ""
        text += f"\nwrote {config.output}/metrics.json, report.md, retrieval.png{extra}"
    return text


def evaluate_sts(config: StsEvalConfig, load) -> dict:
    """Cosine of each pair's embeddings against the gold scores, for --model (and --compare)."""
    from qtune.evaluation.sts import read_scored_pairs, score_pairs, sts_metrics, write_sts_outputs

    pairs = read_scored_pairs(config.data, text_columns=config.text_columns, score_column=config.score_column)
    init_process_group()  # under a launcher: the ranks share the embedding
    results = {}
    for name in [config.model] + ([config.compare] if config.compare else []):
        embedder = load(name, "embedding", device=config.device, precision=config.load_precision)
        try:
            results[name] = sts_metrics(score_pairs(embedder, pairs, batch_size=config.batch_size, progress=True,
                                                    sharded=True), pairs.gold)
        except ValueError as e:
            raise QtuneError(f"{config.data} ({short_name(name)}): {e}") from None
    if config.output and is_main():
        write_sts_outputs(results, str(config.data), config.output)
    return results


def show_sts(config: StsEvalConfig, results: dict) -> str:
    from qtune.evaluation.sts import sts_report

    text = sts_report(results, config.data)
    if config.output:
        text += f"\nwrote {config.output}/metrics.json, report.md"
    return text
