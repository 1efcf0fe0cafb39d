"""The pair-cls command line: YAML recipes and flags, `data stats`, bad input (exit code 2, a
"file:line, field" message and nothing written) and the plateau schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml


from support import MISSING_MODEL, assert_user_error, run, synthetic_pairs, write_pairs_csv

from pair_cls_cases import (PNG_SIGNATURE, PROBE_COLUMNS, TINY, best_predictions, probe_csv, probe_rows,  # noqa: F401
                           read_csv, trained, write_rows)


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
