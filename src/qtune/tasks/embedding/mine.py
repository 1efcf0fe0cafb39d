"""`qtune mine`: hard negatives for each query group, ranked by an embedder over a corpus, optionally
rescored by a reranker, with the scores written for distillation.

The selection is `qtune.mining` (sentence-transformers' meaning of the ranges and rules). Corpus
vectors are cached on disk (`corpus_vectors`), so mining the same corpus again with the same model
does not embed it again.

Under `torchrun` / `accelerate launch` the ranks share the encoding of the corpus and the queries
and the rescoring (`qtune.evaluation.sharded`: the same batches as one process, so the same
numbers); rank 0 alone searches, applies the rules, reads and writes the vector cache and writes
the output, so the files are those one process writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from qtune.data.retrieval import read_corpus, read_query_groups, write_query_groups
from qtune.data.tables import table_format
from qtune.distributed import broadcast_object, init_process_group
from qtune.errors import QtuneError
from qtune.evaluation.sharded import is_main, sharded_call
from qtune.io import atomic_path
from qtune.mining import MiningSettings, rule_report, search_candidates, select_negatives, summarize
from qtune.modeling.loading import read_meta
from qtune.vector_search import scores_of

VECTOR_CACHE_DIR = ".qtune-vectors"  # default cache folder, beside the output file


def check_output(output: str) -> None:
    if table_format(output) != "jsonl":
        raise QtuneError(f"{output}: mined data is written as JSONL (.jsonl)")


def default_cache_dir(output: str | Path) -> Path:
    return Path(output).resolve().parent / VECTOR_CACHE_DIR


def mine_file(load_embedder, queries: str, corpus: str, output: str, settings: MiningSettings, *,
              fmt: str = "flagembedding", batch_size: int = 64, model_name: str | None = None,
              load_rescorer: Callable | None = None, cache_dir: str | Path | None = "auto") -> str:
    """Add hard negatives from `corpus` to each query group of `queries`; write them to `output`.

    `load_embedder()` is called once the data was read (bad data never loads a model);
    `load_rescorer()`, if given, once the embedder's search is done: it returns an object with
    `score(pairs, batch_size=, progress=)` (a qtune Reranker) whose scores replace the embedder's for
    every candidate of the search window and every positive, so the rules, the ranking and the
    written `pos_scores`/`neg_scores` are the stronger model's. Corpus vectors are cached in
    `cache_dir` ("auto": `.qtune-vectors/` beside `output`; None: no cache), keyed by `model_name`'s
    files. Returns two lines: the summary and what each rule removed, with the mean scores.

    Under a launcher every rank calls this (the model work is shared); rank 0 writes, and every
    rank returns rank 0's summary.
    """
    check_output(output)
    groups = read_query_groups(queries)
    # Duplicate passages would compete for the same slot; sentence-transformers keeps the first too.
    texts = list(dict.fromkeys(read_corpus(corpus).values()))
    index_of = {text: i for i, text in enumerate(texts)}

    init_process_group()  # under a launcher: the ranks share the encoding and scoring below
    main = is_main()
    embedder = load_embedder()
    if cache_dir == "auto":
        cache_dir = default_cache_dir(output)
    # Ranks > 0 get None when rank 0 read the vectors from the cache: only rank 0 searches.
    corpus_vecs = corpus_vectors(embedder, texts, batch_size=batch_size, cache_dir=cache_dir,
                                 model_key=model_identity(model_name) if model_name else None)
    query_vecs = sharded_call(embedder, "embed", [g.query for g in groups], is_query=True, batch_size=batch_size,
                              progress=True)
    positive_ids = [{index_of[p] for p in g.positives if p in index_of} for g in groups]
    scores, indices = search_candidates(query_vecs, corpus_vecs, positive_ids, settings) if main else (None, None)
    if load_rescorer is None:
        pos_scores = _embedder_positive_scores(embedder, groups, index_of, query_vecs, corpus_vecs, batch_size)
    else:
        indices = broadcast_object(indices)  # (n, k): every rank scores its share of the window
        scores, pos_scores = _rescore(load_rescorer(), groups, texts, indices, batch_size)
    summary = (_select_and_write(groups, texts, scores, indices, positive_ids, pos_scores, settings, output, fmt)
               if main else None)
    return broadcast_object(summary)


def _select_and_write(groups, texts: Sequence[str], scores: np.ndarray, indices: np.ndarray,
                      positive_ids: list[set[int]], pos_scores: list[list[float]], settings: MiningSettings,
                      output: str, fmt: str) -> str:
    """The rules over the search window, the output file, and the two summary lines (rank 0)."""
    lowest = np.array([min(s) for s in pos_scores], dtype=np.float32)  # (n,) the margins' positive score
    result = select_negatives(scores, indices, positive_ids, lowest, settings)

    mined = [dataclasses.replace(g, negatives=tuple(texts[j] for j in chosen), pos_scores=tuple(pos),
                                 neg_scores=tuple(neg))
             for g, chosen, pos, neg in zip(groups, result.negatives, pos_scores, result.negative_scores)]
    write_query_groups(output, mined, fmt=fmt)
    every_positive = np.array([s for row in pos_scores for s in row], dtype=np.float32)
    return summarize(result, settings) + "\n" + rule_report(result, every_positive)


def _embedder_positive_scores(embedder, groups, index_of: dict[str, int], query_vecs: np.ndarray,
                              corpus_vecs: np.ndarray, batch_size: int) -> list[list[float]]:
    """Per group, each positive's score: from its corpus vector when it is in the corpus (the very
    score it has as a candidate), else from embedding it (positives need not be in the corpus).
    Under a launcher the ranks share the embedding; ranks > 0 return None."""
    outside = list(dict.fromkeys(p for g in groups for p in g.positives if p not in index_of))
    outside_vecs = sharded_call(embedder, "embed", outside, batch_size=batch_size, progress=True) if outside else None
    if not is_main():
        return None
    extra = {p: i for i, p in enumerate(outside)}
    out = []
    for i, g in enumerate(groups):
        row = []
        for p in g.positives:
            vecs, j = (corpus_vecs, index_of[p]) if p in index_of else (outside_vecs, extra[p])
            row.append(float(scores_of(query_vecs[i:i + 1], vecs, np.array([[j]]))[0, 0]))
        out.append(row)
    return out


def _rescore(rescorer, groups, texts: Sequence[str], indices: np.ndarray, batch_size: int,
             block: int = 1024) -> tuple[np.ndarray, list[list[float]]]:
    """The rescorer's scores of the search window (n, k) and of every positive, `block` queries'
    pairs at a time (the pairs' features are built per call). Under a launcher the ranks share
    each block's scoring (every rank gets every score)."""
    window = np.zeros(indices.shape, dtype=np.float32)
    pos_scores: list[list[float]] = []
    for start in range(0, len(groups), block):
        part, rows = groups[start:start + block], indices[start:start + block]
        pairs = [(g.query, texts[j]) for g, row in zip(part, rows.tolist()) for j in row]
        pairs += [(g.query, p) for g in part for p in g.positives]
        flat = np.asarray(sharded_call(rescorer, "score", pairs,
                                       batch_size=batch_size, progress=True), dtype=np.float32)
        window[start:start + len(part)] = flat[:rows.size].reshape(rows.shape)
        ends = np.cumsum([rows.size] + [len(g.positives) for g in part])
        pos_scores += [flat[a:b].tolist() for a, b in zip(ends[:-1], ends[1:])]
    return window, pos_scores


# --- the corpus-vector cache ---------------------------------------------------------------------

def model_identity(name_or_path: str) -> str:
    """What stands for a model's weights in a cache key: a folder's resolved path with each file's
    name, size and modification time (so retraining into the same folder invalidates), and for a
    LoRA checkpoint its base model's identity; a hub id as given."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return str(name_or_path)
    files = sorted(p for p in [*folder.glob("*"), *folder.glob("*/*")] if p.is_file())
    stats = [(p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    meta = read_meta(folder)
    base = model_identity(meta.base_model) if meta is not None and meta.adapter else None
    return json.dumps({"path": str(folder.resolve()), "files": stats, "base": base})


def vector_cache_key(model_key: str, embedder, texts: Sequence[str]) -> str:
    """sha256 over the model's identity, what decides a text's vector besides the weights (max
    length, pooling, precision) and the corpus content, in order."""
    loaded = embedder.loaded
    digest = hashlib.sha256(json.dumps({"model": model_key, "max_length": loaded.meta.max_length,
                                        "pooling": loaded.meta.settings.pooling, "precision": loaded.precision},
                                       sort_keys=True).encode("utf-8"))
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def corpus_vectors(embedder, texts: Sequence[str], *, batch_size: int, cache_dir: str | Path | None,
                   model_key: str | None) -> np.ndarray:
    """(len(texts), dim) float32 document vectors: read from `cache_dir` when a run with the same key
    wrote them, else embedded and written there atomically (no cache without a folder or a key).

    Under a launcher the ranks share the embedding and rank 0 alone reads and writes the cache:
    when it read the vectors there, the other ranks get None (they do not search)."""
    if cache_dir is None or model_key is None:
        return sharded_call(embedder, "embed", texts, batch_size=batch_size, progress=True)
    path = Path(cache_dir) / f"corpus-{vector_cache_key(model_key, embedder, texts)}.npy"
    main = is_main()
    cached = _read_cached(path, (len(texts), embedder.dimension)) if main else None
    if broadcast_object(cached is not None):  # every rank takes the same way (rank 0's)
        return cached
    vecs = sharded_call(embedder, "embed", texts, batch_size=batch_size, progress=True)
    if main:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, vecs)  # to an open file: np.save would add ".npy" to the temporary name
    return vecs


def _read_cached(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached vectors at `path` if they are there, readable and of this shape, else None."""
    if not path.is_file():
        return None
    try:
        vecs = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None  # unreadable: embed again and replace it
    return vecs if vecs.shape == shape and vecs.dtype == np.float32 else None


def mine_with(load, model: str, queries: str, corpus: str, output: str, rules: MiningSettings, *,
              fmt: str = "flagembedding", batch_size: int = 64, device: str = "auto", precision: str = "auto",
              rescore_with: str | None = None, cache_dir: str | Path | None = "auto") -> str:
    """`mine_file` with the embedder `model` (and the reranker `rescore_with`) loaded by `load(name,
    task, device=, precision=)` (`qtune.load`) when it needs them: `qtune mine` and `qtune.api.mine`."""
    rescorer = (lambda: load(rescore_with, "reranker", device=device, precision=precision)) if rescore_with else None
    return mine_file(lambda: load(model, "embedding", device=device, precision=precision), queries, corpus, output,
                     rules, fmt=fmt, batch_size=batch_size, model_name=model, load_rescorer=rescorer,
                     cache_dir=cache_dir)


def run_mine(config, load) -> dict:
    """`qtune mine` (a `qtune.tasks.embedding.config.MineConfig`): the rules checked before anything
    is read or loaded, then `mine_with`."""
    try:
        rules = config.rules()
    except ValueError as e:
        raise QtuneError(str(e)) from None
    summary = mine_with(load, config.model, config.queries, config.corpus, config.output, rules, fmt=config.format,
                        batch_size=config.batch_size, device=config.device, precision=config.load_precision,
                        rescore_with=config.rescore_with,
                        cache_dir=None if config.no_vector_cache else config.vector_cache)
    return {"summary": summary}


def show_mine(config, results: dict) -> str:
    return f"{results['summary']}\nwrote {config.output}"
