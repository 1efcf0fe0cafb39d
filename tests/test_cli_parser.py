"""Mistyped flags: the error names the subcommand, shows its usage and suggests the flag that was
meant; Hugging Face spellings of training flags are accepted (qtune.cli's parser)."""

from __future__ import annotations

import pytest

from support import run

TOP_USAGE = "usage: qtune [-h] [--version] COMMAND"
TRAIN = ["train", "pair-cls", "--model", "m", "--train", "t.csv", "--output", "o"]


def parse_error(capsys, *argv) -> str:
    """stderr of a command line the parser refuses (exit status 2)."""
    with pytest.raises(SystemExit) as info:
        run(capsys, *argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("typo, meant", [
    ("--learnig-rate", "--lr"), ("--lerning_rate", "--lr"), ("--epoch-count", "--epochs"),
    ("--ouput", "--output"), ("--batchsize", "--batch-size"), ("--grad-acum", "--grad-accum"),
    ("--max-lenght", "--max-length"),
])
def test_a_mistyped_training_flag_shows_the_subcommand_usage_and_the_flag_meant(capsys, typo, meant):
    err = parse_error(capsys, *TRAIN, typo, "3")
    assert err.startswith("usage: qtune train pair-cls "), err
    assert TOP_USAGE not in err
    assert f"qtune train pair-cls: error: unrecognized arguments: {typo} 3 (did you mean {meant}?)" in err


def test_flags_of_hand_written_subcommands_are_suggested_too(capsys, tmp_path):
    err = parse_error(capsys, "kb", "search", "--kb", tmp_path / "kb.db", "a question", "--topk", "3")
    assert err.startswith("usage: qtune kb search "), err
    assert "unrecognized arguments: --topk 3 (did you mean --top-k?)" in err
    err = parse_error(capsys, "export", "--model", "a", "--output", "b", "stray")
    assert err.startswith("usage: qtune export ") and err.rstrip().endswith("unrecognized arguments: stray")
    err = parse_error(capsys, "data", "stats", "f.csv", "--model", "m", "--zzzz")
    assert err.startswith("usage: qtune data stats ") and err.rstrip().endswith("unrecognized arguments: --zzzz")


def test_several_mistyped_flags_are_each_answered(capsys):
    err = parse_error(capsys, *TRAIN, "--learnig-rate", "1e-4", "--ouput-folder", "x")
    assert ("unrecognized arguments: --learnig-rate 1e-4 --ouput-folder x (did you mean --lr for --learnig-rate, "
            "--output for --ouput-folder?)") in err


def test_hugging_face_spellings_reach_the_training_config(capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr("qtune.api.train", lambda task, config: seen.setdefault("config", config) and {
        "best_metric": "f1", "best": {}})
    code, out, err = run(capsys, "train", "pair-cls", "--model_name_or_path", "m", "--train", "t.csv",
                         "--output_dir", "o", "--learning_rate", "3e-5", "--num_train_epochs", "2",
                         "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                         "--max_seq_length", "96", "--warmup_ratio", "0.05", "--weight_decay", "0.0", "--seed", "7")
    assert code == 0, err
    config = seen["config"]
    assert (config.model, config.output, config.lr, config.epochs, config.batch_size) == ("m", "o", 3e-5, 2.0, 4)
    assert (config.grad_accum, config.max_length, config.warmup_ratio, config.weight_decay, config.seed) == (
        2, 96, 0.05, 0.0, 7)


def test_every_flag_takes_its_underscore_spelling_and_a_prefix_of_one_setting(capsys, monkeypatch, tmp_path):
    from qtune.cli import build_parser

    args = build_parser().parse_args(["kb", "search", "--kb", "k.db", "q", "--top_k", "3"])
    assert args.top_k == 3
    args = build_parser().parse_args(["data", "retrieval-split", "t.csv", "--output", "o", "--test_fraction", "0.2",
                                      "--question_column", "q", "--skip_empty"])
    assert (args.test_fraction, args.question_column, args.skip_empty) == (0.2, "q", True)
    # a prefix of --output (and its alias --output_dir) only is --output; argparse alone calls it ambiguous
    args = build_parser().parse_args(["train", "embedding", "--model", "m", "--train", "t.jsonl", "--out", "o",
                                      "--learning-r=2e-5", "--no-memory_c"])
    assert (args.output, args.lr, args.memory_check) == ("o", 2e-5, False)
    err = parse_error(capsys, "kb", "search", "--kb", "k.db", "q", "--t", "3")
    assert err.rstrip().endswith("error: ambiguous option: --t could match --token, --top-k, --threshold"), err


def test_a_required_flag_is_met_by_its_underscore_spelling_and_missed_by_name():
    from qtune.cli import Parser

    parser = Parser(prog="tool")
    parser.add_argument("--input-file", required=True)
    assert parser.parse_args(["--input_file", "a"]).input_file == "a"
    assert parser.parse_args(["--input-file", "b"]).input_file == "b"
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert "--input_file" not in parser.format_help() and "--input-file INPUT_FILE" in parser.format_help()


@pytest.mark.parametrize("task, extra, min_steps", [
    ("embedding", ["--train", "g.jsonl"], 200),  # the measured embedding recipe: at least 200 optimizer steps
    ("pair-cls", ["--train", "t.csv"], 0),  # other tasks train exactly --epochs
])
def test_embeddings_train_at_least_200_steps_by_default(capsys, monkeypatch, task, extra, min_steps):
    seen = {}
    monkeypatch.setattr("qtune.api.train", lambda task, config: seen.setdefault("config", config) and {
        "best_metric": "ndcg@10", "best": {}})
    code, out, err = run(capsys, "train", task, "--model", "m", "--output", "o", *extra)
    assert code == 0, err
    assert seen["config"].min_steps == min_steps
