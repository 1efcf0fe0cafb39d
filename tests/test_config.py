"""Tests for task configs built from dataclass defaults, a YAML recipe and CLI flags (qtune.config)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from qtune.cli import Parser
from qtune.config import add_config_flags, build_config, config_from_args, config_to_yaml, load_yaml
from qtune.errors import QtuneError
from qtune.tasks.pair_cls.config import PairClsConfig

REQUIRED = ["--model", "m", "--train", "train.csv", "--output", "out"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = Parser(prog="qtune train pair-cls")
    add_config_flags(parser, PairClsConfig)
    return parser.parse_args(argv)


def config(argv: list[str]) -> PairClsConfig:
    return config_from_args(PairClsConfig, parse(argv))


def write_yaml(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_with_only_the_required_flags():
    cfg = config(REQUIRED)
    assert isinstance(cfg, PairClsConfig)
    assert (cfg.model, cfg.train, cfg.output) == ("m", "train.csv", "out")
    assert cfg.eval is None
    assert cfg.epochs == 3.0 and type(cfg.epochs) is float
    assert (cfg.batch_size, cfg.eval_batch_size, cfg.grad_accum, cfg.max_length) == (32, 64, 1, 128)
    assert cfg.lr == 2e-4 and cfg.scheduler == "linear" and cfg.precision == "auto"
    assert cfg.group_by_length is True and cfg.full is False and cfg.resume is False
    assert cfg.lora_targets is None
    assert cfg.text_columns == ["sentence1", "sentence2"]
    assert cfg.label_column == "label"
    assert cfg.labels == ["0", "1"]
    assert cfg == PairClsConfig(model="m", train="train.csv", output="out")


def test_list_defaults_are_not_shared_between_configs():
    a, b = config(REQUIRED), config(REQUIRED)
    a.labels.append("2")
    assert b.labels == ["0", "1"]
    assert PairClsConfig(model="m", train="t", output="o").labels == ["0", "1"]


def test_flags_not_given_are_absent_from_the_namespace():
    args = parse(REQUIRED)
    assert not hasattr(args, "epochs") and not hasattr(args, "full")
    assert args.config is None


def test_yaml_values_override_defaults(tmp_path):
    recipe = write_yaml(tmp_path, "epochs: 5\nbatch-size: 8\nlr: 1.0e-3\nscheduler: cosine\nfull: true\n"
                                  "labels: [neg, pos]\neval: dev.jsonl\n")
    cfg = config(REQUIRED + ["--config", str(recipe)])
    assert cfg.epochs == 5.0 and type(cfg.epochs) is float  # an int in YAML becomes a float
    assert cfg.batch_size == 8
    assert cfg.lr == pytest.approx(1e-3)
    assert cfg.scheduler == "cosine"
    assert cfg.full is True
    assert cfg.labels == ["neg", "pos"]
    assert cfg.eval == "dev.jsonl"
    assert cfg.grad_accum == 1  # untouched default


def test_yaml_can_hold_the_required_settings(tmp_path):
    recipe = write_yaml(tmp_path, "model: base\ntrain: a.csv\noutput: runs/x\nlabels: [0, 1]\n")
    cfg = config(["--config", str(recipe)])
    assert (cfg.model, cfg.train, cfg.output) == ("base", "a.csv", "runs/x")
    assert cfg.labels == ["0", "1"]  # YAML ints become the label strings found in files


def test_flags_override_yaml(tmp_path):
    recipe = write_yaml(tmp_path, "model: from-yaml\nepochs: 5\nbatch_size: 8\nfull: true\n"
                                  "text_columns: [a, b]\n")
    cfg = config(["--config", str(recipe), "--model", "from-flag", "--train", "t.csv", "--output", "o",
                  "--epochs", "1.5", "--no-full", "--text-columns", "q1", "q2"])
    assert cfg.model == "from-flag"
    assert cfg.epochs == 1.5
    assert cfg.batch_size == 8  # from YAML, no flag given
    assert cfg.full is False
    assert cfg.text_columns == ["q1", "q2"]


@pytest.mark.parametrize("flags,full,grouped", [([], False, True), (["--full"], True, True),
                                                (["--no-full"], False, True),
                                                (["--no-group-by-length"], False, False),
                                                (["--full", "--no-full"], False, True)])
def test_boolean_flags(flags, full, grouped):
    cfg = config(REQUIRED + flags)
    assert (cfg.full, cfg.group_by_length) == (full, grouped)


def test_list_flags():
    cfg = config(REQUIRED + ["--labels", "a", "b", "c", "--text-columns", "q1", "q2", "--label-column", "y",
                             "--lora-targets", "q_proj", "v_proj"])
    assert cfg.labels == ["a", "b", "c"]
    assert cfg.text_columns == ["q1", "q2"]
    assert cfg.label_column == "y"
    assert cfg.lora_targets == ["q_proj", "v_proj"]


def test_typed_flags():
    cfg = config(REQUIRED + ["--batch-size", "4", "--lr", "3e-5", "--scheduler", "plateau", "--seed", "0",
                             "--eval", "dev.csv", "--precision", "bf16"])
    assert cfg.batch_size == 4 and type(cfg.batch_size) is int
    assert cfg.lr == 3e-5
    assert cfg.scheduler == "plateau"
    assert cfg.seed == 0
    assert cfg.eval == "dev.csv"
    assert cfg.precision == "bf16"


def test_bad_flag_value_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit):
        parse(REQUIRED + ["--scheduler", "step"])
    assert "invalid choice: 'step'" in capsys.readouterr().err


def test_unknown_yaml_key(tmp_path):
    recipe = write_yaml(tmp_path, "epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(QtuneError) as info:
        config(REQUIRED + ["--config", str(recipe)])
    message = str(info.value)
    assert message.startswith(f"{recipe}: unknown setting(s) learning_rate;")
    assert "known: model, train" in message


@pytest.mark.parametrize("line,name,expected", [
    ("epochs: abc", "epochs", "must be float, got 'abc'"),
    ("batch_size: many", "batch_size", "must be int, got 'many'"),
    ("epochs: [1, 2]", "epochs", "must be float, got [1, 2]"),
    ("full: 'yes'", "full", "must be true or false, got 'yes'"),
    ("group_by_length: 1", "group_by_length", "must be true or false, got 1"),
])
def test_wrong_type_in_yaml(tmp_path, line, name, expected):
    recipe = write_yaml(tmp_path, line + "\n")
    with pytest.raises(QtuneError) as info:
        config(REQUIRED + ["--config", str(recipe)])
    assert str(info.value) == f"{recipe}: '{name}' {expected}"


@pytest.mark.parametrize("line,name", [
    ("batch_size: 2.5", "batch_size"),   # silently truncated to 2
    ("batch_size: true", "batch_size"),  # silently becomes 1
    ("lr: true", "lr"),                  # silently becomes 1.0
])
def test_yaml_numbers_reject_fractions_and_booleans(tmp_path, line, name):
    recipe = write_yaml(tmp_path, line + "\n")
    with pytest.raises(QtuneError, match=f"'{name}' must be"):
        config(REQUIRED + ["--config", str(recipe)])


def test_numeric_strings_in_yaml_are_converted(tmp_path):
    recipe = write_yaml(tmp_path, "epochs: '2'\nbatch_size: '16'\n")
    cfg = config(REQUIRED + ["--config", str(recipe)])
    assert (cfg.epochs, cfg.batch_size) == (2.0, 16)


def test_choice_outside_the_allowed_ones(tmp_path):
    recipe = write_yaml(tmp_path, "scheduler: exponential\n")
    with pytest.raises(QtuneError) as info:
        config(REQUIRED + ["--config", str(recipe)])
    assert str(info.value) == (f"{recipe}: 'scheduler' must be one of linear, cosine, constant, plateau, "
                               "got 'exponential'")


def test_missing_required_model():
    with pytest.raises(QtuneError) as info:
        config(["--train", "t.csv", "--output", "o"])
    assert str(info.value) == "missing required setting(s): --model"


def test_missing_all_required():
    with pytest.raises(QtuneError) as info:
        config([])
    assert str(info.value) == "missing required setting(s): --model, --train, --output"


def test_empty_required_value_in_yaml_counts_as_missing(tmp_path):
    recipe = write_yaml(tmp_path, "model: ''\n")
    with pytest.raises(QtuneError, match="--model"):
        config(["--config", str(recipe), "--train", "t", "--output", "o"])


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(QtuneError) as info:
        config(REQUIRED + ["--config", str(path)])
    assert str(info.value) == f"{path}: config file not found"


def test_invalid_yaml(tmp_path):
    recipe = write_yaml(tmp_path, "epochs: [1\n")
    with pytest.raises(QtuneError, match="invalid YAML"):
        load_yaml(recipe)


def test_yaml_that_is_not_a_mapping(tmp_path):
    recipe = write_yaml(tmp_path, "- epochs\n- 3\n")
    with pytest.raises(QtuneError) as info:
        load_yaml(recipe)
    assert str(info.value) == f"{recipe}: expected a mapping of settings, got list"


def test_empty_yaml_is_no_settings(tmp_path):
    assert load_yaml(write_yaml(tmp_path, "")) == {}
    assert load_yaml(write_yaml(tmp_path, "# only a comment\n", "c.yaml")) == {}


def test_yaml_keys_with_dashes_are_normalised(tmp_path):
    assert load_yaml(write_yaml(tmp_path, "batch-size: 4\nlora-r: 16\n")) == {"batch_size": 4, "lora_r": 16}


def test_build_config_names_its_source():
    with pytest.raises(QtuneError, match=r"^flags: unknown setting\(s\) bogus;"):
        build_config(PairClsConfig, {"model": "m", "train": "t", "output": "o", "bogus": 1}, source="flags")


def test_config_to_yaml_round_trip(tmp_path):
    cfg = config(REQUIRED + ["--epochs", "0.5", "--labels", "different", "same", "--full", "--eval", "dev.csv",
                             "--lora-targets", "query", "value", "--scheduler", "constant"])
    text = config_to_yaml(cfg)
    data = yaml.safe_load(text)
    assert list(data) == [f.name for f in dataclasses.fields(PairClsConfig)]
    assert build_config(PairClsConfig, data) == cfg
    # and through a file, as `--config <output>/config.yaml`
    recipe = write_yaml(tmp_path, text)
    assert config(["--config", str(recipe)]) == cfg


def test_config_to_yaml_round_trip_of_defaults():
    cfg = config(REQUIRED)
    data = yaml.safe_load(config_to_yaml(cfg))
    assert data["eval"] is None and data["lora_targets"] is None
    assert build_config(PairClsConfig, data) == cfg


# ── Hugging Face spellings and underscores: hidden aliases of the generated flags ──

@pytest.mark.parametrize("flag, value, name, expected", [
    ("--learning-rate", "1e-4", "lr", 1e-4), ("--learning_rate", "1e-4", "lr", 1e-4),
    ("--num-train-epochs", "2", "epochs", 2.0), ("--num_train_epochs", "2", "epochs", 2.0),
    ("--output-dir", "elsewhere", "output", "elsewhere"), ("--output_dir", "elsewhere", "output", "elsewhere"),
    ("--per-device-train-batch-size", "8", "batch_size", 8), ("--per_device_train_batch_size", "8", "batch_size", 8),
    ("--per-device-eval-batch-size", "16", "eval_batch_size", 16),
    ("--max-seq-length", "64", "max_length", 64), ("--max_seq_length", "64", "max_length", 64),
    ("--gradient-accumulation-steps", "4", "grad_accum", 4), ("--gradient_accumulation_steps", "4", "grad_accum", 4),
    ("--warmup_ratio", "0.2", "warmup_ratio", 0.2), ("--weight_decay", "0.1", "weight_decay", 0.1),
    ("--max_grad_norm", "0.5", "max_grad_norm", 0.5), ("--lr-scheduler-type", "cosine", "scheduler", "cosine"),
    ("--label_column", "y", "label_column", "y"), ("--model-name-or-path", "other", "model", "other"),
])
def test_hugging_face_spellings_and_underscores_set_the_same_setting(flag, value, name, expected):
    cfg = config(REQUIRED + [flag, value])
    assert getattr(cfg, name) == expected
    assert type(getattr(cfg, name)) is type(expected)


def test_aliases_of_booleans_and_lists():
    cfg = config(REQUIRED + ["--no-group_by_length", "--text_columns", "a", "b", "--lora-target-modules", "q"])
    assert (cfg.group_by_length, cfg.text_columns, cfg.lora_targets) == (False, ["a", "b"], ["q"])


def test_aliases_are_checked_like_the_flag_they_stand_for(capsys):
    with pytest.raises(SystemExit):
        parse(REQUIRED + ["--learning_rate", "fast"])
    assert "argument --learning_rate: invalid float value: 'fast'" in capsys.readouterr().err
    with pytest.raises(QtuneError, match="'lr' must be > 0"):
        config(REQUIRED + ["--learning-rate", "0"])


def test_aliases_stay_out_of_the_option_list_of_help():
    parser = Parser(prog="qtune train pair-cls")
    add_config_flags(parser, PairClsConfig)
    text = parser.format_help()
    options, _, epilog = text.partition("Also accepted")
    assert "--lr LR" in options and "--epochs EPOCHS" in options
    for alias in ("--learning-rate", "--learning_rate", "--num-train-epochs", "--output_dir", "--warmup_ratio",
                  "--no-group_by_length"):
        assert alias not in options
    assert "--learning-rate" in epilog and "_ for -" in epilog  # one short note, not one line per alias
    assert len(epilog.splitlines()) <= 4


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--weight-decay", "nan"),
                                         ("--warmup-ratio", "-inf")])
def test_a_setting_that_is_not_a_finite_number_is_refused(flag, value):
    # nan passes every bound check (every comparison is false) and inf every lower one
    with pytest.raises(QtuneError) as info:
        config(REQUIRED + [f"{flag}={value}"])
    name = flag[2:].replace("-", "_")
    assert str(info.value) == f"flags: '{name}' must be a finite number, got {float(value)!r}"


def test_a_recipe_value_that_is_not_a_finite_number_is_refused(tmp_path):
    recipe = write_yaml(tmp_path, "lr: .nan\n")
    with pytest.raises(QtuneError) as info:
        config(REQUIRED + ["--config", str(recipe)])
    assert str(info.value) == f"{recipe}: 'lr' must be a finite number, got nan"


def test_is_integer_takes_numpy_integers_and_refuses_bools_and_floats():
    import numpy as np

    from qtune.config import is_integer

    assert is_integer(3) and is_integer(np.int64(3)) and is_integer(-1)
    assert not is_integer(True) and not is_integer(3.0) and not is_integer("3") and not is_integer(None)
