"""Rerankers through the CLI: `train reranker` (listwise/pointwise, resume, LoRA reload), two-stage
evaluation (`eval rerank`, `eval retrieval --reranker`), `calibrate`, and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from support import (
    train_losses,
    ANIMALS,
    VEHICLES,
    assert_data_accepted_up_to_the_model,
    assert_refused_before_the_model_loads,
    assert_user_error,
    run,
    write_lines,
)
from reranker_cases import (  # noqa: F401
    QWEN_INSTRUCTION_TRAINED,
    ce_dir,
    ce_run,
    data,
    group_mrr,
    qwen_run,
    qwen_tokenizer,
)

import qtune
from qtune.data.retrieval import (
    read_beir,
    read_query_groups,
)
from qtune.evaluation.metrics import calibrate_threshold
from qtune.evaluation.report import short_name
from qtune.evaluation.retrieval import rerank_run, retrieve
from qtune.evaluation.retrieval_metrics import retrieval_metrics
from qtune.tasks import get
from qtune.tasks.reranker.config import RerankerConfig
from qtune.tasks.reranker.model import Reranker

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---------------------------------------------------------------- 5. training through the CLI


@pytest.mark.parametrize("family", ["bert", "qwen"])
def test_listwise_training_learns_what_the_base_model_cannot(family, request):
    trained = request.getfixturevalue("ce_run" if family == "bert" else "qwen_run")
    out = trained["out"]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["best_metric"] == "mrr"
    history = metrics["history"]
    best = metrics["best"]
    # measured: bert 0.50 -> 1.00, qwen 0.39 -> 0.96 (chance is about 0.52 with 3 negatives)
    assert trained["before"]["mrr"] < 0.6, trained["before"]
    assert best["mrr"] >= 0.9, history
    assert best["mrr"] - trained["before"]["mrr"] >= 0.3
    assert best["mrr"] == max(h["mrr"] for h in history)
    assert all(h["groups"] == 32 and 0.0 <= h["accuracy@1"] <= 1.0 for h in history)
    # best/ really holds the best model: scoring it again gives the recorded metrics
    best_model = qtune.load(out / "best", device="cpu")
    again = group_mrr(best_model, read_query_groups(trained["eval"]))
    assert again["mrr"] == pytest.approx(best["mrr"], abs=1e-6)
    assert again["accuracy@1"] == pytest.approx(best["accuracy@1"], abs=1e-6)

    assert {"best", "last", "metrics.json", "config.yaml", "runs"} <= {p.name for p in out.iterdir()}
    config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert (config["model"], config["loss"], config["group_size"], config["resume"]) == (trained["base"], "listwise",
                                                                                       4, False)
    for name in ("best", "last"):
        meta = json.loads((out / name / "qtune.json").read_text(encoding="utf-8"))
        assert (meta["task"], meta["adapter"], meta["base_model"], meta["threshold"]) == ("reranker", False,
                                                                                         trained["base"], None)
        assert (out / name / "model.safetensors").is_file()
    assert (out / "last" / "trainer_state.pt").is_file()
    meta = json.loads((out / "best" / "qtune.json").read_text(encoding="utf-8"))
    if family == "bert":
        assert meta["max_length"] == 32 and meta["instruction"] is None
        assert metrics["train"]["steps"] == 12 * 128 // 8  # the two groups without negatives are left out
        assert "2 of 130 training groups have no negative and are left out" in trained["stdout"]
        assert f"done: {out}  best mrr: " in trained["stdout"]
    else:
        assert meta["max_length"] == 96 and meta["instruction"] == QWEN_INSTRUCTION_TRAINED
        # the stored instruction is the one every prompt of the loaded model carries
        prompt = best_model.loaded.tokenizer.decode(best_model.features([("q", "d")])[0]["input_ids"])
        assert f"<Instruct>: {QWEN_INSTRUCTION_TRAINED}\n<Query>: q\n<Document>: d" in prompt
        assert [h["step"] for h in history] == [4, 8, 12, 16]


def _first_batch_loss(ce_dir: str, groups, kind: str, batch_size: int, seed: int) -> float:
    """The loss of the first training batch, computed by hand from unpadded forward passes of the plain
    transformers model: the batch order is the trainer's (length-grouped, seeded)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from qtune.data.batching import length_grouped_batches

    tok = AutoTokenizer.from_pretrained(ce_dir)
    plain = AutoModelForSequenceClassification.from_pretrained(ce_dir).eval()
    pairs = [[(g.query, d) for d in (g.positives[0], *g.negatives[:3])] for g in groups]
    lengths = [sum(len(tok(q, d)["input_ids"]) for q, d in group) for group in pairs]
    first = length_grouped_batches(lengths, batch_size, seed=seed, epoch=0)[0]
    values = []
    with torch.no_grad():
        for i in first:
            x = [plain(**tok(q, d, return_tensors="pt")).logits[0, 0].item() for q, d in pairs[i]]
            if kind == "listwise":
                values.append(-(x[0] - math.log(sum(math.exp(v) for v in x))))
            else:
                values.extend(math.log1p(math.exp(-v)) if j == 0 else math.log1p(math.exp(v)) for j, v in enumerate(x))
    return sum(values) / len(values)


def test_pointwise_loss_is_what_the_trainer_minimises(ce_dir, data, tmp_path, capsys):
    groups = read_query_groups(data["small"])
    pointwise = _first_batch_loss(ce_dir, groups, "pointwise", batch_size=4, seed=1)
    listwise = _first_batch_loss(ce_dir, groups, "listwise", batch_size=4, seed=1)
    assert abs(pointwise - listwise) > 0.1  # the two losses are told apart
    out = tmp_path / "pointwise"
    code, stdout, err = run(capsys, "train", "reranker", "--model", ce_dir, "--train", data["small"],
                            "--eval", data["eval"], "--output", out, "--loss", "pointwise", "--full", "--lr", "3e-3",
                            "--epochs", "1", "--batch-size", "4", "--group-size", "4", "--max-length", "32",
                            "--logging-steps", "1", "--device", "cpu", "--seed", "1")
    assert code == 0, err
    assert f"done: {out}" in stdout
    assert yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))["loss"] == "pointwise"
    losses = train_losses(out)
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(pointwise, abs=1e-5)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["train"]["steps"] == 8 and 0.0 <= metrics["best"]["mrr"] <= 1.0


RESUME_FLAGS = ["--full", "--lr", "3e-3", "--epochs", "2", "--batch-size", "4", "--group-size", "4",
                "--max-length", "32", "--device", "cpu", "--seed", "2"]


def test_resume_after_a_crash_ends_where_an_uninterrupted_run_ends(ce_dir, data, tmp_path, capsys, monkeypatch):
    from qtune.tasks.reranker import train as task

    common = ["train", "reranker", "--model", ce_dir, "--train", data["small"], "--eval", data["eval"],
              *RESUME_FLAGS]
    straight = tmp_path / "straight"
    code, _, err = run(capsys, *common, "--output", straight)
    assert code == 0, err

    real_loss, calls = task.loss, {"n": 0}

    def crashing_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 11:  # mid-epoch 2 (8 batches an epoch), after the epoch-1 checkpoint
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    crashed = tmp_path / "crashed"
    monkeypatch.setattr(task, "loss", crashing_loss)
    code, _, err = run(capsys, *common, "--output", crashed)
    monkeypatch.setattr(task, "loss", real_loss)
    assert code == 130 and "interrupted" in err
    state = torch.load(crashed / "last" / "trainer_state.pt", weights_only=False)
    assert state["progress"]["step"] == 10 and not (crashed / "metrics.json").exists()

    code, _, err = run(capsys, *common, "--output", crashed)  # without --resume: refused, run left alone
    assert_user_error(code, err, "already holds a run", "--resume")
    code, _, err = run(capsys, *common, "--output", crashed, "--resume")
    assert code == 0, err

    probe = [(g.query, d) for g in read_query_groups(data["eval"])[:8] for d in (g.positives[0], *g.negatives)]
    expected = qtune.load(straight / "last", device="cpu").score(probe)
    np.testing.assert_allclose(qtune.load(crashed / "last", device="cpu").score(probe), expected, atol=1e-5)
    assert np.abs(expected - qtune.load(ce_dir, task="reranker", device="cpu").score(probe)).max() > 1e-3
    first = json.loads((straight / "metrics.json").read_text(encoding="utf-8"))
    second = json.loads((crashed / "metrics.json").read_text(encoding="utf-8"))
    assert second["train"]["steps"] == first["train"]["steps"] == 16
    assert [h["step"] for h in second["history"]] == [8, 16]
    for a, b in zip(first["history"], second["history"]):
        assert a["mrr"] == pytest.approx(b["mrr"], abs=1e-6)


def test_resume_continues_a_run_that_stopped_after_a_fraction_of_an_epoch(ce_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "reranker", "--model", ce_dir, "--train", data["small"], "--eval", data["eval"],
              "--output", out, *RESUME_FLAGS]
    code, _, err = run(capsys, *common, "--epochs", "0.5")
    assert code == 0, err
    half = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert half["train"]["steps"] == 4 and [h["epoch"] for h in half["history"]] == [0.5]

    code, _, err = run(capsys, *common, "--epochs", "1", "--resume")
    assert code == 0, err
    full = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert full["train"]["steps"] == 8
    assert [(h["step"], h["epoch"]) for h in full["history"]] == [(4, 0.5), (8, 1.0)]
    assert full["history"][0] == half["history"][0]
    config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert config["epochs"] == 1.0 and config["resume"] is False
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=False)["progress"]["step"] == 8


@pytest.mark.parametrize("family", ["bert", "qwen"])
def test_lora_run_saves_an_adapter_that_reloads_to_the_same_scores(family, ce_dir, tiny_qwen_dir, data, tmp_path):
    base = ce_dir if family == "bert" else tiny_qwen_dir
    out = tmp_path / "lora"
    config = RerankerConfig(model=base, train=str(data["small"]), output=str(out), epochs=0.5, batch_size=4,
                            group_size=4, lr=2e-2, max_length=96, device="cpu", seed=3)
    loaded, result = get("reranker").train(config)
    assert loaded.is_adapter and result["train"]["steps"] == 4
    probe = [(g.query, d) for g in read_query_groups(data["eval"])[:6] for d in (g.positives[0], *g.negatives)]
    in_process = Reranker(loaded).score(probe)
    untrained = qtune.load(base, task="reranker", device="cpu").score(probe)
    assert np.abs(in_process - untrained).max() > 1e-4  # training moved the model: the round trip is not trivial
    for name in ("best", "last"):
        folder = out / name
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        assert not (folder / "model.safetensors").exists()
        meta = json.loads((folder / "qtune.json").read_text(encoding="utf-8"))
        assert (meta["task"], meta["adapter"], meta["base_model"]) == ("reranker", True, base)
        if family == "qwen" and name == "last":
            continue  # loading the real Qwen3 tokenizer takes a second; best/ (= last/ here) was checked
        reloaded = qtune.load(folder, device="cpu")
        assert isinstance(reloaded, Reranker) and reloaded.loaded.is_adapter
        np.testing.assert_allclose(reloaded.score(probe), in_process, atol=1e-5)


# ---------------------------------------------------------------- 6b. two-stage evaluation


def test_eval_rerank_and_eval_retrieval_with_reranker_agree(ce_run, tiny_bert_dir, data, tmp_path, capsys):
    model = str(ce_run["out"] / "best")
    retriever = tiny_bert_dir
    two_stage = f"{short_name(retriever)} + {short_name(model)}"
    evaldir = tmp_path / "rerank"
    code, out, err = run(capsys, "eval", "rerank", "--model", model, "--data", data["beir"], "--retriever", retriever,
                         "--top-k", "6", "--output", evaldir, "--device", "cpu")
    assert code == 0, err
    assert f"wrote {evaldir}/metrics.json, report.md, retrieval.png" in out
    results = json.loads((evaldir / "metrics.json").read_text(encoding="utf-8"))
    assert list(results) == [retriever, two_stage]

    # the same two stages by hand
    data_set = read_beir(data["beir"])
    first = retrieve(qtune.load(retriever, task="embedding", device="cpu"), data_set, top_k=6)
    assert all(len(docs) == 6 for docs in first.values())
    reranked = rerank_run(qtune.load(model, device="cpu"), data_set, first, top_k=6)
    expected = {retriever: retrieval_metrics(first, data_set.qrels),
                two_stage: retrieval_metrics(reranked, data_set.qrels)}
    for name, metrics in expected.items():
        assert results[name] == pytest.approx(metrics, abs=1e-9), name
    # the trained reranker puts the query's kind first among what the retriever found
    assert results[two_stage]["ndcg@5"] > results[retriever]["ndcg@5"]
    assert results[two_stage]["recall@10"] == results[retriever]["recall@10"]  # the same 6 documents

    report = (evaldir / "report.md").read_text(encoding="utf-8")
    assert report.startswith(f"# Reranking: {data['beir']}")
    assert report.splitlines()[2] == f"| metric | {retriever} | {two_stage} | change |"
    row = next(line for line in report.splitlines() if line.startswith("| ndcg@5 |"))
    a, b = results[two_stage]["ndcg@5"], results[retriever]["ndcg@5"]
    assert row == f"| ndcg@5 | {b:.4f} | {a:.4f} | {a - b:+.4f} |"

    # `eval retrieval --reranker` runs the same two stages
    evaldir2 = tmp_path / "retrieval"
    code, out, err = run(capsys, "eval", "retrieval", "--model", retriever, "--data", data["beir"],
                         "--reranker", model, "--top-k", "6", "--rerank-top-k", "6", "--output", evaldir2,
                         "--device", "cpu")
    assert code == 0, err
    again = json.loads((evaldir2 / "metrics.json").read_text(encoding="utf-8"))
    assert list(again) == [retriever, two_stage]
    for name in expected:
        assert again[name] == pytest.approx(results[name], abs=1e-9), name
    report = (evaldir2 / "report.md").read_text(encoding="utf-8")
    assert f"| metric | {retriever} | {two_stage} | change |" in report


# ---------------------------------------------------------------- 7. calibrate


def _pairs_csv(path: Path, rows) -> Path:
    lines = ["sentence1,sentence2,label"] + [f"{q},{d},{y}" for q, d, y in rows]
    return write_lines(path, *lines)


def _labelled_pairs() -> list[tuple[str, str, int]]:
    rows = []
    for i, (q, kinds) in enumerate([("animal", ANIMALS), ("vehicle", VEHICLES), ("my animal", ANIMALS)]):
        for w in ANIMALS[:4] + VEHICLES[:4]:
            rows.append((q, f"the {w}", int(w in kinds)))
    # three wrong labels, so that no threshold is perfect
    for j in (0, 9, 20):
        q, d, y = rows[j]
        rows[j] = (q, d, 1 - y)
    return rows


@pytest.fixture()
def reranker_copy(ce_run, tmp_path) -> Path:
    folder = tmp_path / "reranker"
    shutil.copytree(ce_run["out"] / "best", folder)
    return folder


def test_calibrate_stores_the_threshold_of_the_models_own_scores(reranker_copy, tmp_path, capsys):
    rows = _labelled_pairs()
    pairs_csv = _pairs_csv(tmp_path / "pairs.csv", rows)
    scores = qtune.load(reranker_copy, device="cpu").score([(q, d) for q, d, _ in rows])
    labels = [y for _, _, y in rows]
    f1_best = calibrate_threshold(labels, scores)
    precise = calibrate_threshold(labels, scores, min_precision=0.95)
    assert f1_best["f1"] < 1.0 and precise["threshold"] != f1_best["threshold"]  # the two modes differ here
    meta_before = json.loads((reranker_copy / "qtune.json").read_text(encoding="utf-8"))

    code, out, err = run(capsys, "calibrate", "--model", reranker_copy, "--data", pairs_csv, "--device", "cpu",
                         "--output", tmp_path / "cal")
    assert code == 0, err
    meta = json.loads((reranker_copy / "qtune.json").read_text(encoding="utf-8"))
    assert meta["threshold"] == pytest.approx(f1_best["threshold"], abs=1e-6)
    assert {k: v for k, v in meta.items() if k != "threshold"} == {k: v for k, v in meta_before.items()
                                                                   if k != "threshold"}
    assert qtune.load(reranker_copy, device="cpu").threshold == meta["threshold"]
    assert f"threshold {f1_best['threshold']:.6f}: precision {f1_best['precision']:.4f}" in out
    assert f"on {len(rows)} pairs ({sum(labels)} relevant)" in out
    assert f"stored in {reranker_copy}/qtune.json" in out
    written = json.loads((tmp_path / "cal" / "metrics.json").read_text(encoding="utf-8"))
    assert written["threshold"] == meta["threshold"] and written["model"] == str(reranker_copy)
    assert written["f1"] == pytest.approx(f1_best["f1"])

    code, out, err = run(capsys, "calibrate", "--model", reranker_copy, "--data", pairs_csv, "--min-precision", "0.95",
                         "--device", "cpu")
    assert code == 0, err
    meta = json.loads((reranker_copy / "qtune.json").read_text(encoding="utf-8"))
    assert meta["threshold"] == pytest.approx(precise["threshold"], abs=1e-6)
    assert qtune.load(reranker_copy, device="cpu").threshold == meta["threshold"]
    # calibrating does not change the scores
    np.testing.assert_allclose(qtune.load(reranker_copy, device="cpu").score([(q, d) for q, d, _ in rows]), scores,
                               atol=1e-6)

    code, _, err = run(capsys, "calibrate", "--model", reranker_copy, "--data", pairs_csv, "--min-precision", "1.01",
                       "--device", "cpu")
    # found only after scoring, so the progress bar comes first on stderr; the error is the last line
    assert code == 2 and "Traceback" not in err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith(f"qtune: error: {pairs_csv}: no threshold reaches precision 1.01 (the best is "), err
    assert json.loads((reranker_copy / "qtune.json").read_text(encoding="utf-8")) == meta


def test_calibrating_a_plain_cross_encoder_folder_makes_it_a_reranker_folder(ce_dir, tmp_path, capsys):
    folder = tmp_path / "plain"
    shutil.copytree(ce_dir, folder)
    assert not (folder / "qtune.json").exists()
    rows = _labelled_pairs()
    pairs_csv = _pairs_csv(tmp_path / "pairs.csv", rows)
    scores = qtune.load(folder, task="reranker", device="cpu").score([(q, d) for q, d, _ in rows])
    expected = calibrate_threshold([y for _, _, y in rows], scores)
    code, _, err = run(capsys, "calibrate", "--model", folder, "--data", pairs_csv, "--device", "cpu")
    assert code == 0, err
    meta = json.loads((folder / "qtune.json").read_text(encoding="utf-8"))
    assert (meta["task"], meta["adapter"], meta["base_model"]) == ("reranker", False, str(folder))
    assert meta["threshold"] == pytest.approx(expected["threshold"], abs=1e-6)
    reranker = qtune.load(folder, device="cpu")  # no task= needed any more
    assert reranker.threshold == meta["threshold"]
    np.testing.assert_allclose(reranker.score([(q, d) for q, d, _ in rows]), scores, atol=1e-6)


def test_calibrate_refuses_a_hub_id(tmp_path, capsys):
    pairs_csv = _pairs_csv(tmp_path / "pairs.csv", [("animal", "the cat", 1), ("animal", "the bus", 0)])
    code, _, err = run(capsys, "calibrate", "--model", "Qwen/Qwen3-Reranker-0.6B", "--data", pairs_csv,
                       "--device", "cpu")
    assert_user_error(code, err, "Qwen/Qwen3-Reranker-0.6B", "local folder")


def test_calibrate_bad_label_names_the_line_and_writes_nothing(reranker_copy, tmp_path, capsys):
    pairs_csv = _pairs_csv(tmp_path / "pairs.csv", [("animal", "the cat", 1), ("animal", "the bus", 2),
                                                    ("vehicle", "the bus", 1)])
    before = (reranker_copy / "qtune.json").read_bytes()
    code, _, err = run(capsys, "calibrate", "--model", reranker_copy, "--data", pairs_csv, "--device", "cpu",
                       "--output", tmp_path / "cal")
    assert_user_error(code, err, f"{pairs_csv}:3", "field 'label'", "label '2' is not one of ['0', '1']")
    assert (reranker_copy / "qtune.json").read_bytes() == before
    assert not (tmp_path / "cal").exists()


# ---------------------------------------------------------------- 8. bad input for train reranker


def _malformed_json(tmp: Path, data: dict):
    train = write_lines(tmp / "train.jsonl", json.dumps({"query": "animal", "pos": ["cat"], "neg": ["bus"]}),
                        '{"query": "vehicle", "pos": ["bus"], "neg": ["cat"]')
    return ["--train", train], [f"{train}:2", "malformed JSON"]


def _missing_pos(tmp: Path, data: dict):
    train = write_lines(tmp / "train.jsonl", json.dumps({"query": "animal", "pos": ["cat"], "neg": ["bus"]}),
                        json.dumps({"query": "vehicle", "neg": ["cat"]}))
    return ["--train", train], [f"{train}:2", "field 'pos'", "no positive passage"]


def _bad_negative_in_eval(tmp: Path, data: dict):
    evalfile = write_lines(tmp / "eval.jsonl", json.dumps({"query": "animal", "pos": ["cat"], "neg": ["bus"]}),
                           json.dumps({"query": "animal", "pos": ["dog"], "neg": ["bus", 3]}))
    return ["--train", data["small"], "--eval", evalfile], [f"{evalfile}:2", "field 'neg'", "passage 2 is int"]


def _eval_without_negatives(tmp: Path, data: dict):
    evalfile = write_lines(tmp / "eval.jsonl", json.dumps({"query": "animal", "pos": ["cat"]}))
    return ["--train", data["small"], "--eval", evalfile], [str(evalfile), "no group has a negative"]


@pytest.mark.parametrize("case", [_malformed_json, _missing_pos, _bad_negative_in_eval, _eval_without_negatives])
def test_bad_data_is_refused_before_the_model_loads(case, data, tmp_path, capsys):
    data_args, parts = case(tmp_path, data)
    assert_refused_before_the_model_loads(capsys, "reranker", data_args, tmp_path / "out", *parts)


def test_good_data_gets_as_far_as_the_missing_model(data, tmp_path, capsys):
    """The control for the test above: with valid data the same command fails on the model."""
    assert_data_accepted_up_to_the_model(capsys, "reranker", ["--train", data["small"], "--eval", data["eval"]], tmp_path / "out")


def test_training_file_without_any_negative_is_refused_before_the_model_loads(data, tmp_path, capsys):
    train = write_lines(tmp_path / "train.jsonl", json.dumps({"query": "animal", "pos": ["cat"]}),
                        json.dumps({"query": "vehicle", "pos": ["bus"]}))
    assert_refused_before_the_model_loads(capsys, "reranker", ["--train", train], tmp_path / "out", str(train),
                                          "no group has a negative")


def test_max_length_too_small_for_the_prompt_writes_nothing(tiny_qwen_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, "train", "reranker", "--model", tiny_qwen_dir, "--train", data["small"],
                       "--output", out, "--max-length", "40", "--device", "cpu")
    assert_user_error(code, err, "max_length 40 leaves no room", "48-token reranker prompt")
    assert not out.exists()
