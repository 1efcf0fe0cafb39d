"""Config dataclasses: the settings shared by every task's training (`TrainConfig`) and inference
(`InferenceConfig`) commands, and how YAML recipes (configs/*.yaml) and CLI flags are generated
from them. Each task's own config lives in `qtune/tasks/<task>/config.py`.

Precedence: dataclass defaults < `--config YAML` < flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import yaml

from qtune.errors import QtuneError


def is_integer(value: Any) -> bool:
    """An integer (numpy's too), and not a bool: JSON's and YAML's `true` is no count or length."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def opt(default: Any, help: str, choices: tuple | None = None, required: bool = False,
         low: float | None = None, low_open: bool = False, high: float | None = None, high_open: bool = False,
         count: int | None = None, metavar: tuple | str | None = None, flag: str | bool = True,
         shown: Callable[[Any], str] = str, negatable: bool = True, parse: Callable[[str], Any] | None = None,
         also: tuple[str, ...] = ()):
    """A setting; `low`/`high` bound numbers (`*_open`: the bound itself is not allowed); `count`:
    a list setting takes exactly this many values. For its command-line flag (`add_config_flags`):
    `flag` names it when it is not the setting's name with - for _ (False: no flag, a setting of
    the Python API only); `shown` writes the default in --help (e.g. `"{:g} ms".format`); a true/false
    setting with `negatable=False` has no --no- form and --help names no default (the flag turns it on);
    `parse` turns a flag's text (or a string in a YAML recipe) into the value where the type alone
    does not (e.g. a number or "off"), raising ValueError with what it expected; `also`: more flag
    names, shown beside the flag (e.g. "absolute-margin")."""
    meta = {"help": help, "choices": choices, "required": required,
            "bounds": (low, low_open, high, high_open), "count": count, "metavar": metavar,
            "flag": flag, "shown": shown, "negatable": negatable, "parse": parse, "also": also}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class TrainConfig:
    """Settings every training task shares."""

    model: str = opt("", "base model: hub id, local folder or qtune checkpoint", required=True)
    train: str = opt("", "training data file", required=True)
    eval: str | None = opt(None, "dev data file: evaluated every epoch or --eval-steps to choose best/, stop early "
                           "and compare with the base model (keep your test set out of training: evaluate it "
                           "afterwards with `qtune eval`)")
    dev_fraction: float | None = opt(None, "share of the training data (split by query or text, seeded) held out as "
                                     "the dev set when there is no --eval (default: 0.1, at most 1000, when the data "
                                     "has 200 or more; 0: none)", low=0, high=0.5, high_open=True)
    early_stopping: int = opt(0, "stop after this many evaluations without a better dev figure (0: train to the "
                              "end)", low=0)
    fail_on_regression: bool = opt(False, "exit with code 3 when the tuned model is not better than its base on the "
                                   "dev set")
    output: str = opt("", "output folder (config.yaml, best/, last/, metrics.json, runs/)", required=True)
    epochs: float = opt(3.0, "training epochs (fractions allowed)", low=0, low_open=True)
    min_steps: int = opt(0, "train at least this many optimizer steps: more epochs when --epochs of the data make "
                         "fewer (small data), best/ still chosen on the dev set; 0: exactly --epochs", low=0)
    batch_size: int = opt(32, "training batch size (per optimizer step: times --grad-accum)", low=1)
    eval_batch_size: int = opt(64, "evaluation batch size", low=1)
    grad_accum: int = opt(1, "gradient accumulation steps", low=1)
    lr: float = opt(2e-4, "peak learning rate (AdamW)", low=0, low_open=True)
    weight_decay: float = opt(0.01, "AdamW weight decay", low=0)
    scheduler: str = opt("linear", "learning-rate schedule: linear warmup+decay, cosine, constant, or "
                          "plateau (reduce on eval plateau)", choices=("linear", "cosine", "constant", "plateau"))
    warmup_ratio: float = opt(0.1, "share of steps with a linear warmup (linear, cosine, constant)", low=0,
                               high=1, high_open=True)
    plateau_patience: int = opt(1, "plateau: evaluations without improvement before the LR drops", low=0)
    plateau_factor: float = opt(0.5, "plateau: factor the LR is multiplied by", low=0, low_open=True, high=1,
                                 high_open=True)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)", low=0)
    max_length: int = opt(128, "maximum tokens per example (see `qtune data stats`)", low=4)
    eval_steps: int = opt(0, "evaluate every N optimizer steps (0: once per epoch)", low=0)
    average_from: float = opt(0.0, "also average the trained weights over every optimizer step from this share of "
                              "the run on (0.5: the second half) and score the average on the dev set at the end: "
                              "best/ becomes the average when it scores higher, or always without a dev set "
                              "(0: off)", low=0, high=1, high_open=True)
    logging_steps: int = opt(10, "log training loss every N optimizer steps", low=1)
    seed: int = opt(42, "random seed (data order, initialisation, dropout)")
    full: bool = opt(False, "full fine-tuning instead of LoRA")
    lora_r: int = opt(8, "LoRA rank", low=1)
    lora_alpha: int = opt(32, "LoRA alpha", low=1)
    lora_dropout: float = opt(0.1, "LoRA dropout", low=0, high=1, high_open=True)
    lora_targets: list[str] | None = opt(None, "LoRA target modules (default: the attention projections)")
    precision: str = opt("auto", "auto (bf16 on a GPU that supports it, else fp32), fp32 or bf16",
                          choices=("auto", "fp32", "bf16"))
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    packing: bool = opt(True, "decoders, BERT embedders and cross-encoders: padding-free packed batches "
                        "(same results, no work spent on padding)")
    resume: bool = opt(False, "continue the run saved in --output (last/)")
    report_to: list[str] = opt(["tensorboard"], "experiment trackers for the training loss and eval metrics: "
                               "tensorboard (runs/), wandb, mlflow, swanlab (each its own extra), or none")
    deepspeed: str | None = opt(None, "DeepSpeed config JSON (ZeRO-2/3) for runs under torchrun / accelerate "
                                "launch (needs qtune[deepspeed])")

    # The settings a --resume may give new values: how far the run goes (epochs, early stopping),
    # how it is watched (evaluation and logging cadence, trackers, the exit code) and where it runs.
    # Any other change would make the resumed run another run than the one last/ holds, so
    # `qtune.training.run.check_resumed_settings` refuses it. A task may add its own.
    resume_may_change: ClassVar[frozenset[str]] = frozenset({
        "epochs", "min_steps", "early_stopping", "eval_steps", "eval_batch_size", "logging_steps", "report_to",
        "fail_on_regression", "device"})
    # What a resumed run takes from last/ (its qtune.json: the labels, a reranker's or embedder's
    # instruction) when the setting is not given: left out (None) on resume, it is as saved.
    resume_from_last: ClassVar[frozenset[str]] = frozenset({"labels", "instruction", "query_instruction"})


@dataclass(kw_only=True)
class InferenceConfig:
    """Settings every evaluation and prediction command shares."""

    model: str = opt("", "model: trained folder, exported folder, hub id or local base model", required=True)
    batch_size: int = opt(64, "rows per forward pass", low=1)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    precision: str = opt("auto", "auto: bf16 on a GPU that supports it, else fp32",
                          choices=("auto", "fp32", "bf16"))
    quantize: str | None = opt(None, "int8: run BERT-family encoders on the CPU through ONNX Runtime with int8 "
                                "weights (needs qtune[int8])", choices=("int8",))

    @property
    def load_precision(self) -> str:
        """What the loader is asked for: "int8" exports the fp32 model to ONNX Runtime int8."""
        return "int8" if self.quantize == "int8" else self.precision


def _field_type(cls, f: dataclasses.Field):
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (list, tuple):
        return list, typing.get_args(hint)[0]
    if args and typing.get_origin(args[0]) in (list, tuple):
        return list, typing.get_args(args[0])[0]
    return (args[0] if args else hint), None


# Hugging Face Trainer / sentence-transformers / peft names of training settings, accepted as
# hidden flags (each with - or _), so a command line written for those tools needs no rewording.
TRAIN_FLAG_ALIASES = {
    "model": ("model-name-or-path",),
    "output": ("output-dir",),
    "epochs": ("num-train-epochs",),
    "lr": ("learning-rate",),
    "batch_size": ("per-device-train-batch-size", "train-batch-size"),
    "eval_batch_size": ("per-device-eval-batch-size",),
    "grad_accum": ("gradient-accumulation-steps",),
    "max_length": ("max-seq-length",),
    "scheduler": ("lr-scheduler-type",),
    "lora_targets": ("lora-target-modules",),
}
UNDERSCORES_NOTE = "Also accepted: any flag written with _ for -."
TRAIN_ALIASES_NOTE = ("Also accepted: Hugging Face spellings (--learning-rate, --num-train-epochs, --output-dir, "
                      "--per-device-train-batch-size, --max-seq-length, --gradient-accumulation-steps, ...) and "
                      "any flag written with _ for -.")


def flag_aliases(cls: type, name: str) -> list[str]:
    """The hidden Hugging Face spellings of setting `name`'s flag (a training setting's), each also
    with _ for - (the command line's parser adds that spelling of every shown flag itself)."""
    names = TRAIN_FLAG_ALIASES.get(name, ()) if issubclass(cls, TrainConfig) else ()
    return ["--" + s for n in names for s in dict.fromkeys((n, n.replace("-", "_")))]


def add_config_flags(parser: argparse.ArgumentParser, cls: type, recipe: bool = True) -> None:
    """One flag per field (but those with `flag=False`), plus its hidden aliases (`flag_aliases`),
    which the epilog names. Defaults are left out so only flags the user typed override YAML
    (`recipe`: also a `--config YAML` flag). A field without help text has no help line."""
    if recipe:
        parser.add_argument("--config", help="YAML recipe with any of these settings (flags override it)")
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("flag", True)
        if flag is False:
            continue
        kind, item = _field_type(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        switch = kind is bool and not f.metadata.get("negatable", True)  # turns the setting on, nothing else
        help_text = f.metadata.get("help", "")
        if help_text and default not in (None, "") and not switch:
            help_text += f" (default: {f.metadata.get('shown', str)(default)})"
        settings = dict(dest=f.name, default=argparse.SUPPRESS)
        if switch:
            settings["action"] = "store_true"
        elif kind is bool:
            settings["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            settings.update(nargs=f.metadata.get("count") or "+", type=item,
                            metavar=f.metadata.get("metavar") or f.name.upper())
        else:
            parse = f.metadata.get("parse")
            settings.update(type=_flag_parser(parse) if parse else kind, choices=f.metadata.get("choices"))
            if isinstance(flag, str) and not f.metadata.get("choices"):  # the placeholder follows the flag
                settings["metavar"] = flag.replace("-", "_").upper()
        names = ["--" + (flag if isinstance(flag, str) else f.name.replace("_", "-"))]
        parser.add_argument(*names, *("--" + name for name in f.metadata.get("also", ())), help=help_text,
                            **settings)
        # One action per alias, so an error names the spelling typed. A spelling some other flag
        # already has (a task's own setting) stays that flag's: argparse refuses the duplicate.
        for alias in flag_aliases(cls, f.name):
            try:
                parser.add_argument(alias, help=argparse.SUPPRESS, **settings)
            except argparse.ArgumentError:
                pass
    if issubclass(cls, TrainConfig):
        parser.epilog = TRAIN_ALIASES_NOTE


def _flag_parser(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` as an argparse type: its ValueError becomes argparse's "invalid value" message."""
    def flag_value(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    flag_value.__name__ = getattr(parse, "__name__", "value")
    return flag_value


def load_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise QtuneError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise QtuneError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise QtuneError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type, values: dict, source: str = "config") -> Any:
    """Make a config from a dict of settings, checking names, types and required values."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise QtuneError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(names)}")
    checked = {}
    for name, value in values.items():
        kind, item = _field_type(cls, names[name])
        parse = names[name].metadata.get("parse")
        if parse is not None and isinstance(value, str):  # "off" in a recipe, as on the command line
            try:
                value = parse(value)
            except ValueError as e:
                raise QtuneError(f"{source}: '{name}' {e}") from None
        checked[name] = _coerce(value, kind, item, f"{source}: '{name}'")
        choices = names[name].metadata.get("choices")
        if choices and checked[name] not in choices:
            raise QtuneError(f"{source}: '{name}' must be one of {', '.join(choices)}, got {value!r}")
        _check_bounds(checked[name], names[name].metadata.get("bounds"), f"{source}: '{name}'")
        count = names[name].metadata.get("count")
        if count and checked[name] is not None and len(checked[name]) != count:
            raise QtuneError(f"{source}: '{name}' takes {count} values, got {len(checked[name])}")
    config = cls(**checked)
    missing = [f.name for f in dataclasses.fields(cls) if f.metadata.get("required") and not getattr(config, f.name)]
    if missing:
        raise QtuneError(f"missing required setting(s): {', '.join('--' + m.replace('_', '-') for m in missing)}")
    return config


def _check_bounds(value: Any, bounds: tuple | None, where: str) -> None:
    if value is None or bounds is None or not isinstance(value, (int, float)):
        return
    low, low_open, high, high_open = bounds
    if low is not None and (value < low or (low_open and value == low)):
        raise QtuneError(f"{where} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise QtuneError(f"{where} must be {'<' if high_open else '<='} {high}, got {value!r}")


def _coerce(value: Any, kind: type, item: type | None, where: str) -> Any:
    if value is None:
        return None
    if kind is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item or str, None, where) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise QtuneError(f"{where} must be true or false, got {value!r}")
    if kind in (int, float) and isinstance(value, bool):
        raise QtuneError(f"{where} must be {kind.__name__}, got {value!r}")
    if kind is float and isinstance(value, (int, float)):
        if not math.isfinite(value):  # nan passes every bound check, inf every lower one
            raise QtuneError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if kind is int and isinstance(value, float):
        if not value.is_integer():
            raise QtuneError(f"{where} must be a whole number, got {value!r}")
        return int(value)
    if kind is str:
        if isinstance(value, (list, dict)):
            raise QtuneError(f"{where} must be text, got {value!r}")
        return str(value)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise QtuneError(f"{where} must be {kind.__name__}, got {value!r}") from None


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
    return build_config(cls, values, source=getattr(args, "config", None) or "flags")


def config_to_yaml(config: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True)
