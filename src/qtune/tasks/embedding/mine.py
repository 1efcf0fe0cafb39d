"""`qtune mine`: hard negatives for each query group, ranked by an embedder over a corpus."""

from __future__ import annotations

import dataclasses

import numpy as np

from qtune.data.retrieval import read_corpus, read_query_groups, write_query_groups
from qtune.data.tables import table_format
from qtune.errors import QtuneError
from qtune.mining import MiningSettings, mine_hard_negatives, summarize


def check_output(output: str) -> None:
    if table_format(output) != "jsonl":
        raise QtuneError(f"{output}: mined data is written as JSONL (.jsonl)")


def mine_file(load_embedder, queries: str, corpus: str, output: str, settings: MiningSettings, *,
              fmt: str = "flagembedding", batch_size: int = 64) -> str:
    """Add hard negatives from `corpus` to each query group of `queries`; write them to `output`.
    `load_embedder()` is called once the data was read (bad data never loads a model). Returns a
    one-line summary (how many queries got fewer negatives than asked)."""
    check_output(output)
    groups = read_query_groups(queries)
    passages = read_corpus(corpus)
    texts = list(passages.values())
    ids_by_text: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        ids_by_text.setdefault(text, []).append(i)

    embedder = load_embedder()
    corpus_vecs = embedder.embed(texts, batch_size=batch_size, progress=True)
    query_vecs = embedder.embed([g.query for g in groups], is_query=True, batch_size=batch_size, progress=True)
    # Each group's lowest positive score (positives need not be in the corpus).
    flat = [p for g in groups for p in g.positives]
    pos_vecs = embedder.embed(flat, batch_size=batch_size, progress=True)
    starts = np.cumsum([0] + [len(g.positives) for g in groups])
    positive_scores = np.array([(pos_vecs[a:b] @ query_vecs[i]).min() for i, (a, b)
                                in enumerate(zip(starts[:-1], starts[1:]))], dtype=np.float32)
    positive_ids = [{j for p in g.positives for j in ids_by_text.get(p, ())} for g in groups]
    result = mine_hard_negatives(query_vecs, corpus_vecs, positive_ids, positive_scores, settings)
    # Mined negatives replace any the input had; a passage equal to a positive never becomes one.
    mined = [dataclasses.replace(g, negatives=tuple(texts[j] for j in chosen if texts[j] not in g.positives))
             for g, chosen in zip(groups, result.negatives)]
    write_query_groups(output, mined, fmt=fmt)
    return summarize(result, settings)
