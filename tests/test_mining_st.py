"""`qtune mine` against sentence-transformers' own `mine_hard_negatives`: the same negative sets,
query by query, for the same vectors (every rule, "top" sampling) and end to end with the real
all-MiniLM-L6-v2 through the CLI.

sentence-transformers adds every positive to the corpus and de-duplicates it, so the corpora here
already hold every positive once; its "random" sampling draws from the global `random` state, so
only "top" can be compared set for set.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support import read_jsonl, run, write_lines
from datasets import Dataset
from sentence_transformers.util import cos_sim, pairwise_cos_sim
from sentence_transformers.util import mine_hard_negatives as st_mine

from qtune.mining import MiningSettings, mine_hard_negatives


class _VectorModel:
    """Just what `mine_hard_negatives` asks of a SentenceTransformer, over fixed vectors."""

    device = torch.device("cpu")

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors

    def _encode(self, texts, **_):
        return np.stack([self.vectors[t] for t in texts])

    encode_document = encode_query = _encode

    def similarity(self, a, b):
        return cos_sim(a, b)

    def similarity_pairwise(self, a, b):
        return pairwise_cos_sim(a, b)


def _st_negatives(queries: list[str], positives: list[list[str]], corpus: list[str], model, settings,
                  **extra) -> dict[str, list[str]]:
    """query -> negatives (best first) from sentence-transformers, with qtune's settings (and, with
    output_scores=True in `extra`, query -> their scores under "scores")."""
    rows = [(q, p) for q, ps in zip(queries, positives) for p in ps]
    dataset = Dataset.from_dict({"query": [q for q, _ in rows], "answer": [p for _, p in rows]})
    mined = st_mine(dataset, model, corpus=corpus, range_min=settings.range_min, range_max=settings.range_max,
                    max_score=settings.max_score, min_score=settings.min_score,
                    absolute_margin=settings.margin, relative_margin=settings.relative_margin,
                    num_negatives=settings.num_negatives, sampling_strategy="top",
                    output_format="labeled-list", verbose=False, **extra)
    out: dict = {}
    for row in mined:  # one row per (query, positive), the positive first, then the query's negatives
        negatives = row["answer"][1:]
        assert out.setdefault(row["query"], negatives) == negatives
        if "scores" in row:
            out.setdefault("scores", {})[row["query"]] = row["scores"][1:]
    return out


def _unit(rows: int, dim: int, rng) -> np.ndarray:
    x = rng.standard_normal((rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("settings", [
    MiningSettings(range_min=20, range_max=50, max_score=0.8, margin=0.1, num_negatives=5),
    MiningSettings(range_min=3, range_max=30, max_score=0.7, min_score=0.05, margin=None,
                   relative_margin=0.05, num_negatives=4),
    MiningSettings(range_min=0, range_max=12, max_score=None, margin=0.0, num_negatives=3),
    MiningSettings(range_min=10, range_max=40, max_score=None, margin=None, num_negatives=7),
], ids=["brief", "relative+min", "margin0", "no-rules"])
def test_the_same_negative_sets_as_sentence_transformers_for_the_same_vectors(settings):
    rng = np.random.default_rng(0)
    n_queries, n_docs, dim = 40, 400, 8
    # Queries near their positives, so positive scores are high and the margins matter.
    docs = _unit(n_docs, dim, rng)
    positive_ids = [sorted({int(i)} | ({int((i * 7) % n_docs)} if i % 4 == 0 else set()))
                    for i in rng.choice(n_docs, n_queries, replace=False)]
    query_vecs = np.stack([docs[ids[0]] + 0.6 * _unit(1, dim, rng)[0] for ids in positive_ids])
    query_vecs = (query_vecs / np.linalg.norm(query_vecs, axis=1, keepdims=True)).astype(np.float32)
    corpus = [f"doc {i}" for i in range(n_docs)]
    queries = [f"query {i}" for i in range(n_queries)]
    model = _VectorModel({**dict(zip(corpus, docs)), **dict(zip(queries, query_vecs))})

    want = _st_negatives(queries, [[corpus[j] for j in ids] for ids in positive_ids], corpus, model, settings)
    got = mine_hard_negatives(query_vecs, docs, [set(ids) for ids in positive_ids], None, settings)
    ours = {q: [corpus[j] for j in neg] for q, neg in zip(queries, got.negatives) if neg}
    assert ours == want
    assert sum(map(len, want.values())) >= n_queries  # most queries got negatives: not a vacuous match
    assert got.shortfall == sum(len(want.get(q, [])) < settings.num_negatives for q in queries)


# ---------------------------------------------------------------- end to end with all-MiniLM-L6-v2

TOPICS = ["interest rates", "mortgage payments", "stock dividends", "credit card fees", "pension funds",
          "inflation", "bond yields", "tax refunds", "savings accounts", "currency exchange",
          "insurance premiums", "loan defaults"]
FRAMES = ["{} rose sharply this quarter", "how banks calculate {}", "a beginner's guide to {}",
          "why {} matter for retirees", "{} fell after the central bank meeting", "comparing {} across countries",
          "the history of {} since 1990", "common mistakes with {}", "{} and small businesses",
          "what analysts expect for {} next year"]


@pytest.fixture(scope="module")
def minilm():
    from qtune.demo import minilm_path

    return str(minilm_path())


def test_qtune_mine_with_minilm_matches_sentence_transformers(minilm, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    corpus = [frame.format(topic) for topic in TOPICS for frame in FRAMES]  # 120 passages
    groups = [(f"what do I need to know about {t}?", [FRAMES[2].format(t)] + ([FRAMES[1].format(t)] if i % 3 == 0
                                                                                else []))
              for i, t in enumerate(TOPICS)]
    groups += [(f"news on {t} today", [FRAMES[0].format(t)]) for t in TOPICS]
    write_lines(tmp_path / "queries.jsonl", *(json.dumps({"query": q, "pos": p}) for q, p in groups))
    write_lines(tmp_path / "corpus.txt", *corpus)
    settings = MiningSettings(range_min=5, range_max=30, max_score=0.8, margin=0.02, relative_margin=0.05,
                              num_negatives=5)

    code, _, err = run(capsys, "mine", "--model", minilm, "--queries", tmp_path / "queries.jsonl",
                         "--corpus", tmp_path / "corpus.txt", "--output", tmp_path / "mined.jsonl",
                         "--range-min", 5, "--range-max", 30, "--max-score", 0.8, "--margin", 0.02,
                         "--relative-margin", 0.05, "--num-negatives", 5, "--device", "cpu", "--no-vector-cache")
    assert code == 0, err
    ours = {r["query"]: r["neg"] for r in read_jsonl(tmp_path / "mined.jsonl") if r["neg"]}

    records = read_jsonl(tmp_path / "mined.jsonl")
    want = _st_negatives([q for q, _ in groups], [p for _, p in groups], corpus,
                         SentenceTransformer(minilm, device="cpu"), settings, output_scores=True)
    want_scores = want.pop("scores")
    assert ours == want
    assert sum(map(len, ours.values())) >= 3 * len(groups)
    for record in records:  # the written scores are the ones the rules saw
        if record["neg"]:
            assert record["neg_scores"] == pytest.approx(want_scores[record["query"]], abs=1e-5)
