"""The dev split, the base-vs-tuned verdict, --fail-on-regression, --early-stopping, and the
warnings and model card of a model that ended no better than its base."""

from __future__ import annotations

import json

import pytest
import yaml
from support import assert_user_error, run, write_query_groups

from qtune.data.retrieval import held_out_retrieval_set
from qtune.data.split import MAX_AUTO_DEV, dev_split, resolve_dev_fraction
from qtune.errors import QtuneError
from qtune.records import QueryGroup
from qtune.tasks.reranker.groups import group_ranking_metrics, random_order_metrics
from qtune.training.verdict import DevSet, make_verdict, regression_warning, run_verdict


def test_dev_split_is_seeded_by_key_and_keeps_a_key_on_one_side():
    keys = [f"q{i % 50}" for i in range(120)]  # 50 distinct queries, most repeated
    train, dev = dev_split(keys, 0.2, seed=1)
    assert sorted(train + dev) == list(range(120))
    assert len({keys[i] for i in dev}) == 10  # round(0.2 x 50) distinct keys
    assert not {keys[i] for i in dev} & {keys[i] for i in train}
    assert dev_split(keys, 0.2, seed=1) == (train, dev)  # the same on every run and rank
    assert dev_split(list(reversed(keys)), 0.2, seed=1)[1] != dev  # rows move, keys do not
    assert {keys[::-1][i] for i in dev_split(keys[::-1], 0.2, seed=1)[1]} == {keys[i] for i in dev}
    assert dev_split(keys, 0.2, seed=2)[1] != dev
    assert dev_split(keys, 0.0, seed=1) == (list(range(120)), [])


def test_dev_fraction_default_and_its_refusals():
    assert resolve_dev_fraction(None, 199, has_eval=False, source="t") == 0.0  # too little data
    assert resolve_dev_fraction(None, 200, has_eval=False, source="t") == 0.1
    assert resolve_dev_fraction(None, 50_000, has_eval=False, source="t") == MAX_AUTO_DEV / 50_000
    assert resolve_dev_fraction(None, 5000, has_eval=True, source="t") == 0.0  # --eval is the dev set
    assert resolve_dev_fraction(0.0, 5000, has_eval=True, source="t") == 0.0
    assert resolve_dev_fraction(0.3, 10, has_eval=False, source="t") == 0.3
    with pytest.raises(QtuneError, match="--dev-fraction and --eval both name a dev set"):
        resolve_dev_fraction(0.1, 5000, has_eval=True, source="t")
    with pytest.raises(QtuneError, match="holds out nothing"):
        resolve_dev_fraction(0.01, 20, has_eval=False, source="t")


def test_held_out_queries_search_the_whole_corpus():
    groups = [QueryGroup("q0", ("a",), ("b",)), QueryGroup("q1", ("b",), ("c", "a")), QueryGroup("q2", ("d", "a"))]
    data = held_out_retrieval_set([groups[2]], groups)
    assert sorted(data.corpus.values()) == ["a", "b", "c", "d"]  # training passages stay in
    assert list(data.queries.values()) == ["q2"]
    (qrels,) = data.qrels.values()
    assert sorted(data.corpus[d] for d in qrels) == ["a", "d"]


def test_random_order_is_the_expected_ranking_of_random_scores():
    assert random_order_metrics([2]) == {"accuracy@1": 0.5, "mrr": 0.75, "groups": 1}
    import numpy as np

    rng = np.random.default_rng(0)
    sampled = group_ranking_metrics([rng.random(4) for _ in range(20000)])
    expected = random_order_metrics([4] * 3)
    assert abs(sampled["mrr"] - expected["mrr"]) < 0.01
    assert abs(sampled["accuracy@1"] - expected["accuracy@1"]) < 0.01


def test_verdict_lines():
    dev = DevSet(size=80, unit="queries", source="a 10% dev split of train.jsonl")
    better = make_verdict("ndcg@10", 0.71, 0.66, "base", dev)
    assert not better["worse"]
    assert better["line"] == ("tuned 0.7100 vs base 0.6600 ndcg@10 on 80 dev queries (a 10% dev split of "
                              "train.jsonl): +0.0500")
    worse = make_verdict("ndcg@10", 0.61, 0.66, "base", dev)
    assert worse["worse"] and worse["line"].startswith("WORSE than the base: tuned 0.6100 vs base 0.6600")
    same = make_verdict("macro_f1", 0.3, 0.3, "majority class 'a'", dev)
    assert same["worse"] and same["line"].startswith("NO BETTER than the base")


def _groups(path, n=220):
    """`n` distinct queries, each with one positive and one negative: enough for the default dev split."""
    return write_query_groups(path, n)


def _train(capsys, tiny_bert_dir, data, output, *extra):
    return run(capsys, "train", "embedding", "--model", tiny_bert_dir, "--train", data, "--output", output,
               "--batch-size", "16", "--max-length", "16", "--device", "cpu", "--report-to", "none", *extra)


@pytest.fixture(scope="module")
def unchanged_run(tmp_path_factory, tiny_bert_dir):
    """A LoRA run at a learning rate too small to move anything: tuned == base on the dev split."""
    from qtune.cli import main  # capsys is per test: the module's run calls the CLI directly

    folder = tmp_path_factory.mktemp("unchanged")
    data = _groups(folder / "groups.jsonl")
    code = main(["train", "embedding", "--model", tiny_bert_dir, "--train", str(data), "--output",
                 str(folder / "run"), "--batch-size", "16", "--max-length", "16", "--device", "cpu", "--report-to",
                 "none", "--no-full", "--lr", "1e-12", "--epochs", "1", "--min-steps", "0", "--fail-on-regression"])
    return folder, code


def test_a_run_no_better_than_its_base_says_so_and_exits_3(unchanged_run):
    folder, code = unchanged_run
    assert code == 3
    metrics = json.loads((folder / "run" / "metrics.json").read_text(encoding="utf-8"))
    verdict = metrics["verdict"]
    assert verdict["worse"] and verdict["delta"] == 0.0
    assert verdict["dev_size"] == 22 and verdict["dev_unit"] == "queries"  # 10% of 220 distinct queries
    assert verdict["dev_source"] == f"a 10% dev split of {folder / 'groups.jsonl'}"
    assert metrics["baseline"]["name"] == "base"
    assert metrics["baseline"]["ndcg@10"] == pytest.approx(verdict["base"])
    assert run_verdict(folder / "run" / "best") == verdict


def test_export_and_serve_warn_and_the_card_says_what_the_model_is(capsys, unchanged_run, tmp_path, tiny_bert_dir):
    folder, _ = unchanged_run
    best = folder / "run" / "best"
    assert regression_warning("fin", best).startswith("warning: fin is not better than the model it was trained "
                                                       "from: NO BETTER than the base: tuned")
    report = tmp_path / "test-report"
    report.mkdir()
    (report / "metrics.json").write_text(json.dumps({str(best): {"ndcg@10": 0.5, "mrr@10": 0.4},
                                                     "base": {"ndcg@10": 0.5, "mrr@10": 0.4}}), encoding="utf-8")
    code, out, err = run(capsys, "export", "--model", best, "--output", tmp_path / "export", "--test-report", report)
    assert code == 0, err
    assert "warning: " in err and "is not better than the model it was trained from" in err
    card = (tmp_path / "export" / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "sentence-transformers" and front["pipeline_tag"] == "sentence-similarity"
    assert front["base_model"] == tiny_bert_dir
    dev, *tests = front["model-index"][0]["results"]
    assert dev["dataset"]["type"] == "dev" and [m["type"] for m in dev["metrics"]] == ["ndcg@10", "ndcg@10"]
    assert len(tests) == 2 and tests[0]["dataset"]["type"] == "test"
    assert "**Verdict:** NO BETTER than the base" in card
    assert "| base | 0.4000 | 0.5000 |" in card  # the test table: mrr@10, ndcg@10
    assert "from sentence_transformers import SentenceTransformer" in card  # the usage text stays


def test_fail_on_regression_without_a_dev_set_is_refused_before_anything_is_written(capsys, tmp_path,
                                                                                   tiny_bert_dir):
    data = _groups(tmp_path / "g.jsonl", n=40)  # under 200 queries: no default dev split
    code, out, err = _train(capsys, tiny_bert_dir, data, tmp_path / "run", "--fail-on-regression")
    assert_user_error(code, err, "--fail-on-regression needs a dev set")
    assert not (tmp_path / "run").exists()


def test_dev_fraction_beside_eval_is_refused(capsys, tmp_path, tiny_bert_dir):
    from qtune.data.retrieval import write_beir

    data = _groups(tmp_path / "g.jsonl", n=40)
    write_beir(tmp_path / "dev", {"d0": "cat dog"}, {"q0": "cat"}, {"q0": {"d0": 1}})
    code, out, err = _train(capsys, tiny_bert_dir, data, tmp_path / "run", "--dev-fraction", "0.2",
                            "--eval", tmp_path / "dev")
    assert_user_error(code, err, "--dev-fraction and --eval both name a dev set")
    assert not (tmp_path / "run").exists()


def test_early_stopping_ends_the_run_after_evaluations_without_gain(capsys, tmp_path, tiny_bert_dir):
    data = _groups(tmp_path / "g.jsonl", n=40)
    code, out, err = _train(capsys, tiny_bert_dir, data, tmp_path / "run", "--dev-fraction", "0.25", "--no-full",
                            "--lr", "1e-12", "--epochs", "5", "--eval-steps", "1", "--early-stopping", "2")
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    assert [r["step"] for r in metrics["history"]] == [1, 2, 3]  # no gain at steps 2 and 3: stop
    assert metrics["train"]["steps"] == 3
    assert "early stop at step 3" in err + out
    assert "dev split: 10 queries (25% of" in out
