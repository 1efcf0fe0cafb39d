"""The `qtune` command line end to end for pair-cls, called in-process through `qtune.cli.main`:
train, eval, predict and export, and outputs that never clobber."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml


from support import assert_user_error, read_jsonl, run

from pair_cls_cases import (PNG_SIGNATURE, PROBE_COLUMNS, TINY, best_predictions, probe_csv, probe_rows,  # noqa: F401
                           read_csv, trained, write_rows)


# ---------------------------------------------------------------- 1. train / eval / predict / export


def test_train_writes_config_checkpoints_metrics_and_logs(trained, tiny_bert_dir, synthetic_files):
    config = yaml.safe_load((trained / "config.yaml").read_text(encoding="utf-8"))
    assert config["lr"] == pytest.approx(0.003)
    assert config["seed"] == 5
    assert config["model"] == tiny_bert_dir
    assert config["train"] == str(synthetic_files["train"])
    assert config["eval"] == str(synthetic_files["eval"])
    assert config["output"] == str(trained)
    assert (config["epochs"], config["batch_size"], config["max_length"], config["device"]) == (1.0, 16, 32, "cpu")
    assert config["full"] is False and config["resume"] is False
    assert config["lora_r"] == 8 and config["scheduler"] == "linear"  # defaults are resolved too
    assert config["labels"] == ["0", "1"]

    for name in ("best", "last"):
        folder = trained / name
        meta = json.loads((folder / "qtune.json").read_text(encoding="utf-8"))
        assert meta["task"] == "pair-cls"
        assert meta["adapter"] is True  # LoRA is the default
        assert meta["labels"] == ["0", "1"]
        assert meta["max_length"] == 32
        assert meta["base_model"] == tiny_bert_dir
        adapter = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        assert adapter["r"] == 8
        assert (folder / "tokenizer.json").is_file()
        assert (folder / "tokenizer_config.json").is_file()
    assert (trained / "last" / "trainer_state.pt").stat().st_size > 0

    metrics = json.loads((trained / "metrics.json").read_text(encoding="utf-8"))
    steps = math.ceil(600 / 16)
    assert [h["step"] for h in metrics["history"]] == [steps]  # evaluated once per epoch
    assert metrics["last"] == metrics["history"][-1]
    assert metrics["best_metric"] == "macro_f1"
    assert metrics["best"]["macro_f1"] == max(h["macro_f1"] for h in metrics["history"])
    assert 0.0 <= metrics["best"]["accuracy"] <= 1.0
    assert metrics["train"]["steps"] == steps
    assert metrics["train"]["samples"] == 600
    assert metrics["train"]["samples_per_s"] > 0

    events = list((trained / "runs").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(trained / "runs"))
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    assert {"train/loss", "train/lr", "eval/macro_f1", "eval/accuracy"} <= set(scalars)
    # step 0: the baseline the verdict compares with (the majority class, for a new head)
    curve = accumulator.Scalars("eval/macro_f1")
    assert [e.step for e in curve] == [0, steps]
    assert curve[0].value == pytest.approx(metrics["baseline"]["macro_f1"])


def test_eval_writes_metrics_report_and_confusion_png(trained, synthetic_files, tmp_path, capsys):
    model = str(trained / "best")
    evaldir = tmp_path / "eval" / "report"
    code, out, err = run(capsys, "eval", "pair-cls", "--model", model, "--data", synthetic_files["eval"],
                         "--output", evaldir, "--device", "cpu")
    assert code == 0, err
    assert "wrote" in out

    results = json.loads((evaldir / "metrics.json").read_text(encoding="utf-8"))
    assert list(results) == [model]
    m = results[model]
    _, rows = read_csv(synthetic_files["eval"])
    matrix = np.asarray(m["confusion_matrix"])
    assert matrix.shape == (2, 2)
    assert matrix.sum() == len(rows) == 200
    # rows of the matrix are the true classes: their sums are the label counts of the file
    assert matrix.sum(axis=1).tolist() == [sum(r["label"] == c for r in rows) for c in ("0", "1")]
    assert m["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert set(m["per_class"]) == {"0", "1"}
    assert [m["per_class"][c]["support"] for c in ("0", "1")] == matrix.sum(axis=1).tolist()
    assert 0.0 <= m["macro_f1"] <= 1.0
    assert 0.0 <= m["best_threshold"] <= 1.0
    # argmax is one of the cuts the threshold search tries, so the best cut is at least as good
    assert m["best_threshold_macro_f1"] >= m["macro_f1"] - 1e-9
    # same model, same data, same encoding as the evaluation during training
    recorded = json.loads((trained / "metrics.json").read_text(encoding="utf-8"))["best"]
    assert m["accuracy"] == pytest.approx(recorded["accuracy"])
    assert m["macro_f1"] == pytest.approx(recorded["macro_f1"])

    report = (evaldir / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# Pair classification")
    assert model in report
    assert f"{m['accuracy']:.4f}" in report
    assert "Confusion matrix" in report
    assert (evaldir / "confusion.png").read_bytes()[:8] == PNG_SIGNATURE


def test_eval_compare_reports_both_models(trained, tiny_bert_dir, synthetic_files, tmp_path, capsys):
    model = str(trained / "best")
    evaldir = tmp_path / "compare"
    code, out, err = run(capsys, "eval", "pair-cls", "--model", model, "--compare", tiny_bert_dir,
                         "--data", synthetic_files["eval"], "--output", evaldir, "--device", "cpu")
    assert code == 0, err
    results = json.loads((evaldir / "metrics.json").read_text(encoding="utf-8"))
    assert list(results) == [model, tiny_bert_dir]
    for metrics in results.values():
        assert np.asarray(metrics["confusion_matrix"]).sum() == 200
        assert 0.0 <= metrics["accuracy"] <= 1.0
    report = (evaldir / "report.md").read_text(encoding="utf-8")
    assert f"## {model}" in report and f"## {tiny_bert_dir}" in report
    assert (evaldir / "confusion.png").read_bytes()[:8] == PNG_SIGNATURE


def test_predict_csv_keeps_order_and_columns_and_adds_label_and_probability(best_predictions, probe_rows):
    columns, rows = best_predictions
    assert columns == PROBE_COLUMNS + ["predicted_label", "probability"]
    assert len(rows) == len(probe_rows)
    for row, source in zip(rows, probe_rows):
        assert {c: row[c] for c in PROBE_COLUMNS} == source
        assert row["predicted_label"] in {"0", "1"}
        p = float(row["probability"])
        assert 0.0 <= p <= 1.0
        if abs(p - 0.5) > 1e-5:  # argmax over two classes: "1" exactly when P(1) > 0.5
            assert row["predicted_label"] == ("1" if p > 0.5 else "0")


def test_predict_rows_are_matched_to_their_own_pairs(trained, best_predictions, probe_rows, tmp_path, capsys):
    """Reversed input gives each id the same probability: no row gets another row's prediction."""
    reversed_csv = write_rows(tmp_path / "reversed.csv", probe_rows[::-1], PROBE_COLUMNS)
    output = tmp_path / "reversed.pred.csv"
    code, _, err = run(capsys, "predict", "pair-cls", "--model", trained / "best", "--input", reversed_csv,
                       "--output", output, "--device", "cpu", "--batch-size", "7")
    assert code == 0, err
    _, rows = read_csv(output)
    assert [r["id"] for r in rows] == [r["id"] for r in probe_rows[::-1]]
    expected = {r["id"]: float(r["probability"]) for r in best_predictions[1]}
    # the check below means something only if rows differ (the tiny model's spread is small)
    assert len(set(expected.values())) >= 20
    for row in rows:
        # 6-decimal rounding plus float noise from other batch compositions
        assert float(row["probability"]) == pytest.approx(expected[row["id"]], abs=2e-6)


def test_predict_jsonl_output(trained, best_predictions, probe_csv, probe_rows, tmp_path, capsys):
    output = tmp_path / "pred.jsonl"
    code, out, err = run(capsys, "predict", "pair-cls", "--model", trained / "best", "--input", probe_csv,
                         "--output", output, "--device", "cpu")
    assert code == 0, err
    assert f"wrote 40 predictions to {output}" in out
    records = read_jsonl(output)
    assert len(records) == len(probe_rows)
    for record, source, csv_row in zip(records, probe_rows, best_predictions[1]):
        assert list(record) == PROBE_COLUMNS + ["predicted_label", "probability"]
        assert {c: record[c] for c in PROBE_COLUMNS} == source
        assert isinstance(record["probability"], float) and 0.0 <= record["probability"] <= 1.0
        assert record["predicted_label"] == csv_row["predicted_label"]
        assert record["probability"] == pytest.approx(float(csv_row["probability"]), abs=1e-6)


def test_predict_input_without_header_or_label(trained, best_predictions, probe_rows, tmp_path, capsys):
    bare = write_rows(tmp_path / "bare.csv", probe_rows, ["sentence1", "sentence2"], header=False)
    assert bare.read_text(encoding="utf-8").splitlines()[0].split(",") == [probe_rows[0]["sentence1"],
                                                                           probe_rows[0]["sentence2"]]
    output = tmp_path / "bare.pred.csv"
    code, _, err = run(capsys, "predict", "pair-cls", "--model", trained / "best", "--input", bare,
                       "--output", output, "--device", "cpu")
    assert code == 0, err
    columns, rows = read_csv(output)
    assert columns == ["sentence1", "sentence2", "predicted_label", "probability"]
    assert len(rows) == len(probe_rows)  # the first line is data, not a header
    for row, source, labelled in zip(rows, probe_rows, best_predictions[1]):
        assert (row["sentence1"], row["sentence2"]) == (source["sentence1"], source["sentence2"])
        assert row["predicted_label"] == labelled["predicted_label"]
        assert float(row["probability"]) == pytest.approx(float(labelled["probability"]), abs=1e-5)


@pytest.mark.parametrize(("threshold", "label"), [("0", "1"), ("1.01", "0")])
def test_predict_threshold_decides_the_label(threshold, label, trained, probe_csv, tmp_path, capsys):
    output = tmp_path / "pred.csv"
    code, _, err = run(capsys, "predict", "pair-cls", "--model", trained / "best", "--input", probe_csv,
                       "--output", output, "--threshold", threshold, "--device", "cpu")
    assert code == 0, err
    _, rows = read_csv(output)
    assert len(rows) == 40
    assert {r["predicted_label"] for r in rows} == {label}


def test_export_predicts_like_the_adapter_checkpoint(trained, best_predictions, probe_csv, tmp_path, capsys):
    merged = tmp_path / "merged"
    code, out, err = run(capsys, "export", "--model", trained / "best", "--output", merged)
    assert code == 0, err
    assert str(merged) in out
    meta = json.loads((merged / "qtune.json").read_text(encoding="utf-8"))
    assert meta["adapter"] is False and meta["labels"] == ["0", "1"] and meta["max_length"] == 32
    assert (merged / "config.json").is_file()
    assert not (merged / "adapter_config.json").exists()

    output = tmp_path / "merged.pred.csv"
    code, _, err = run(capsys, "predict", "pair-cls", "--model", merged, "--input", probe_csv,
                       "--output", output, "--device", "cpu")
    assert code == 0, err
    _, rows = read_csv(output)
    expected = best_predictions[1]
    assert len(rows) == len(expected)
    for row, ref in zip(rows, expected):
        assert row["id"] == ref["id"]
        assert float(row["probability"]) == pytest.approx(float(ref["probability"]), abs=1e-5)
        if abs(float(ref["probability"]) - 0.5) > 1e-5:
            assert row["predicted_label"] == ref["predicted_label"]


# ---------------------------------------------------------------- outputs never clobber, settings are checked


def test_predicting_a_prediction_file_replaces_the_columns(trained, probe_csv, tmp_path, capsys):
    first, second = tmp_path / "p1.csv", tmp_path / "p2.csv"
    for source, target in ((probe_csv, first), (first, second)):
        code, _, err = run(capsys, "predict", "pair-cls", "--model", trained / "best", "--input", source,
                           "--output", target, "--device", "cpu")
        assert code == 0, err
    columns, rows = read_csv(second)
    assert columns == [*PROBE_COLUMNS, "predicted_label", "probability"]
    assert [r["probability"] for r in rows] == [r["probability"] for r in read_csv(first)[1]]


@pytest.mark.parametrize("target", ["non-empty", "the run itself"])
def test_export_refuses_a_folder_that_holds_files(target, trained, tmp_path, capsys):
    if target == "non-empty":
        folder = tmp_path / "precious"
        folder.mkdir()
        (folder / "notes.txt").write_text("keep me", encoding="utf-8")
    else:
        folder = trained
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    code, _, err = run(capsys, "export", "--model", trained / "best", "--output", folder)
    assert_user_error(code, err, "already exists and is not empty")
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    assert not list(folder.parent.glob(f".{folder.name}.*"))


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "'batch_size' must be >= 1"),
    ("--lr", "-1", "'lr' must be > 0"),
    ("--epochs", "0", "'epochs' must be > 0"),
    ("--grad-accum", "0", "'grad_accum' must be >= 1"),
    ("--warmup-ratio", "1", "'warmup_ratio' must be < 1"),
    ("--lora-dropout", "1.5", "'lora_dropout' must be < 1"),
])
def test_out_of_range_settings_are_refused_before_anything_is_written(flag, value, message, tiny_bert_dir,
                                                                       synthetic_files, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, "train", "pair-cls", "--model", tiny_bert_dir, "--train", synthetic_files["train"],
                       "--output", out, *TINY, flag, value)
    assert_user_error(code, err, message)
    assert not out.exists()
