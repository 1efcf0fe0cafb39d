"""Retrieval evaluation: exact search over a BEIR set, metrics, and base-vs-tuned reports.

`sharded=True` (the `qtune eval` commands under `torchrun` / `accelerate launch`): the model work
is shared over the launched ranks (`qtune.evaluation.sharded`), every rank must call, and every
rank gets the whole result, as one process computes it. Training evaluates on rank 0 alone and
leaves it False.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from qtune.evaluation.report import UNTRAINED_HEAD, column_name, markdown_table, short_name, untrained_notes
from qtune.io import write_json, write_text
from qtune.records import QueryGroup, RetrievalSet

REPORT_METRICS = ("ndcg@1", "ndcg@3", "ndcg@5", "ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10",
                  "map@100")


def evaluate_retrieval(embedder, data: RetrievalSet, *, top_k: int = 100, batch_size: int = 64,
                       progress: bool = False) -> dict:
    """Embed corpus and queries, search exactly (inner product of unit vectors), score the ranking."""
    from qtune.evaluation.retrieval_metrics import retrieval_metrics

    return retrieval_metrics(retrieve(embedder, data, top_k=top_k, batch_size=batch_size, progress=progress),
                             data.qrels)


def retrieve(embedder, data: RetrievalSet, *, top_k: int = 100, batch_size: int = 64,
             progress: bool = False, sharded: bool = False) -> dict[str, list[str]]:
    """query id -> the `top_k` document ids by exact inner-product search, best first (sharded:
    rank 0's search, on every rank)."""
    vectors = embed_set(embedder, data, batch_size=batch_size, progress=progress, sharded=sharded)
    if not sharded:
        return search_run(vectors, top_k)
    from qtune.evaluation.sharded import on_main

    return on_main(search_run, vectors, top_k)


class EmbeddedSet(NamedTuple):
    """A retrieval set's queries and passages as unit vectors, rows in the order of the ids."""

    query_ids: list[str]
    queries: np.ndarray  # (queries, dim)
    doc_ids: list[str]
    corpus: np.ndarray  # (docs, dim)


def embed_set(embedder, data: RetrievalSet, *, batch_size: int = 64, progress: bool = False,
              sharded: bool = False) -> EmbeddedSet:
    """Embed every passage and query once (a Matryoshka evaluation then cuts the same vectors)."""
    embed = _embed_call(embedder, sharded)
    doc_ids = list(data.corpus)
    query_ids = list(data.queries)
    corpus = embed([data.corpus[d] for d in doc_ids], batch_size=batch_size, progress=progress)
    queries = embed([data.queries[q] for q in query_ids], is_query=True, batch_size=batch_size, progress=progress)
    return EmbeddedSet(query_ids, queries, doc_ids, corpus)


def _embed_call(embedder, sharded: bool):
    """`embedder.embed`, or (sharded) the same call shared over the launched ranks."""
    if not sharded:
        return embedder.embed
    from qtune.evaluation.sharded import sharded_call

    return lambda texts, **kwargs: sharded_call(embedder, "embed", texts, **kwargs)


def search_run(vectors: EmbeddedSet, top_k: int) -> dict[str, list[str]]:
    """query id -> the `top_k` document ids by exact inner-product search, best first."""
    from qtune.vector_search import exact_search

    _, ranked = exact_search(vectors.queries, vectors.corpus, min(top_k, len(vectors.doc_ids)))  # (queries, k)
    return {qid: [vectors.doc_ids[j] for j in row] for qid, row in zip(vectors.query_ids, ranked)}


def rerank_run(reranker, data: RetrievalSet, run: dict[str, list[str]], *, top_k: int = 100,
               batch_size: int = 32, progress: bool = False, sharded: bool = False) -> dict[str, list[str]]:
    """Reorder each query's first `top_k` documents by the reranker's score (ties keep the
    retriever's order); documents below `top_k` keep their place after them. Sharded: `run` must
    be the same on every rank (e.g. `retrieve(..., sharded=True)`'s)."""
    pairs, spans = [], {}
    for qid, docs in run.items():
        head = docs[:top_k]
        spans[qid] = (len(pairs), len(head))
        pairs += [(data.queries[qid], data.corpus[d]) for d in head]
    if sharded:
        from qtune.evaluation.sharded import sharded_call

        scores = sharded_call(reranker, "score", pairs, batch_size=batch_size, progress=progress)
    else:
        scores = reranker.score(pairs, batch_size=batch_size, progress=progress)
    reranked = {}
    for qid, docs in run.items():
        start, n = spans[qid]
        order = np.argsort(-scores[start:start + n], kind="stable")
        reranked[qid] = [docs[i] for i in order] + docs[n:]
    return reranked


def triplet_margin(embedder, groups: Sequence[QueryGroup], batch_size: int = 64,
                   sharded: bool = False) -> float | None:
    """Mean sim(q, positive) - sim(q, negative) over every (query, first positive, negative) triplet."""
    from qtune.evaluation.retrieval_metrics import mean_margin

    triplets = [(g.query, g.positives[0], n) for g in groups for n in g.negatives]
    if not triplets:
        return None
    embed = _embed_call(embedder, sharded)
    q = embed([t[0] for t in triplets], is_query=True, batch_size=batch_size)
    p = embed([t[1] for t in triplets], batch_size=batch_size)
    n = embed([t[2] for t in triplets], batch_size=batch_size)
    return float(mean_margin((q * p).sum(axis=1), (q * n).sum(axis=1)))


def retrieval_report(results: dict[str, dict], data: str, *, baseline: str | None = None,
                     title: str = "Retrieval") -> str:
    """Models side by side. With `baseline`, every other column gets a change column against it;
    without, two models (--model, --compare) get one: the first minus the second."""
    names = list(results)
    keys = [k for k in (*REPORT_METRICS, "triplet_margin") if any(k in results[n] for n in names)]
    if baseline is None and len(names) == 2:
        baseline = names[1]
    compared = [n for n in names if baseline is not None and n != baseline]
    header = (["metric", *(column_name(n, results[n]) for n in names)]
              + [f"change ({short_name(n)})" if len(compared) > 1 else "change" for n in compared])
    rows = []
    for k in keys:
        row = [k] + [results[n].get(k, "") for n in names]
        for n in compared:
            a, b = results[n].get(k), results[baseline].get(k)
            row.append(f"{a - b:+.4f}" if isinstance(a, float) and isinstance(b, float) else "")
        rows.append(row)
    notes = untrained_notes(results)
    return "\n".join([f"# {title}: {data}", "", markdown_table(header, rows), "", *notes, *([""] if notes else [])])


def two_stage_legend(retriever: str, reranker: str) -> str:
    """How a plot names the two stages: `retriever (run/best) + reranker (fin-rr/best)`. (The
    results key, "run/best + fin-rr/best", reads as one path once a legend shortens it.)"""
    return f"retriever ({short_name(retriever)}) + reranker ({short_name(reranker)})"


def retrieval_figure(results: dict[str, dict], legend: dict[str, str] | None = None):
    """Grouped bars of the main metrics, a group per metric and a bar per model; `legend` names a
    result in the legend (default: its short name)."""
    from qtune.plotting import pyplot

    plt = pyplot()
    legend = legend or {}
    keys = ["ndcg@10", "recall@10", "recall@100", "mrr@10", "map@100"]
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, metrics) in enumerate(results.items()):
        values = [metrics.get(k, 0.0) for k in keys]
        label = legend.get(name, short_name(name)) + (" (untrained head)" if metrics.get(UNTRAINED_HEAD) else "")
        bars = ax.bar(np.arange(len(keys)) + i * width, values, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(np.arange(len(keys)) + width * (len(results) - 1) / 2, keys)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("retrieval quality", fontsize=10)
    fig.tight_layout()
    return fig


def plot_retrieval(results: dict[str, dict], path: Path, legend: dict[str, str] | None = None) -> None:
    from qtune.plotting import save_png

    save_png(retrieval_figure(results, legend), path)


def write_retrieval_outputs(results: dict[str, dict], data: str, output: str | Path, *,
                            baseline: str | None = None, title: str = "Retrieval",
                            sections: Sequence[str] = (), legend: dict[str, str] | None = None) -> None:
    """metrics.json, report.md (the table, then `sections`) and retrieval.png (`legend`: see
    `retrieval_figure`); with Matryoshka results also matryoshka.png."""
    output = Path(output)
    write_json(output / "metrics.json", results)
    report = retrieval_report(results, data, baseline=baseline, title=title)
    if any(MATRYOSHKA in m for m in results.values()):
        report += "\n" + matryoshka_report(results)
        plot_matryoshka(results, output / "matryoshka.png")
    write_text(output / "report.md", "\n".join([report, *sections]))
    plot_retrieval(results, output / "retrieval.png", legend)


# -- Matryoshka: the same metrics at each leading dimension

MATRYOSHKA = "matryoshka"  # results[model][MATRYOSHKA] = {dimension (text): metrics}
MATRYOSHKA_METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10")


def matryoshka_report(results: dict[str, dict]) -> str:
    """One table: a row per dimension (largest first), a column per model and metric."""
    names = [n for n in results if MATRYOSHKA in results[n]]
    dims = sorted({int(d) for n in names for d in results[n][MATRYOSHKA]}, reverse=True)
    header = ["dimension"] + [f"{k} ({short_name(n)})" if len(names) > 1 else k
                              for k in MATRYOSHKA_METRICS for n in names]
    rows = [[d] + [results[n][MATRYOSHKA].get(str(d), {}).get(k, "") for k in MATRYOSHKA_METRICS for n in names]
            for d in dims]
    return "\n".join(["## Matryoshka: metrics at each leading dimension", "",
                      "Vectors cut to the first N dimensions, then normalised again.", "",
                      markdown_table(header, rows), ""])


# Each line of the Matryoshka plot gets its own marker and dash pattern, hollow markers of
# decreasing size: two lines with the same values stay visible on top of each other.
LINE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINE_STYLES = ("-", "--", ":", "-.")


def matryoshka_figure(results: dict[str, dict]):
    """Metric against dimension (log scale), one line per model and metric; the y axis spans the
    values (padded), not 0-1, so differences of a few points show."""
    from qtune.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    every_dim, every_value = set(), []
    line = 0
    for name, metrics in results.items():
        if MATRYOSHKA not in metrics:
            continue
        dims = sorted(int(d) for d in metrics[MATRYOSHKA])
        every_dim.update(dims)
        for key in ("ndcg@10", "recall@100"):
            values = [metrics[MATRYOSHKA][str(d)][key] for d in dims]
            every_value += values
            ax.plot(dims, values, marker=LINE_MARKERS[line % len(LINE_MARKERS)],
                    linestyle=LINE_STYLES[line % len(LINE_STYLES)], markersize=max(4, 9 - 1.5 * line),
                    markerfacecolor="none", linewidth=1.4, label=f"{short_name(name)} {key}")
            line += 1
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(every_dim), [str(d) for d in sorted(every_dim)])
    ax.minorticks_off()
    ax.set_xlabel("dimension")
    ax.set_ylim(*value_range(every_value))
    ax.legend(fontsize=8)
    ax.set_title("retrieval quality by Matryoshka dimension", fontsize=10)
    fig.tight_layout()
    return fig


def value_range(values: Sequence[float], pad: float = 0.15, min_span: float = 0.02) -> tuple[float, float]:
    """Y limits around metric values in [0, 1]: their range (at least `min_span`, so equal values
    do not collapse the axis) plus `pad` of it on each side, shifted to stay within 0 and 1."""
    lo, hi = (min(values), max(values)) if len(values) else (0.0, 1.0)
    middle, half = (lo + hi) / 2, max(hi - lo, min_span) * (0.5 + pad)
    lo, hi = middle - half, middle + half
    shift = max(0.0, -lo) - max(0.0, hi - 1.0)
    return max(0.0, lo + shift), min(1.0, hi + shift)


def plot_matryoshka(results: dict[str, dict], path: Path) -> None:
    from qtune.plotting import save_png

    save_png(matryoshka_figure(results), path)
