"""`qtune train|eval|predict classify` end to end on the tiny BERT: training learns a rule only
training can teach; eval writes metrics.json, report.md and confusion.png; predict writes every
row, in order, with its predicted label and that label's probability."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import qtune
from classify_helpers import LABELS, synthetic_texts, write_csv, write_jsonl
from support import assert_user_error, read_jsonl, run, write_lines
from qtune.cli import main

CHECK = ["a cow is here", "my old red bus", "the plane now", "goat", "a big green truck there", "tram"]
EXPECTED = ["farm", "road", "travel", "farm", "road", "travel"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("classify-data")
    return {"train": write_csv(folder / "train.csv", synthetic_texts(300, seed=1)),
            "eval": write_csv(folder / "eval.csv", synthetic_texts(150, seed=2))}


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, data, tmp_path_factory):
    """`qtune train classify`: full fine-tuning, labels from the training file."""
    output = tmp_path_factory.mktemp("classify-run") / "run"
    code = main(["train", "classify", "--model", tiny_bert_dir, "--train", str(data["train"]), "--eval",
                 str(data["eval"]), "--output", str(output), "--full", "--epochs", "5", "--lr", "1e-2",
                 "--batch-size", "32", "--max-length", "16", "--device", "cpu", "--logging-steps", "50"])
    assert code == 0
    return output


def test_training_learns_a_rule_only_training_can_teach(trained, tiny_bert_dir, data):
    before = qtune.evaluate("classify", model=tiny_bert_dir, data=str(data["eval"]), device="cpu")[tiny_bert_dir]
    assert before["accuracy"] < 0.6  # an untrained head is near chance (1/3)
    metrics = json.loads((trained / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["best_metric"] == "macro_f1"
    assert metrics["best"]["accuracy"] >= 0.95 and metrics["best"]["macro_f1"] >= 0.95
    assert json.loads((trained / "best" / "qtune.json").read_text(encoding="utf-8"))["labels"] == LABELS
    assert (trained / "config.yaml").is_file() and (trained / "last").is_dir()
    clf = qtune.load(trained / "best", device="cpu")
    assert [p.label for p in clf.predict(CHECK)] == EXPECTED


def test_eval_writes_metrics_report_and_confusion_png(trained, tiny_bert_dir, data, tmp_path, capsys):
    best, report = trained / "best", tmp_path / "report"
    code, out, err = run(capsys, "eval", "classify", "--model", best, "--data", data["eval"], "--output", report,
                         "--device", "cpu")
    assert code == 0, err
    results = json.loads((report / "metrics.json").read_text(encoding="utf-8"))
    metrics = results[str(best)]
    recorded = json.loads((trained / "metrics.json").read_text(encoding="utf-8"))["best"]
    assert metrics["accuracy"] == pytest.approx(recorded["accuracy"]) and metrics["accuracy"] >= 0.95
    assert metrics["macro_f1"] == pytest.approx(recorded["macro_f1"])
    assert list(metrics["per_class"]) == LABELS
    for row in metrics["per_class"].values():
        assert set(row) == {"precision", "recall", "f1", "support"}
        assert 0.9 <= row["f1"] <= 1.0
    matrix = metrics["confusion_matrix"]
    assert len(matrix) == 3 and all(len(r) == 3 for r in matrix) and sum(map(sum, matrix)) == 150
    assert [sum(r) for r in matrix] == [metrics["per_class"][lab]["support"] for lab in LABELS]
    text = (report / "report.md").read_text(encoding="utf-8")
    assert text.startswith(f"# Text classification: {data['eval']}")
    for part in ("| accuracy |", "| macro_f1 |", "| class | precision | recall | f1 | support |", "| farm |",
                 "Confusion matrix (rows: true, columns: predicted)"):
        assert part in text
    assert (report / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.startswith("# Text classification:") and f"wrote {report}/metrics.json" in out

    # --compare: a base model side by side, its labels taken from the file
    code, out, err = run(capsys, "eval", "classify", "--model", best, "--compare", tiny_bert_dir,
                         "--data", data["eval"], "--device", "cpu")
    assert code == 0, err
    assert str(best) in out and tiny_bert_dir in out


@pytest.fixture(scope="module")
def expected(trained):
    clf = qtune.load(trained / "best", device="cpu")
    return clf.predict(CHECK)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_predict_writes_every_row_in_order_with_label_and_probability(suffix, trained, expected, tmp_path,
                                                                      capsys):
    # extra columns are kept, an old prediction is replaced, a label column is not needed
    rows = [{"id": i, "text": t, "predicted_label": "old", "note": "x" * i} for i, t in enumerate(CHECK)]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    output = tmp_path / f"out{suffix}"
    code, out, err = run(capsys, "predict", "classify", "--model", trained / "best", "--input", source,
                         "--output", output, "--device", "cpu", "--batch-size", "4")
    assert code == 0, err
    assert out.strip() == f"wrote {len(CHECK)} predictions to {output}"
    if suffix == ".jsonl":
        written = read_jsonl(output)
    else:
        with open(output, encoding="utf-8", newline="") as f:
            written = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        assert list(written[0]) == ["id", "text", "note", "predicted_label", "probability"]
    assert [str(r["id"]) for r in written] == [str(i) for i in range(len(CHECK))]
    assert [r["text"] for r in written] == CHECK
    assert [r["predicted_label"] for r in written] == [p.label for p in expected] == EXPECTED
    assert [float(r["probability"]) for r in written] == [round(p.probability, 6) for p in expected]


def test_predict_a_headerless_file_and_another_text_column(trained, expected, tmp_path, capsys):
    headerless = write_lines(tmp_path / "in.csv", *CHECK)  # one column: the text, by position
    code, _, err = run(capsys, "predict", "classify", "--model", trained / "best", "--input", headerless,
                       "--output", tmp_path / "a.jsonl", "--device", "cpu")
    assert code == 0, err
    assert [r["predicted_label"] for r in read_jsonl(tmp_path / "a.jsonl")] == EXPECTED
    named = write_jsonl(tmp_path / "in.jsonl", [{"utterance": t} for t in CHECK])
    code, _, err = run(capsys, "predict", "classify", "--model", trained / "best", "--input", named,
                       "--output", tmp_path / "b.jsonl", "--text-column", "utterance", "--device", "cpu")
    assert code == 0, err
    assert [r["utterance"] for r in read_jsonl(tmp_path / "b.jsonl")] == CHECK
    assert [r["probability"] for r in read_jsonl(tmp_path / "b.jsonl")] == [round(p.probability, 6) for p in expected]


def test_int8_predicts_the_trained_labels(trained, expected, tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in CHECK])
    code, _, err = run(capsys, "predict", "classify", "--model", trained / "best", "--input", source,
                       "--output", tmp_path / "out.jsonl", "--quantize", "int8")
    assert code == 0, err
    written = read_jsonl(tmp_path / "out.jsonl")
    assert [r["predicted_label"] for r in written] == EXPECTED
    np.testing.assert_allclose([r["probability"] for r in written], [p.probability for p in expected], atol=0.02)


def test_eval_refuses_a_model_of_another_task_before_loading_it(trained, data, tmp_path, capsys):
    import shutil

    other = tmp_path / "pairs"
    shutil.copytree(trained / "best", other)
    meta = json.loads((other / "qtune.json").read_text(encoding="utf-8"))
    (other / "qtune.json").write_text(json.dumps({**meta, "task": "pair-cls"}), encoding="utf-8")
    code, _, err = run(capsys, "eval", "classify", "--model", other, "--data", data["eval"], "--device", "cpu")
    assert_user_error(code, err, f"'{other}' was trained for pair-cls, not classify")
