"""Negative numbers as flag values (qtune.cli's parser): `--lr -1e-4` is the value -1e-4, answered by
the setting's bound check in one line, not taken for a flag with the whole usage printed."""

from __future__ import annotations

import pytest

from support import run
from qtune.cli import build_parser

TRAIN = ["train", "pair-cls", "--model", "m", "--train", "t.csv", "--output", "o"]


@pytest.fixture
def seen(monkeypatch) -> dict:
    """The config `qtune train` would train with (nothing is trained)."""
    captured = {}

    def train(task, config):
        captured["config"] = config
        return {"best_metric": "f1", "best": {}}

    monkeypatch.setattr("qtune.api.train", train)
    return captured


@pytest.mark.parametrize("task, flag, value, line", [
    ("pair-cls", "--lr", "-1e-4", "flags: 'lr' must be > 0, got -0.0001"),
    ("pair-cls", "--learning_rate", "-2E-5", "flags: 'lr' must be > 0, got -2e-05"),
    ("pair-cls", "--epochs", "-1.5", "flags: 'epochs' must be > 0, got -1.5"),
    ("pair-cls", "--batch-size", "-8", "flags: 'batch_size' must be >= 1, got -8"),
    ("pair-cls", "--warmup-ratio", "-.1", "flags: 'warmup_ratio' must be >= 0, got -0.1"),
    ("embedding", "--temperature", "-5e-2", "flags: 'temperature' must be > 0, got -0.05"),
])
def test_a_negative_number_is_answered_by_the_bound_check_in_one_line(capsys, task, flag, value, line):
    code, out, err = run(capsys, "train", task, *TRAIN[2:], flag, value)
    assert code == 2
    assert err == f"qtune: error: {line}\n"
    assert not out


def test_a_negative_number_reaches_a_setting_that_allows_it(capsys, seen):
    code, _, err = run(capsys, "train", "embedding", *TRAIN[2:], "--false-negative-offset", "-5e-2", "--seed", "-3")
    assert code == 0, err
    assert (seen["config"].false_negative_offset, seen["config"].seed) == (-0.05, -3)
    code, _, err = run(capsys, *TRAIN, "--lr=-1e-4")  # the = spelling, as before
    assert code == 2 and err == "qtune: error: flags: 'lr' must be > 0, got -0.0001\n"


def test_hand_written_number_flags_take_negative_numbers():
    args = build_parser().parse_args(["mine", "--model", "m", "--queries", "q.jsonl", "--corpus", "c.jsonl",
                                      "--output", "o.jsonl", "--min-score", "-1e-1", "--relative-margin", "-5E-2"])
    assert (args.min_score, args.relative_margin) == (-0.1, -0.05)
    args = build_parser().parse_args(["kb", "search", "--kb", "kb.db", "a question", "--threshold", "-2.5e-1"])
    assert args.threshold == -0.25


def test_what_is_not_a_value_stays_an_error(capsys):
    # a flag after a flag that takes a value: still that flag's missing value, in the subcommand's usage
    with pytest.raises(SystemExit) as info:
        run(capsys, *TRAIN, "--lr", "--epochs", "2")
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith("usage: qtune train pair-cls ") and "error: argument --lr: expected one argument" in err
    # a number after a switch is not its value
    with pytest.raises(SystemExit):
        run(capsys, *TRAIN, "--full", "-1e-4")
    assert "unrecognized arguments: -1e-4" in capsys.readouterr().err
