"""The embedding commands of the `qtune` CLI end to end, called in-process through `qtune.cli.main`:
`data retrieval-split`, `mine`, `train embedding` and `eval retrieval`.

One full fine-tuning run of the tiny BERT (module fixture) on a task that only training can
solve feeds the evaluation, mining and loading tests. Bad input must stop with exit code 2, a
"file:line, field" message and nothing written, before any model is loaded.

Two deliberate choices keep this file fast and meaningful on a small, busy CPU:
- torch runs on one thread while this module runs (restored afterwards): the tiny models are far
  faster that way than with threads competing for two cores.
- Training uses a copy of the tiny BERT (the tiny_bert_dir fixture) with its dropout set to 0 (same weights,
  same vocabulary). With hidden size 32, BERT's own 0.1 dropout drowns the signal and the model
  learns nothing in dozens of steps; and without dropout a GradCache (`--cached`) run must give
  exactly the model the plain run gives, which is checked below.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import qtune
from qtune.cli import main
from qtune.data.retrieval import write_beir, write_query_groups
from qtune.records import QueryGroup

from support import (ANIMALS, MISSING_MODEL, VEHICLES, assert_data_accepted_up_to_the_model,
                     assert_refused_before_the_model_loads, assert_user_error,
                     read_jsonl, run, train_losses, write_lines)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Each query names an animal; its only relevant passage names a different, fixed vehicle, so word
# overlap says nothing and the untrained model ranks at chance.
MAPPING = dict(zip(ANIMALS, VEHICLES))
QUERY_TEMPLATES = ["my {}", "a big {}", "old {}", "my small red {}"]
PASSAGE = "the {} is here"
GROUPS = len(MAPPING) * len(QUERY_TEMPLATES)  # 32 training groups
BATCH = 8  # one group per distinct positive fits a batch: 4 batches of 8 per epoch
EPOCHS = 8
STEPS = EPOCHS * GROUPS // BATCH
TRAIN_FLAGS = ["--full", "--lr", "5e-3", "--epochs", str(EPOCHS), "--min-steps", "0", "--batch-size", str(BATCH),
               "--hard-negatives", "0", "--max-length", "16", "--device", "cpu", "--seed", "1"]
EVAL_METRICS = ("ndcg@1", "ndcg@3", "ndcg@5", "ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10",
                "map@100")





# ---------------------------------------------------------------- shared models, data and the training run


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mapping_data(tmp_path_factory) -> dict[str, Path]:
    """train.jsonl (query groups without negatives) and a BEIR folder test/ for the animal -> vehicle task."""
    folder = tmp_path_factory.mktemp("mapping")
    groups = [QueryGroup(template.format(animal), (PASSAGE.format(vehicle),))
              for animal, vehicle in MAPPING.items() for template in QUERY_TEMPLATES]
    assert len(groups) == GROUPS
    write_query_groups(folder / "train.jsonl", groups)
    animals = list(MAPPING)
    write_beir(folder / "test",
               corpus={f"d{i}": PASSAGE.format(MAPPING[a]) for i, a in enumerate(animals)},
               queries={f"q{i}": f"my {a}" for i, a in enumerate(animals)},
               qrels={f"q{i}": {f"d{i}": 1} for i in range(len(animals))})
    return {"train": folder / "train.jsonl", "eval": folder / "test"}


@pytest.fixture(scope="module")
def trained(still_bert_dir, mapping_data, tmp_path_factory) -> Path:
    """`train embedding --full` on the mapping task, evaluated every epoch: OUT folder."""
    out = tmp_path_factory.mktemp("emb-train") / "out"
    code = main(["train", "embedding", "--model", still_bert_dir, "--train", str(mapping_data["train"]),
                 "--eval", str(mapping_data["eval"]), "--output", str(out), *TRAIN_FLAGS])
    assert code == 0
    return out


# ---------------------------------------------------------------- 1. training really learns


def test_tuned_model_solves_what_the_base_model_cannot(trained, tiny_bert_dir, mapping_data, tmp_path, capsys):
    model = str(trained / "best")
    evaldir = tmp_path / "eval" / "report"
    code, out, err = run(capsys, "eval", "retrieval", "--model", model, "--compare", tiny_bert_dir,
                         "--data", mapping_data["eval"], "--output", evaldir, "--device", "cpu")
    assert code == 0, err
    assert f"wrote {evaldir}/metrics.json, report.md, retrieval.png" in out

    results = json.loads((evaldir / "metrics.json").read_text(encoding="utf-8"))
    assert list(results) == [model, tiny_bert_dir]
    tuned, base = results[model], results[tiny_bert_dir]
    assert tuned["ndcg@10"] >= 0.9, tuned
    assert base["ndcg@10"] < 0.6, base
    for metrics in (tuned, base):
        assert set(EVAL_METRICS) <= set(metrics)
        assert all(0.0 <= metrics[k] <= 1.0 for k in EVAL_METRICS)
        assert metrics["recall@100"] == 1.0  # 8 passages: every relevant one is retrieved
    # the same model on the same data as the evaluation during training
    recorded = json.loads((trained / "metrics.json").read_text(encoding="utf-8"))["best"]
    for k in EVAL_METRICS:
        assert tuned[k] == pytest.approx(recorded[k], abs=1e-6), k

    report = (evaldir / "report.md").read_text(encoding="utf-8")
    assert report.startswith(f"# Retrieval: {mapping_data['eval']}")
    assert model in report and tiny_bert_dir in report and "change" in report
    row = next(line for line in report.splitlines() if line.startswith("| ndcg@10 |"))
    assert f"{tuned['ndcg@10']:.4f}" in row and f"{base['ndcg@10']:.4f}" in row
    assert f"{tuned['ndcg@10'] - base['ndcg@10']:+.4f}" in row
    assert (evaldir / "retrieval.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "| ndcg@10 |" in out  # the report is printed too


# ---------------------------------------------------------------- 2. the output folder, --cached, Matryoshka


def test_train_writes_config_checkpoints_and_metrics(trained, still_bert_dir, mapping_data, capsys):
    config = yaml.safe_load((trained / "config.yaml").read_text(encoding="utf-8"))
    assert config["model"] == still_bert_dir
    assert config["train"] == str(mapping_data["train"])
    assert config["eval"] == str(mapping_data["eval"])
    assert config["output"] == str(trained)
    assert config["full"] is True and config["resume"] is False and config["cached"] is False
    assert config["lr"] == pytest.approx(5e-3)
    assert (config["epochs"], config["batch_size"], config["hard_negatives"], config["max_length"],
            config["seed"], config["device"]) == (float(EPOCHS), BATCH, 0, 16, 1, "cpu")
    assert config["temperature"] == pytest.approx(0.05)  # defaults are resolved too
    assert config["matryoshka_dims"] is None

    for name in ("best", "last"):
        folder = trained / name
        meta = json.loads((folder / "qtune.json").read_text(encoding="utf-8"))
        assert meta["task"] == "embedding"
        assert meta["pooling"] == "cls"  # no sentence-transformers pooling config: [CLS]
        assert meta["adapter"] is False  # --full
        assert meta["max_length"] == 16
        assert meta["base_model"] == still_bert_dir
        assert meta["query_instruction"] is None  # BERT queries carry no instruction
        # an embedder's own fields only: no classifier labels, no reranker threshold
        assert set(meta) == {"task", "base_model", "adapter", "max_length", "pooling", "query_instruction",
                             "qtune_version"}
        assert (folder / "model.safetensors").is_file()
        assert not (folder / "adapter_config.json").exists()
        assert (folder / "tokenizer_config.json").is_file()
    assert (trained / "last" / "trainer_state.pt").stat().st_size > 0

    metrics = json.loads((trained / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["best_metric"] == "ndcg@10"
    history = metrics["history"]
    assert [h["step"] for h in history] == list(range(STEPS // EPOCHS, STEPS + 1, STEPS // EPOCHS))  # every epoch
    assert [h["epoch"] for h in history] == [float(e) for e in range(1, EPOCHS + 1)]
    for entry in history:
        assert set(EVAL_METRICS) <= set(entry)
        assert all(0.0 <= entry[k] <= 1.0 for k in EVAL_METRICS)
    assert metrics["best"]["ndcg@10"] == max(h["ndcg@10"] for h in history)
    assert metrics["last"] == history[-1]
    assert metrics["train"]["steps"] == STEPS
    assert metrics["train"]["samples"] == EPOCHS * GROUPS
    assert history[-1]["ndcg@10"] > history[0]["ndcg@10"]  # it kept learning after the first epoch


@pytest.mark.parametrize("grad_accum, min_steps, steps, epochs", [
    (1, 10, 10, [1.0, 2.0, 2.5]),  # 4 steps an epoch: two epochs and half of a third
    (2, 5, 5, [1.0, 2.0, 2.5]),  # 2 steps an epoch (2 batches each): the same batches
    (1, 3, 4, [1.0]),  # --epochs already gives more steps: --min-steps changes nothing
])
def test_min_steps_trains_more_epochs_of_small_data(still_bert_dir, mapping_data, tmp_path, capsys, grad_accum,
                                                    min_steps, steps, epochs):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "embedding", "--model", still_bert_dir, "--train",
                            mapping_data["train"], "--eval", mapping_data["eval"], "--output", str(out),
                            "--epochs", "1", "--batch-size", str(BATCH), "--grad-accum", str(grad_accum),
                            "--min-steps", str(min_steps), "--max-length", "16", "--device", "cpu",
                            "--report-to", "none")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["train"]["steps"] == steps
    assert [h["epoch"] for h in metrics["history"]] == epochs  # evaluated at every epoch's end and the last step
    assert metrics["best"]["ndcg@10"] == max(h["ndcg@10"] for h in metrics["history"])
    said = f"training {steps} steps ({epochs[-1]:.2f} epochs, --min-steps {min_steps}"
    assert (said in stdout) == (epochs[-1] > 1)


def test_resume_may_switch_gradcache(still_bert_dir, mapping_data, tmp_path, capsys):
    """GradCache gives the plain batch's gradients: a resume may add it or change its mini-batch (as
    the memory check may choose on another machine), saying so."""
    out = tmp_path / "run"
    common = ["train", "embedding", "--model", still_bert_dir, "--train", mapping_data["train"], "--output", str(out),
              "--batch-size", str(BATCH), "--max-length", "16", "--device", "cpu", "--report-to", "none",
              "--min-steps", "0"]
    code, _, err = run(capsys, *common, "--epochs", "1")
    assert code == 0, err
    code, stdout, err = run(capsys, *common, "--epochs", "2", "--cached", "--mini-batch-size", "4", "--resume")
    assert code == 0, err
    assert "resuming with --epochs 2 (saved: 1), --cached on (saved: off), --mini-batch-size 4 (saved: 32)" in stdout
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["train"]["steps"] == 2 * GROUPS // BATCH


def test_cached_training_gives_the_model_of_plain_training(still_bert_dir, mapping_data, tmp_path, capsys):
    """GradCache computes the same gradients in mini-batches, so (LoRA, no dropout anywhere, same
    seed) both runs end with the same weights, hence the same embeddings."""
    common = ["train", "embedding", "--model", still_bert_dir, "--train", mapping_data["train"], "--lr", "5e-3",
              "--epochs", "2", "--min-steps", "0", "--batch-size", str(BATCH), "--hard-negatives", "0",
              "--max-length", "16", "--no-full", "--lora-dropout", "0", "--logging-steps", "1", "--device", "cpu", "--seed", "3"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    code, _, err = run(capsys, *common, "--output", plain)
    assert code == 0, err
    code, out, err = run(capsys, *common, "--output", cached, "--cached", "--mini-batch-size", "2")
    assert code == 0, err
    assert f"done: {cached}" in out

    config = yaml.safe_load((cached / "config.yaml").read_text(encoding="utf-8"))
    assert (config["cached"], config["mini_batch_size"], config["full"]) == (True, 2, False)
    metrics = json.loads((cached / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["train"]["steps"] == 2 * GROUPS // BATCH
    losses = train_losses(cached)
    assert len(losses) == 2 * GROUPS // BATCH and all(math.isfinite(v) for v in losses)
    np.testing.assert_allclose(losses, train_losses(plain), atol=1e-4)

    texts = ["my cat", "old tiger", PASSAGE.format("car"), PASSAGE.format("tram"), "a big dog"]
    base = qtune.load(still_bert_dir, task="embedding", device="cpu").embed(texts)
    vectors = {}
    for name, folder in (("plain", plain), ("cached", cached)):
        meta = json.loads((folder / "last" / "qtune.json").read_text(encoding="utf-8"))
        assert meta["adapter"] is True
        vectors[name] = qtune.load(folder / "last", device="cpu").embed(texts)
    assert np.abs(vectors["plain"] - base).max() > 5e-3  # training moved the model
    np.testing.assert_allclose(vectors["cached"], vectors["plain"], atol=1e-4)


def test_matryoshka_dims_run(still_bert_dir, mapping_data, tmp_path, capsys):
    out = tmp_path / "matryoshka"
    code, stdout, err = run(capsys, "train", "embedding", "--model", still_bert_dir, "--train", mapping_data["train"],
                            "--eval", mapping_data["eval"], "--output", out, "--matryoshka-dims", "16",
                            "--epochs", "1", "--min-steps", "0", "--batch-size", str(BATCH), "--hard-negatives",
                            "0", "--max-length", "16", "--device", "cpu", "--seed", "1")
    assert code == 0, err
    assert re.search(r"best ndcg@10: .*ndcg@10=\d\.\d{4}", stdout), stdout
    assert yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))["matryoshka_dims"] == [16]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["train"]["steps"] == GROUPS // BATCH
    assert 0.0 <= metrics["best"]["ndcg@10"] <= 1.0
    assert all(math.isfinite(v) for v in train_losses(out))
    vectors = qtune.load(out / "best", device="cpu").embed(["my cat", "my dog"], dimensions=16)
    assert vectors.shape == (2, 16)

    code, _, err = run(capsys, "train", "embedding", "--model", still_bert_dir, "--train", mapping_data["train"],
                       "--output", tmp_path / "too-wide", "--matryoshka-dims", "64", "--hard-negatives", "0",
                       "--device", "cpu")
    assert_user_error(code, err, "--matryoshka-dims", "32 dimensions")
    assert not (tmp_path / "too-wide").exists()  # refused before config.yaml is written


# ---------------------------------------------------------------- 3. mine


MINE_CORPUS = ([PASSAGE.format(v) for v in VEHICLES] + [f"a red {v} is there now" for v in VEHICLES[:4]]
               + [PASSAGE.format("car")])  # the last line repeats a positive under another id


@pytest.fixture(scope="module")
def mine_inputs(tmp_path_factory) -> dict[str, Path]:
    """Queries with positives, a one-passage-per-line corpus and the same corpus as BEIR corpus.jsonl."""
    folder = tmp_path_factory.mktemp("mine")
    queries = [{"query": f"my {a}", "pos": [PASSAGE.format(v)]} for a, v in list(MAPPING.items())[:6]]
    queries.append({"query": "old tiger", "pos": [PASSAGE.format("tram"), "a red car is there now"]})
    # every passage but one is a positive: this query cannot get two negatives
    queries.append({"query": "my mouse", "pos": [p for p in MINE_CORPUS if p != PASSAGE.format("boat")]})
    write_lines(folder / "queries.jsonl", *(json.dumps(q) for q in queries))
    write_lines(folder / "corpus.txt", *MINE_CORPUS)
    write_beir(folder / "beir", corpus={f"doc-{i}": p for i, p in enumerate(MINE_CORPUS)},
               queries={"x": "my cat"}, qrels={"x": {"doc-0": 1}})
    return {"queries": folder / "queries.jsonl", "txt": folder / "corpus.txt",
            "beir": folder / "beir" / "corpus.jsonl"}


def _mine(capsys, model, inputs, corpus: str, output: Path, *extra):
    return run(capsys, "mine", "--model", model, "--queries", inputs["queries"], "--corpus", inputs[corpus],
               "--output", output, "--range-min", "1", "--range-max", "6", "--num-negatives", "2",
               "--device", "cpu", *extra)


def _shortfall(stdout: str) -> int:
    match = re.search(r"mined 2 negatives for (\d+)/(\d+) queries; (\d+) got fewer", stdout)
    assert match, stdout
    full, total, fewer = map(int, match.groups())
    assert full + fewer == total
    return fewer


@pytest.mark.parametrize("corpus", ["txt", "beir"])
def test_mine_writes_valid_negatives(corpus, trained, mine_inputs, tmp_path, capsys):
    output = tmp_path / "mined.jsonl"
    code, out, err = _mine(capsys, trained / "best", mine_inputs, corpus, output)
    assert code == 0, err
    assert f"wrote {output}" in out

    source = read_jsonl(mine_inputs["queries"])
    records = read_jsonl(output)
    assert [(r["query"], r["pos"]) for r in records] == [(q["query"], q["pos"]) for q in source]
    for record in records:
        assert set(record) == {"query", "pos", "neg", "pos_scores", "neg_scores"}
        assert (len(record["pos_scores"]), len(record["neg_scores"])) == (len(record["pos"]), len(record["neg"]))
        assert len(record["neg"]) <= 2
        assert len(set(record["neg"])) == len(record["neg"])
        assert set(record["neg"]) <= set(MINE_CORPUS)
        assert not set(record["neg"]) & set(record["pos"])  # also not the repeated copy of a positive
    assert records[-1]["neg"] in ([], [PASSAGE.format("boat")])
    fewer = sum(len(r["neg"]) < 2 for r in records)
    assert _shortfall(out) == fewer >= 1
    assert fewer < len(records)  # most queries did get two: the checks above are not vacuous


def test_mine_swift_format(trained, mine_inputs, tmp_path, capsys):
    flag_output, swift_output = tmp_path / "mined.jsonl", tmp_path / "swift.jsonl"
    code, _, err = _mine(capsys, trained / "best", mine_inputs, "txt", flag_output)
    assert code == 0, err
    code, _, err = _mine(capsys, trained / "best", mine_inputs, "txt", swift_output, "--format", "swift")
    assert code == 0, err

    # one line per positive, each with the query's negatives (left out when there are none)
    expected = []
    for group in read_jsonl(flag_output):
        for positive in group["pos"]:
            expected.append({"query": group["query"], "response": positive,
                             **({"rejected_response": group["neg"]} if group["neg"] else {})})
    records = read_jsonl(swift_output)
    assert records == expected
    assert any("rejected_response" in r for r in records)
    for record in records:
        assert set(record) <= {"query", "response", "rejected_response"}


def test_mine_random_sampling_is_seeded(trained, mine_inputs, tmp_path, capsys):
    outputs = [tmp_path / "r1.jsonl", tmp_path / "r2.jsonl"]
    for output in outputs:
        code, out, err = _mine(capsys, trained / "best", mine_inputs, "txt", output, "--sampling", "random",
                               "--seed", "1")
        assert code == 0, err
        records = read_jsonl(output)
        assert _shortfall(out) == sum(len(r["neg"]) < 2 for r in records)
        for record in records:
            assert len(record["neg"]) <= 2 and set(record["neg"]) <= set(MINE_CORPUS)
            assert not set(record["neg"]) & set(record["pos"])
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    assert any(r["neg"] for r in read_jsonl(outputs[0]))


def test_mine_refuses_a_csv_output(mine_inputs, tmp_path, capsys):
    output = tmp_path / "mined.csv"
    code, _, err = _mine(capsys, MISSING_MODEL, mine_inputs, "txt", output)
    assert_user_error(code, err, str(output), "JSONL")
    assert not output.exists()


# ---------------------------------------------------------------- 4. data retrieval-split


def _qa_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "context"])
        writer.writerows(rows)
    return path


QA_ROWS = [(f"where is the {a}", f"the {a} is near the {v}") for a, v in MAPPING.items()] + \
          [("what is red", "a red bus, a red car"), ("what is green", "the green tram")]


def test_retrieval_split_writes_train_jsonl_and_beir_test(tmp_path, capsys):
    table = _qa_csv(tmp_path / "qa.csv", QA_ROWS)
    out = tmp_path / "split"
    code, stdout, err = run(capsys, "data", "retrieval-split", table, "--output", out, "--test-fraction", "0.2",
                            "--seed", "7")
    assert code == 0, err
    assert f"wrote {out}/train.jsonl (8 queries) and {out}/test/ (2 queries, 10 passages)" in stdout
    assert "skipped" not in stdout

    train = read_jsonl(out / "train.jsonl")
    test_queries = read_jsonl(out / "test" / "queries.jsonl")
    corpus = read_jsonl(out / "test" / "corpus.jsonl")
    assert len(train) == 8 and len(test_queries) == 2 and len(corpus) == 10
    answer = dict(QA_ROWS)
    assert all(r["pos"] == [answer[r["query"]]] and r["neg"] == [] for r in train)
    assert {r["query"] for r in train} | {q["text"] for q in test_queries} == set(answer)
    assert {d["text"] for d in corpus} == set(answer.values())
    doc_text = {d["_id"]: d["text"] for d in corpus}
    qrels = (out / "test" / "qrels" / "test.tsv").read_text(encoding="utf-8").split("\n")
    assert qrels[0] == "query-id\tcorpus-id\tscore"
    judged = {q: doc_text[d] for q, d, _ in (line.split("\t") for line in qrels[1:] if line)}
    assert {q["text"]: judged[q["_id"]] for q in test_queries} == {q["text"]: answer[q["text"]] for q in test_queries}


def test_retrieval_split_empty_question(tmp_path, capsys):
    rows = list(QA_ROWS)
    rows[3] = ("  ", rows[3][1])  # file line 5 (the header is line 1)
    table = _qa_csv(tmp_path / "qa.csv", rows)
    strict = tmp_path / "strict"
    code, _, err = run(capsys, "data", "retrieval-split", table, "--output", strict, "--test-fraction", "0.2")
    assert_user_error(code, err, f"{table}:5", "field 'question'", "empty text")
    assert not strict.exists()

    out = tmp_path / "skipping"
    code, stdout, err = run(capsys, "data", "retrieval-split", table, "--output", out, "--test-fraction", "0.2",
                            "--skip-empty")
    assert code == 0, err
    assert "skipped 1 rows with an empty question or passage" in stdout
    match = re.search(r"train\.jsonl \((\d+) queries\) and .*test/ \((\d+) queries, (\d+) passages\)", stdout)
    assert match, stdout
    n_train, n_test, n_corpus = map(int, match.groups())
    assert n_train + n_test == len(QA_ROWS) - 1
    assert n_corpus == len(QA_ROWS)  # the skipped row's passage stays in the corpus
    assert len(read_jsonl(out / "train.jsonl")) == n_train
    assert len(read_jsonl(out / "test" / "queries.jsonl")) == n_test
    questions = {r["query"] for r in read_jsonl(out / "train.jsonl")}
    questions |= {q["text"] for q in read_jsonl(out / "test" / "queries.jsonl")}
    assert "  " not in questions and len(questions) == len(QA_ROWS) - 1


# ---------------------------------------------------------------- 5. bad input


def _no_positives(tmp: Path, good: dict):
    train = write_lines(tmp / "train.jsonl", json.dumps({"query": "my cat", "pos": ["the car is here"]}),
                        json.dumps({"query": "my dog", "neg": ["the bus is here"]}))
    return ["--train", train, "--eval", good["eval"]], [f"{train}:2", "field 'pos'", "no positive passage"]


def _empty_positives(tmp: Path, good: dict):
    train = write_lines(tmp / "train.jsonl", json.dumps({"query": "my cat", "pos": ["the car is here"]}),
                        json.dumps({"query": "my cow", "pos": ["the truck is here"]}),
                        json.dumps({"query": "my dog", "pos": []}))
    return ["--train", train], [f"{train}:3", "field 'pos'", "no positive passage"]


def _malformed_json(tmp: Path, good: dict):
    train = write_lines(tmp / "train.jsonl", json.dumps({"query": "my cat", "pos": ["the car is here"]}),
                        '{"query": "my dog", "pos": ["the bus is here"]', json.dumps({"query": "a", "pos": ["b"]}))
    # a line-level problem: no single field is at fault
    return ["--train", train], [f"{train}:2", "malformed JSON"]


def _unknown_corpus_id(tmp: Path, good: dict):
    folder = tmp / "beir"
    write_beir(folder, corpus={"d0": "the car is here", "d1": "the bus is here"},
               queries={"q0": "my cat", "q1": "my dog"}, qrels={"q0": {"d0": 1}})
    qrels = folder / "qrels" / "test.tsv"
    qrels.write_text(qrels.read_text(encoding="utf-8") + "q1\td9\t1\n", encoding="utf-8")
    return ["--train", good["train"], "--eval", folder], [f"{qrels}:3", "field 'corpus-id'", "'d9'"]


@pytest.mark.parametrize("case", [_no_positives, _empty_positives, _malformed_json, _unknown_corpus_id])
def test_bad_data_is_refused_before_the_model_loads(case, mapping_data, tmp_path, capsys):
    data_args, parts = case(tmp_path, mapping_data)
    assert_refused_before_the_model_loads(capsys, "embedding", data_args, tmp_path / "out", *parts)


def test_good_data_gets_as_far_as_the_missing_model(mapping_data, tmp_path, capsys):
    """The control for the test above: with valid data the same command fails on the model."""
    assert_data_accepted_up_to_the_model(capsys, "embedding", ["--train", mapping_data["train"], "--eval", mapping_data["eval"]], tmp_path / "out")


def test_mined_negatives_left_unused_by_the_default_are_announced(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    write_query_groups(train, [QueryGroup("my cat", ("the car is here",), ("the bus is here",)),
                               QueryGroup("my dog", ("the bus is here",))])
    notice = f"{train} has mined negatives; --hard-negatives 0 (the default) trains on in-batch negatives only"
    for flags, announced in (([], True), (["--hard-negatives", "1"], False)):
        code, out, err = run(capsys, "train", "embedding", "--model", MISSING_MODEL, "--train", train,
                             "--output", tmp_path / "out", "--device", "cpu", *flags)
        assert_user_error(code, err, MISSING_MODEL)  # the notice comes before the model loads
        assert (notice in out) is announced, out
    plain = tmp_path / "plain.jsonl"
    write_query_groups(plain, [QueryGroup("my cat", ("the car is here",))])
    code, out, err = run(capsys, "train", "embedding", "--model", MISSING_MODEL, "--train", plain,
                         "--output", tmp_path / "out", "--device", "cpu")
    assert_user_error(code, err, MISSING_MODEL)
    assert "mined negatives" not in out


def test_eval_retrieval_without_qrels_names_the_missing_file(tiny_bert_dir, tmp_path, capsys):
    folder = tmp_path / "beir"
    write_beir(folder, corpus={"d0": "the car is here"}, queries={"q0": "my cat"}, qrels={"q0": {"d0": 1}})
    shutil.rmtree(folder / "qrels")
    evaldir = tmp_path / "report"
    code, _, err = run(capsys, "eval", "retrieval", "--model", tiny_bert_dir, "--data", folder,
                       "--output", evaldir, "--device", "cpu")
    assert_user_error(code, err, str(folder / "qrels" / "test.tsv"), "file not found")
    assert not evaldir.exists()


# ---------------------------------------------------------------- 6. the Python API on the trained folder


def test_load_returns_an_embedder_with_unit_float32_rows(trained):
    from qtune.tasks.embedding.model import Embedder

    embedder = qtune.load(trained / "best", device="cpu")
    assert isinstance(embedder, Embedder)
    texts = ["my cat", "old tiger", "my small red horse"]
    vectors = embedder.embed(texts, is_query=True)
    assert vectors.dtype == np.float32 and vectors.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-3  # not a constant model
    # the tuned model puts each animal's query next to its vehicle's passage
    passages = embedder.embed([PASSAGE.format(v) for v in VEHICLES])
    queries = embedder.embed([f"my {a}" for a in ANIMALS], is_query=True)
    assert (np.argmax(queries @ passages.T, axis=1) == np.arange(len(ANIMALS))).mean() >= 0.75
