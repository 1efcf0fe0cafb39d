"""The `qtune` command line end to end, called in-process through `qtune.cli.main`.

One tiny BERT run (module fixture) feeds the eval, predict and export tests; bad input must
stop with exit code 2, a "file:line, field" message and nothing written.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from qtune.cli import main

from conftest import MISSING_MODEL, assert_user_error, read_jsonl, run, synthetic_pairs, write_pairs_csv

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--epochs", "1", "--batch-size", "16", "--max-length", "32", "--device", "cpu"]



def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)




# ---------------------------------------------------------------- shared runs and inputs


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, synthetic_files, tmp_path_factory) -> Path:
    """One LoRA run of the tiny BERT through the CLI: OUT folder."""
    out = tmp_path_factory.mktemp("cli-train") / "out"
    code = main(["train", "pair-cls", "--model", tiny_bert_dir, "--train", str(synthetic_files["train"]),
                 "--eval", str(synthetic_files["eval"]), "--output", str(out), "--lr", "0.003", "--seed", "5",
                 "--logging-steps", "5", *TINY])
    assert code == 0
    return out


PROBE_COLUMNS = ["id", "sentence1", "sentence2", "label", "note"]


@pytest.fixture(scope="module")
def probe_rows() -> list[dict]:
    """Rows with extra columns (an id, a label, a note with commas, quotes and CJK) to be kept as they are."""
    return [{"id": f"r{i:02d}", "sentence1": a, "sentence2": b, "label": str(y), "note": f'note "{i}", 第{i}行'}
            for i, (a, b, y) in enumerate(synthetic_pairs(40, seed=11))]


def write_rows(path: Path, rows: list[dict], columns: list[str], header: bool = True) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(columns)
        writer.writerows([row[c] for c in columns] for row in rows)
    return path


@pytest.fixture(scope="module")
def probe_csv(probe_rows, tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("probe") / "probe.csv", probe_rows, PROBE_COLUMNS)


@pytest.fixture(scope="module")
def best_predictions(trained, probe_csv, tmp_path_factory) -> tuple[list[str], list[dict]]:
    """`predict pair-cls --model OUT/best` on the probe CSV: (columns, rows)."""
    output = tmp_path_factory.mktemp("pred") / "pred.csv"
    code = main(["predict", "pair-cls", "--model", str(trained / "best"), "--input", str(probe_csv),
                 "--output", str(output), "--device", "cpu"])
    assert code == 0
    return read_csv(output)


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
    assert [e.step for e in accumulator.Scalars("eval/macro_f1")] == [steps]


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


# ---------------------------------------------------------------- 2. YAML recipe + flags


def test_yaml_recipe_with_flags_overriding_it(tiny_bert_dir, tmp_path, capsys):
    train = write_pairs_csv(tmp_path / "small.csv", synthetic_pairs(64, seed=3))
    output = tmp_path / "from-yaml"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": tiny_bert_dir, "train": str(train), "output": str(output),
        "epochs": 1, "lr": 0.001, "batch_size": 8, "max_length": 24, "seed": 7,
        "lora-r": 4, "lora_alpha": 16, "scheduler": "cosine", "group_by_length": False, "device": "cpu",
    }), encoding="utf-8")
    code, _, err = run(capsys, "train", "pair-cls", "--config", recipe, "--lr", "0.0005", "--batch-size", "16",
                       "--max-length", "32", "--group-by-length")
    assert code == 0, err

    config = yaml.safe_load((output / "config.yaml").read_text(encoding="utf-8"))
    # flags win
    assert config["lr"] == pytest.approx(0.0005)
    assert config["batch_size"] == 16
    assert config["max_length"] == 32
    assert config["group_by_length"] is True
    # the recipe holds where no flag was given (a dashed key included)
    assert config["seed"] == 7
    assert config["lora_r"] == 4
    assert config["lora_alpha"] == 16
    assert config["scheduler"] == "cosine"
    assert config["epochs"] == 1.0
    assert config["model"] == tiny_bert_dir and config["train"] == str(train) and config["output"] == str(output)
    # defaults where neither said anything
    assert config["weight_decay"] == pytest.approx(0.01)
    assert config["eval"] is None

    # the resolved values were really used, not just written down
    assert json.loads((output / "best" / "qtune.json").read_text(encoding="utf-8"))["max_length"] == 32
    adapter = json.loads((output / "best" / "adapter_config.json").read_text(encoding="utf-8"))
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 16)
    metrics = json.loads((output / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["train"]["steps"] == math.ceil(64 / 16)


# ---------------------------------------------------------------- 3. data stats


def test_data_stats_json_and_plot(tiny_qwen_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from qtune.tasks.pair_cls.encode import PairEncoder

    pairs = synthetic_pairs(30, seed=4)
    pairs += [("怎么修改我的登录密码？", "我忘记了密码，如何重置", 1),
              ("花呗的还款日可以推迟几天吗，我这个月工资晚发了，实在是还不上", "借呗提前还款有没有手续费", 0),
              ("a", "b", 0)]
    data = write_pairs_csv(tmp_path / "stats.csv", pairs)
    plot = tmp_path / "plots" / "lengths.png"
    code, out, err = run(capsys, "data", "stats", data, "--model", tiny_qwen_dir, "--json", "--plot", plot)
    assert code == 0, err
    summary = json.loads(out)

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    encoder = PairEncoder(tokenizer, is_decoder=True, max_length=None)
    lengths = np.array([len(encoder.encode(a, b)["input_ids"]) for a, b, _ in pairs])
    assert summary["rows"] == len(pairs)
    assert summary["max"] == int(lengths.max())
    assert summary["min"] == int(lengths.min())
    for p in (50, 90, 95, 99):
        assert summary[f"p{p}"] == int(np.percentile(lengths, p, method="higher"))
    assert summary["p50"] <= summary["p90"] <= summary["p95"] <= summary["p99"] <= summary["max"]
    suggested = summary["suggested_max_length"]
    assert suggested % 8 == 0 and summary["p99"] <= suggested < summary["p99"] + 8
    assert summary["rows_truncated_at_suggestion"] == int((lengths > suggested).sum())
    assert plot.read_bytes()[:8] == PNG_SIGNATURE


# ---------------------------------------------------------------- 4. bad input


def _lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _missing_label(tmp: Path, good: dict):
    train = _lines(tmp / "train.csv", "sentence1,sentence2", "a cat,a dog", "my car,the bus")
    return ["--train", train], [f"{train}:2", "field 'label'", "missing column"]


def _empty_sentence2(tmp: Path, good: dict):
    train = _lines(tmp / "train.csv", "sentence1,sentence2,label", "a cat,a dog,1", "my car,,0", "a bus,a tram,1")
    return ["--train", train], [f"{train}:3", "field 'sentence2'", "empty text"]


def _label_outside_set(tmp: Path, good: dict):
    train = _lines(tmp / "train.csv", "sentence1,sentence2,label", "a cat,a dog,1", "my car,a cow,0",
                   "a bus,a tram,2")
    return ["--train", train], [f"{train}:4", "field 'label'", "'2'"]


def _too_many_fields(tmp: Path, good: dict):
    train = _lines(tmp / "train.csv", "sentence1,sentence2,label", "a cat,a dog,1", "my car,a cow,0,extra",
                   "a bus,a tram,1")
    # a row-level problem: no single field is at fault, the message gives the counts
    return ["--train", train], [f"{train}:3", "expected 3 CSV fields, found 4"]


def _malformed_jsonl(tmp: Path, good: dict):
    train = _lines(tmp / "train.jsonl", '{"sentence1": "a cat", "sentence2": "a dog", "label": "1"}',
                   '{"sentence1": "my car", "sentence2": "a cow", "label": ',
                   '{"sentence1": "a bus", "sentence2": "a tram", "label": "1"}')
    return ["--train", train], [f"{train}:2", "malformed JSON"]


def _bad_eval_row(tmp: Path, good: dict):
    evalfile = _lines(tmp / "eval.csv", "sentence1,sentence2,label", "a cat,a dog,1", "my car,a cow,0",
                      "a bus,a tram,1", "the goat,my sheep,yes")
    return ["--train", good["train"], "--eval", evalfile], [f"{evalfile}:5", "field 'label'", "'yes'"]


@pytest.mark.parametrize("case", [_missing_label, _empty_sentence2, _label_outside_set, _too_many_fields,
                                  _malformed_jsonl, _bad_eval_row], ids=lambda f: f.__name__.strip("_"))
def test_train_bad_data_stops_before_the_model_and_writes_nothing(case, synthetic_files, tmp_path, capsys):
    data_args, parts = case(tmp_path, synthetic_files)
    output = tmp_path / "out"
    code, out, err = run(capsys, "train", "pair-cls", "--model", MISSING_MODEL, *data_args, "--output", output,
                         *TINY)
    assert_user_error(code, err, *parts)
    # the data was checked first: the missing model never came up
    assert MISSING_MODEL not in err and "cannot load" not in err
    if case is _bad_eval_row:
        assert str(synthetic_files["train"]) not in err
    assert not output.exists()
    assert out == ""


def test_predict_empty_text_writes_nothing(tmp_path, capsys):
    data = _lines(tmp_path / "input.csv", "sentence1,sentence2", "a cat,a dog", "my car,a cow", ",a tram",
                  "the goat,my sheep")
    output = tmp_path / "preds" / "out.csv"
    code, _, err = run(capsys, "predict", "pair-cls", "--model", MISSING_MODEL, "--input", data,
                       "--output", output, "--device", "cpu")
    assert_user_error(code, err, f"{data}:4", "field 'sentence1'", "empty text")
    assert MISSING_MODEL not in err
    assert not output.exists() and not output.parent.exists()


def test_predict_unsupported_output_type_writes_nothing(trained, probe_csv, tmp_path, capsys):
    output = tmp_path / "out.xlsx"
    code, _, err = run(capsys, "predict", "pair-cls", "--model", trained / "best", "--input", probe_csv,
                       "--output", output, "--device", "cpu")
    assert_user_error(code, err, str(output), "unsupported file type '.xlsx'")
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["empty-folder", "missing-path"])
def test_train_unknown_model_is_a_clean_error(kind, synthetic_files, tmp_path, capsys):
    if kind == "empty-folder":
        model = tmp_path / "not-a-model"
        model.mkdir()
    else:
        model = Path(MISSING_MODEL)
    output = tmp_path / "out"
    code, _, err = run(capsys, "train", "pair-cls", "--model", model, "--train", synthetic_files["train"],
                       "--output", output, *TINY)
    assert_user_error(code, err, "cannot load", str(model))
    assert not output.exists()


def test_resume_without_a_run_is_an_error(tiny_bert_dir, synthetic_files, tmp_path, capsys):
    output = tmp_path / "fresh"
    code, _, err = run(capsys, "train", "pair-cls", "--model", tiny_bert_dir, "--train", synthetic_files["train"],
                       "--output", output, "--resume", *TINY)
    assert_user_error(code, err, "nothing to resume", str(output / "last" / "trainer_state.pt"))
    assert not output.exists()


def test_training_into_an_existing_run_is_refused_and_leaves_it_alone(trained, tiny_bert_dir, synthetic_files,
                                                                      capsys):
    files = ["best/qtune.json", "best/adapter_model.safetensors", "metrics.json", "config.yaml",
             "last/trainer_state.pt"]
    before = {name: (trained / name).read_bytes() for name in files}
    listing = sorted(p.relative_to(trained) for p in trained.rglob("*"))
    code, _, err = run(capsys, "train", "pair-cls", "--model", tiny_bert_dir, "--train", synthetic_files["train"],
                       "--eval", synthetic_files["eval"], "--output", trained, "--lr", "0.01", *TINY)
    assert_user_error(code, err, str(trained), "already holds a run", "--resume")
    assert {name: (trained / name).read_bytes() for name in files} == before
    assert sorted(p.relative_to(trained) for p in trained.rglob("*")) == listing


# ---------------------------------------------------------------- 5. plateau schedule


def _plateau_lrs(values, lr, patience, factor, threshold=1e-4, eps=1e-8):
    """ReduceLROnPlateau(mode="max", threshold_mode="rel") applied to the evaluation values."""
    best, bad = -math.inf, 0
    for value in values:
        if best == -math.inf or value > best * (1 + threshold):
            best, bad = value, 0
        else:
            bad += 1
        if bad > patience:
            new = lr * factor
            if lr - new > eps:
                lr = new
            bad = 0
    return lr


def test_plateau_scheduler_with_eval_steps(tiny_bert_dir, synthetic_files, tmp_path, capsys):
    lr = 0.002
    output = tmp_path / "plateau"
    code, out, err = run(capsys, "train", "pair-cls", "--model", tiny_bert_dir, "--train", synthetic_files["train"],
                         "--eval", synthetic_files["eval"], "--output", output, "--scheduler", "plateau",
                         "--eval-steps", "2", "--plateau-patience", "0", "--plateau-factor", "0.5",
                         "--lr", str(lr), "--logging-steps", "1", "--epochs", "2", "--batch-size", "16",
                         "--max-length", "32", "--device", "cpu")
    assert code == 0, err
    assert "done:" in out

    metrics = json.loads((output / "metrics.json").read_text(encoding="utf-8"))
    steps_per_epoch = math.ceil(600 / 16)  # 38
    total = 2 * steps_per_epoch
    history = metrics["history"]
    assert len(history) == total // 2 == 38  # one entry per evaluation
    assert [h["step"] for h in history] == list(range(2, total + 1, 2))
    assert history[-1]["epoch"] == 2.0
    assert metrics["train"]["steps"] == total
    assert metrics["best"]["macro_f1"] == max(h["macro_f1"] for h in history)
    assert yaml.safe_load((output / "config.yaml").read_text(encoding="utf-8"))["scheduler"] == "plateau"

    # The schedule is stepped once per evaluation with its macro-F1, and nowhere else: the LR
    # logged at each step is what ReduceLROnPlateau makes of the evaluations before it.
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    state = torch.load(output / "last" / "trainer_state.pt", weights_only=False)
    assert state["scheduler"]["last_epoch"] == len(history)
    accumulator = EventAccumulator(str(output / "runs"))
    accumulator.Reload()
    logged = {e.step: e.value for e in accumulator.Scalars("train/lr")}
    assert sorted(logged) == list(range(1, total + 1))
    for step, value in logged.items():
        before = [h["macro_f1"] for h in history if h["step"] < step]
        assert value == pytest.approx(_plateau_lrs(before, lr, patience=0, factor=0.5), rel=1e-5), step
    assert min(logged.values()) < lr  # the plateau really cut the LR
    final = _plateau_lrs([h["macro_f1"] for h in history], lr, patience=0, factor=0.5)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(final, rel=1e-6)


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
