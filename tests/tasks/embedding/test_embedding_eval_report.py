"""`qtune eval retrieval` reports a user can check a gain with: metrics at each Matryoshka dimension
(from --dims or the run's --matryoshka-dims) and the per-query comparison against --compare."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from support import assert_user_error, read_jsonl, run
from qtune.data.retrieval import write_beir
from qtune.errors import QtuneError
from qtune.modeling.inference import InferenceModel
from qtune.tasks.embedding.config import RetrievalEvalConfig
from qtune.tasks.embedding.evaluate import evaluate, show_evaluation

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
E = np.eye(4)
CORPUS = {f"d{i + 1}": f"passage {i + 1}" for i in range(4)}  # passage i is the unit vector e_i
QUERIES = {"q1": "query one", "q2": "query two", "q3": "query three"}
QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d3": 1}}
# tuned: q1 and q2 find their passage first; q3 ranks d4 and d1 above d3 (rank 3)
TUNED = {"query one": E[0], "query two": E[1], "query three": 0.6 * E[3] + 0.5 * E[0] + 0.3 * E[2]}
# base: q1 ranks d2 above d1 (rank 2), q2 and q3 first
BASE = {"query one": 0.8 * E[1] + 0.6 * E[0], "query two": E[1], "query three": E[2]}


class VectorEmbedder(InferenceModel):
    """A stub embedder (the inference interface, no model): passages are unit vectors e_i, queries
    come from a table."""

    batch_calls = frozenset({"embed"})
    feature_options = ("is_query",)

    def __init__(self, queries: dict[str, np.ndarray]):
        super().__init__(loaded=None)
        self.queries = queries

    def features(self, texts, is_query=False, *, truncate=True):
        return [[0] * len(t.split()) for t in texts]  # its "tokens": the words

    def embed(self, texts, *, is_query=False, batch_size=64, progress=False):
        rows = [self.queries[t] if is_query else E[int(t.split()[-1]) - 1] for t in texts]
        rows = np.stack(rows).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture
def beir(tmp_path):
    write_beir(tmp_path / "beir", CORPUS, QUERIES, QRELS)
    return tmp_path / "beir"


def _load(models):
    return lambda name, task, **_: models[name]


def test_per_query_report_shows_the_query_that_got_worse(beir, tmp_path):
    out = tmp_path / "report"
    config = RetrievalEvalConfig(model="run/best", compare="base", data=str(beir), output=str(out), top_k=3)
    results = evaluate(config, _load({"run/best": VectorEmbedder(TUNED), "base": VectorEmbedder(BASE)}))
    # mrr@10: tuned (1 + 1 + 1/3) / 3, base (1/2 + 1 + 1) / 3
    assert results["run/best"]["mrr@10"] == pytest.approx(7 / 9)
    assert results["base"]["mrr@10"] == pytest.approx(5 / 6)
    rows = {r["query_id"]: r for r in read_jsonl(out / "per_query.jsonl")}
    assert [(q, r["rank_before"], r["rank_after"], r["change"]) for q, r in rows.items()] == [
        ("q1", 2, 1, -1), ("q2", 1, 1, 0), ("q3", 1, 3, 2)]
    assert rows["q3"]["above"] == [{"id": "d4", "text": "passage 4", "new": True},
                                   {"id": "d1", "text": "passage 1", "new": True}]
    report = (out / "report.md").read_text()
    assert "## Per query: run/best against base" in report
    assert "1 queries got better, 1 got worse, 1 kept their rank" in report
    worse = report.split("### Got worse (top 1 of 1)")[1].split("### Got better")[0]
    assert "`q3` 'query three': rank 1 -> 3; now above it:" in worse and "  - `d4`: passage 4" in worse
    assert "| q1 | query one | 2 | 1 |" in report.split("### Got better (top 1 of 1)")[1]
    assert show_evaluation(config, results).endswith("retrieval.png, per_query.jsonl")


def test_matryoshka_dims_come_from_the_run_config(beir, tmp_path):
    model = tmp_path / "run" / "best"
    model.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("matryoshka_dims:\n- 2\n- 1\n", encoding="utf-8")
    out = tmp_path / "report"
    config = RetrievalEvalConfig(model=str(model), compare="base", data=str(beir), output=str(out), top_k=3)
    results = evaluate(config, _load({str(model): VectorEmbedder(TUNED), "base": VectorEmbedder(BASE)}))
    dims = results[str(model)]["matryoshka"]
    assert list(dims) == ["4", "2", "1"]
    assert dims["4"]["ndcg@10"] == results[str(model)]["ndcg@10"]
    # dimension 1: only d1 keeps a non-zero vector. q1 -> d1 first; q2 is cut to zero, every passage ties
    # and d2 ranks 2nd (lower index first); q3 -> d1 first, then d2, d3: rank 3
    assert dims["1"]["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4)) / 3)
    # dimension 2: q1, q2 first; q3 is cut to e_1, d3 ranks 3rd after d1 and d2
    assert dims["2"]["mrr@10"] == pytest.approx((1 + 1 + 1 / 3) / 3)
    assert "matryoshka" in results["base"] and list(results["base"]["matryoshka"]) == ["4", "2", "1"]
    assert json.loads((out / "metrics.json").read_text())[str(model)]["matryoshka"] == dims
    report = (out / "report.md").read_text()
    assert "## Matryoshka: metrics at each leading dimension" in report
    assert f"| 1 | {dims['1']['ndcg@10']:.4f} | {results['base']['matryoshka']['1']['ndcg@10']:.4f} |" in report
    assert (out / "matryoshka.png").read_bytes()[:8] == PNG_SIGNATURE


def test_explicit_dims_win_and_too_wide_ones_are_refused(beir, tmp_path):
    models = {"m": VectorEmbedder(TUNED)}
    results = evaluate(RetrievalEvalConfig(model="m", data=str(beir), dims=[3]), _load(models))
    assert list(results["m"]["matryoshka"]) == ["4", "3"]
    no_dims = evaluate(RetrievalEvalConfig(model="m", data=str(beir)), _load(models))
    assert "matryoshka" not in no_dims["m"]
    with pytest.raises(QtuneError, match="--dims 8: the model has 4 dimensions"):
        evaluate(RetrievalEvalConfig(model="m", data=str(beir), dims=[8, 2]), _load(models))


def test_cli_eval_retrieval_with_dims_and_compare(tiny_bert_dir, beir, tmp_path, capsys):
    out = tmp_path / "report"
    code, stdout, err = run(capsys, "eval", "retrieval", "--model", tiny_bert_dir, "--compare", tiny_bert_dir + "/",
                            "--data", beir, "--dims", "16", "8", "--output", out, "--device", "cpu")
    assert code == 0, err
    assert "## Matryoshka" in stdout and "matryoshka.png, per_query.jsonl" in stdout
    assert len(read_jsonl(out / "per_query.jsonl")) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics[tiny_bert_dir]["matryoshka"]) == ["32", "16", "8"]
    code, _, err = run(capsys, "eval", "retrieval", "--model", tiny_bert_dir, "--data", beir, "--dims", "64",
                       "--device", "cpu")
    assert_user_error(code, err, "--dims 64: the model has 32 dimensions")
