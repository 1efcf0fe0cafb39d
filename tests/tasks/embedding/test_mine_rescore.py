"""`qtune mine` around the selection: the scores it writes (and the readers keep), rescoring with
a reranker, and the corpus-vector cache. The tiny BERT is the embedder (and, as a base model, the
reranker); the selection itself is tested in tests/test_mining.py and tests/test_mining_st.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from support import (
    ANIMALS,
    VEHICLES,
    assert_located,
    data_error,
    read_jsonl,
    run,
    write_lines,
)

import qtune
from qtune.data.retrieval import read_query_groups, write_query_groups
from qtune.modeling.inference import InferenceModel
from qtune.mining import MiningSettings
from qtune.records import QueryGroup
from qtune.tasks.embedding import mine as mine_module
from qtune.tasks.embedding.mine import mine_file, model_identity, vector_cache_key
from qtune.tasks.embedding.model import Embedder

CORPUS = [f"the {a} is near the {v}" for a in ANIMALS for v in VEHICLES[:4]]  # 32 passages
SETTINGS = MiningSettings(range_min=1, range_max=10, max_score=None, margin=None, num_negatives=3)


@pytest.fixture
def mine_data(tmp_path) -> dict[str, Path]:
    groups = [{"query": f"my {a}", "pos": [f"the {a} is near the car"]} for a in ANIMALS]
    groups[0]["pos"].append("a passage outside the corpus")
    write_lines(tmp_path / "queries.jsonl", *(json.dumps(g) for g in groups))
    write_lines(tmp_path / "corpus.txt", *CORPUS)
    return {"queries": tmp_path / "queries.jsonl", "corpus": tmp_path / "corpus.txt"}


# ---------------------------------------------------------------- scores in the records and files

def test_scores_round_trip_through_the_flagembedding_files(tmp_path):
    groups = [QueryGroup("q1", ("p1", "p2"), ("n1",), pos_scores=(0.9, 0.8), neg_scores=(0.25,)),
              QueryGroup("q2", ("p3",), ())]
    write_query_groups(tmp_path / "g.jsonl", groups)
    lines = read_jsonl(tmp_path / "g.jsonl")
    assert lines == [{"query": "q1", "pos": ["p1", "p2"], "neg": ["n1"], "pos_scores": [0.9, 0.8],
                      "neg_scores": [0.25]},
                     {"query": "q2", "pos": ["p3"], "neg": []}]
    back = read_query_groups(tmp_path / "g.jsonl")
    assert [(g.pos_scores, g.neg_scores) for g in back] == [((0.9, 0.8), (0.25,)), (None, None)]
    write_query_groups(tmp_path / "s.jsonl", groups, fmt="swift")  # ms-swift has no score fields
    assert all(set(r) <= {"query", "response", "rejected_response"} for r in read_jsonl(tmp_path / "s.jsonl"))


@pytest.mark.parametrize("line, field, reason", [
    ({"query": "q", "pos": ["p"], "pos_scores": 0.5}, "pos_scores", "expected a list of numbers, got float"),
    ({"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": ["high"]}, "neg_scores", "score 1 is 'high'"),
    ({"query": "q", "pos": ["p"], "pos_scores": [True]}, "pos_scores", "score 1 is True"),
])
def test_bad_scores_name_file_line_and_field(tmp_path, line, field, reason):
    path = tmp_path / "g.jsonl"
    write_lines(path, json.dumps({"query": "fine", "pos": ["fine"]}), json.dumps(line))
    err = data_error(read_query_groups, path)
    assert_located(err, path, 2, field)
    assert reason in str(err)


# ---------------------------------------------------------------- written scores, rescoring

def test_written_scores_are_the_embedders_cosines(embedder, mine_data, tmp_path):
    output = tmp_path / "mined.jsonl"
    mine_file(lambda: embedder, str(mine_data["queries"]), str(mine_data["corpus"]), str(output), SETTINGS,
              cache_dir=None)
    for record in read_jsonl(output):
        q = embedder.embed([record["query"]], is_query=True)[0]
        assert len(record["neg"]) == 3
        np.testing.assert_allclose(record["neg_scores"], embedder.embed(record["neg"]) @ q, atol=1e-5)
        np.testing.assert_allclose(record["pos_scores"], embedder.embed(record["pos"]) @ q, atol=1e-5)
        assert record["neg_scores"] == sorted(record["neg_scores"], reverse=True)


class _TrapScorer(InferenceModel):
    """A stand-in reranker (the inference interface, no model): 0.9 for passages ending in "car"
    (every query's positive, so also other queries' positives: false negatives the margin must
    catch) and outside the corpus, 0.99 for other passages with "tiger" (traps for max_score), else
    a score that reverses the corpus order. Keeps the pairs it scored."""

    batch_calls = frozenset({"score"})

    def __init__(self):
        super().__init__(loaded=None)
        self.pairs: list[tuple[str, str]] = []

    def features(self, pairs, *, truncate=True):
        return [[0] * len(f"{q} {d}".split()) for q, d in pairs]  # its "tokens": the words

    def score(self, pairs, *, batch_size=32, progress=False):
        self.pairs += list(pairs)
        return np.array([0.9 if d.endswith("car") or d not in CORPUS else 0.99 if "tiger" in d
                         else 0.1 + 0.01 * CORPUS.index(d) for _, d in pairs], dtype=np.float32)


def test_rescoring_ranks_and_judges_the_window_by_the_rescorers_scores(embedder, mine_data, tmp_path):
    scorer = _TrapScorer()
    output = tmp_path / "mined.jsonl"
    settings = MiningSettings(range_min=0, range_max=12, max_score=0.95, margin=0.05, num_negatives=4)
    mine_file(lambda: embedder, str(mine_data["queries"]), str(mine_data["corpus"]), str(output), settings,
              load_rescorer=lambda: scorer, cache_dir=None)
    records = read_jsonl(output)
    # every candidate of the window (12 + 1 room for the 1 positive in the corpus) and every positive
    assert len(scorer.pairs) == len(records) * 13 + sum(len(r["pos"]) for r in records)
    for record in records:
        assert record["pos_scores"] == [pytest.approx(0.9)] * len(record["pos"])
        window = [d for q, d in scorer.pairs[:len(records) * 13] if q == record["query"]]
        # the scorer's ranking of the window, less the positive and the traps (above max_score)
        want = sorted((d for d in window if "tiger" not in d and not d.endswith("car")),
                      key=lambda d: -CORPUS.index(d))[:4]
        assert record["neg"] == want
        assert record["neg_scores"] == pytest.approx([0.1 + 0.01 * CORPUS.index(d) for d in want])
        assert not any("tiger" in n for n in record["neg"])


@pytest.fixture(scope="module")
def cross_encoder_dir(tiny_bert_dir, tmp_path_factory) -> str:
    """The tiny BERT with a one-logit head saved with it, so every load scores alike."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("cross-encoder")
    torch.manual_seed(0)
    BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)
    return str(folder)


def test_cli_rescore_with_a_cross_encoder_writes_its_scores(tiny_bert_dir, cross_encoder_dir, mine_data, tmp_path,
                                                            capsys):
    output = tmp_path / "mined.jsonl"
    code, _, err = run(capsys, "mine", "--model", tiny_bert_dir, "--queries", mine_data["queries"],
                       "--corpus", mine_data["corpus"], "--output", output, "--range-min", 1, "--range-max", 10,
                       "--num-negatives", 3, "--max-score", "off", "--margin", "off",
                       "--rescore-with", cross_encoder_dir, "--device", "cpu", "--no-vector-cache")
    assert code == 0, err
    reranker = qtune.load(cross_encoder_dir, task="reranker", device="cpu")
    records = read_jsonl(output)
    for record in records:
        np.testing.assert_allclose(record["pos_scores"], reranker.score([(record["query"], p) for p in record["pos"]]),
                                   atol=1e-5)
        np.testing.assert_allclose(record["neg_scores"], reranker.score([(record["query"], n) for n in record["neg"]]),
                                   atol=1e-5)
        assert record["neg_scores"] == sorted(record["neg_scores"], reverse=True)
    assert sum(len(r["neg"]) for r in records) == 3 * len(records)
    assert not list(tmp_path.glob(".qtune-vectors"))  # --no-vector-cache
    # the Python API (qtune.api.mine) with the same settings writes the same file
    from qtune.api import mine

    again = tmp_path / "api.jsonl"
    mine(tiny_bert_dir, str(mine_data["queries"]), str(mine_data["corpus"]), str(again),
         MiningSettings(range_min=1, range_max=10, num_negatives=3, max_score=None, margin=None),
         rescore_with=cross_encoder_dir, device="cpu", vector_cache=None)
    assert again.read_bytes() == output.read_bytes()


# ---------------------------------------------------------------- the corpus-vector cache

@pytest.fixture
def embed_calls(monkeypatch) -> list[tuple[int, bool]]:
    """(number of texts, is_query) of every Embedder.embed call."""
    calls = []
    real = Embedder.embed

    def counting(self, texts, **kw):
        calls.append((len(texts), kw.get("is_query", False)))
        return real(self, texts, **kw)

    monkeypatch.setattr(Embedder, "embed", counting)
    return calls


def test_a_second_mine_of_the_same_corpus_reads_its_vectors_from_the_cache(tiny_bert_dir, mine_data, tmp_path,
                                                                           embed_calls):
    embedder = qtune.load(tiny_bert_dir, task="embedding", device="cpu")
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    common = dict(model_name=tiny_bert_dir)
    mine_file(lambda: embedder, str(mine_data["queries"]), str(mine_data["corpus"]), str(first), SETTINGS, **common)
    corpus_calls = [c for c in embed_calls if c == (len(CORPUS), False)]
    assert len(corpus_calls) == 1
    cached = list((tmp_path / ".qtune-vectors").glob("corpus-*.npy"))
    assert len(cached) == 1 and not list((tmp_path / ".qtune-vectors").glob(".*.tmp"))
    assert np.load(cached[0]).shape == (len(CORPUS), embedder.dimension)

    embed_calls.clear()
    mine_file(lambda: embedder, str(mine_data["queries"]), str(mine_data["corpus"]), str(second), SETTINGS, **common)
    # only the queries and the one positive outside the corpus were embedded again
    assert embed_calls == [(len(ANIMALS), True), (1, False)]
    assert second.read_bytes() == first.read_bytes()

    # another corpus, or the cache switched off, embeds the corpus again
    write_lines(mine_data["corpus"], *CORPUS, "one more passage")
    embed_calls.clear()
    mine_file(lambda: embedder, str(mine_data["queries"]), str(mine_data["corpus"]), str(second), SETTINGS, **common)
    assert (len(CORPUS) + 1, False) in embed_calls
    assert len(list((tmp_path / ".qtune-vectors").glob("corpus-*.npy"))) == 2
    embed_calls.clear()
    mine_file(lambda: embedder, str(mine_data["queries"]), str(mine_data["corpus"]), str(second), SETTINGS,
              model_name=tiny_bert_dir, cache_dir=None)
    assert (len(CORPUS) + 1, False) in embed_calls


def test_the_cache_key_follows_the_model_files_max_length_pooling_and_corpus(tiny_bert_dir, tmp_path):
    def fake(max_length=512, pooling="mean", precision="fp32"):
        meta = SimpleNamespace(max_length=max_length, settings=SimpleNamespace(pooling=pooling))
        return SimpleNamespace(loaded=SimpleNamespace(meta=meta, precision=precision))

    identity = model_identity(tiny_bert_dir)
    key = vector_cache_key(identity, fake(), ["a", "b"])
    assert key == vector_cache_key(identity, fake(), ["a", "b"])
    others = [vector_cache_key(identity, fake(max_length=128), ["a", "b"]),
              vector_cache_key(identity, fake(pooling="cls"), ["a", "b"]),
              vector_cache_key(identity, fake(precision="bf16"), ["a", "b"]),
              vector_cache_key(identity, fake(), ["a", "b", "c"]),
              vector_cache_key(identity, fake(), ["ab"]),
              vector_cache_key("other-model", fake(), ["a", "b"])]
    assert len({key, *others}) == 7

    weights = next(Path(tiny_bert_dir).glob("*.safetensors"))
    stat = weights.stat()
    try:  # a retrained model in the same folder has new files: a new identity
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
        assert model_identity(tiny_bert_dir) != identity
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert model_identity(tiny_bert_dir) == identity
    assert model_identity("org/some-hub-model") == "org/some-hub-model"


def test_an_unreadable_cache_file_is_replaced(embedder, mine_data, tmp_path, tiny_bert_dir):
    cache = tmp_path / "cache"
    vecs = mine_module.corpus_vectors(embedder, CORPUS, batch_size=8, cache_dir=cache, model_key="k")
    (path,) = cache.glob("corpus-*.npy")
    path.write_bytes(b"not a numpy file")
    again = mine_module.corpus_vectors(embedder, CORPUS, batch_size=8, cache_dir=cache, model_key="k")
    np.testing.assert_array_equal(again, vecs)
    np.testing.assert_array_equal(np.load(path), vecs)


def test_rescoring_in_blocks_of_queries_gives_the_same_scores():
    groups = [QueryGroup(f"q{i}", tuple(f"p{i}-{j}" for j in range(i % 3 + 1))) for i in range(7)]
    texts = [f"the {a} is near the {v}" for a in ANIMALS for v in VEHICLES[:2]]
    indices = np.random.default_rng(0).integers(0, len(texts), (7, 5))
    class Scorer(InferenceModel):
        batch_calls = frozenset({"score"})

        def features(self, pairs, *, truncate=True):
            return [[0] * len(d) for _, d in pairs]

        def score(self, pairs, **_):
            return np.array([len(q) * 0.01 + len(d) * 0.001 for q, d in pairs], dtype=np.float32)

    scorer = Scorer(loaded=None)
    whole = mine_module._rescore(scorer, groups, texts, indices, batch_size=4)
    blocks = mine_module._rescore(scorer, groups, texts, indices, batch_size=4, block=3)
    np.testing.assert_array_equal(blocks[0], whole[0])
    assert blocks[1] == whole[1] and [len(s) for s in whole[1]] == [len(g.positives) for g in groups]
    assert whole[0][2, 1] == pytest.approx(0.02 + len(texts[indices[2, 1]]) * 0.001)
