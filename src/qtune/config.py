"""One dataclass per task. YAML recipes (configs/*.yaml) and CLI flags are generated from them.

Precedence: dataclass defaults < `--config YAML` < flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qtune.errors import QtuneError


def _opt(default: Any, help: str, choices: tuple | None = None, required: bool = False,
         low: float | None = None, low_open: bool = False, high: float | None = None, high_open: bool = False):
    """A setting; `low`/`high` bound numbers (`*_open`: the bound itself is not allowed)."""
    meta = {"help": help, "choices": choices, "required": required,
            "bounds": (low, low_open, high, high_open)}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class TrainConfig:
    """Settings every training task shares."""

    model: str = _opt("", "base model: hub id, local folder or qtune checkpoint", required=True)
    train: str = _opt("", "training data file", required=True)
    eval: str | None = _opt(None, "evaluation data file (evaluated every epoch or --eval-steps)")
    output: str = _opt("", "output folder (config.yaml, best/, last/, metrics.json, runs/)", required=True)
    epochs: float = _opt(3.0, "training epochs (fractions allowed)", low=0, low_open=True)
    batch_size: int = _opt(32, "training batch size (per optimizer step: times --grad-accum)", low=1)
    eval_batch_size: int = _opt(64, "evaluation batch size", low=1)
    grad_accum: int = _opt(1, "gradient accumulation steps", low=1)
    lr: float = _opt(2e-4, "peak learning rate (AdamW)", low=0, low_open=True)
    weight_decay: float = _opt(0.01, "AdamW weight decay", low=0)
    scheduler: str = _opt("linear", "learning-rate schedule: linear warmup+decay, cosine, constant, or "
                          "plateau (reduce on eval plateau)", choices=("linear", "cosine", "constant", "plateau"))
    warmup_ratio: float = _opt(0.1, "share of steps with a linear warmup (linear, cosine, constant)", low=0,
                               high=1, high_open=True)
    plateau_patience: int = _opt(1, "plateau: evaluations without improvement before the LR drops", low=0)
    plateau_factor: float = _opt(0.5, "plateau: factor the LR is multiplied by", low=0, low_open=True, high=1,
                                 high_open=True)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: off)", low=0)
    max_length: int = _opt(128, "maximum tokens per example (see `qtune data stats`)", low=4)
    eval_steps: int = _opt(0, "evaluate every N optimizer steps (0: once per epoch)", low=0)
    logging_steps: int = _opt(10, "log training loss every N optimizer steps", low=1)
    seed: int = _opt(42, "random seed (data order, initialisation, dropout)")
    full: bool = _opt(False, "full fine-tuning instead of LoRA")
    lora_r: int = _opt(8, "LoRA rank", low=1)
    lora_alpha: int = _opt(32, "LoRA alpha", low=1)
    lora_dropout: float = _opt(0.1, "LoRA dropout", low=0, high=1, high_open=True)
    lora_targets: list[str] | None = _opt(None, "LoRA target modules (default: the attention projections)")
    precision: str = _opt("auto", "auto (bf16 on a GPU that supports it, else fp32), fp32 or bf16",
                          choices=("auto", "fp32", "bf16"))
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    packing: bool = _opt(True, "decoders: padding-free packed batches (same results, no work spent on padding)")
    resume: bool = _opt(False, "continue the run saved in --output (last/)")


@dataclass(kw_only=True)
class PairClsConfig(TrainConfig):
    """`qtune train pair-cls`: LoRA on a sequence-classification head over sentence pairs."""

    text_columns: list[str] = _opt(["sentence1", "sentence2"], "the two text columns")
    label_column: str = _opt("label", "the label column")
    labels: list[str] = _opt(["0", "1"], "label values in the file, in class order (last = positive)")
    group_by_length: bool = _opt(True, "length-grouped batches (less padding)")
    max_length: int = _opt(128, "maximum tokens per pair, both sentences together", low=4)


@dataclass(kw_only=True)
class EmbeddingConfig(TrainConfig):
    """`qtune train embedding`: InfoNCE over in-batch and mined hard negatives."""

    eval: str | None = _opt(None, "BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv) evaluated during training")
    batch_size: int = _opt(64, "query groups per batch (in-batch negatives grow with it)", low=1)
    lr: float = _opt(2e-4, "peak learning rate (AdamW); about 2e-5 for --full", low=0, low_open=True)
    epochs: float = _opt(1.0, "training epochs (fractions allowed)", low=0, low_open=True)
    max_length: int = _opt(256, "maximum tokens per query or passage", low=4)
    temperature: float = _opt(0.05, "InfoNCE temperature", low=0, low_open=True)
    hard_negatives: int = _opt(7, "mined negatives used per query (0: in-batch negatives only)", low=0)
    false_negative_offset: float | None = _opt(None, "mask in-batch candidates scoring above the positive plus "
                                               "this (Qwen3-Embedding uses 0.1); off when unset")
    cached: bool = _opt(False, "GradCache: same gradients, memory of --mini-batch-size rows")
    mini_batch_size: int = _opt(32, "rows per forward pass with --cached", low=1)
    matryoshka_dims: list[int] | None = _opt(None, "also train these leading dimensions (e.g. 256 128 64)")
    query_instruction: str | None = _opt(None, "instruction for queries (default: the model family's; '' for none)")
    eval_top_k: int = _opt(100, "passages retrieved per query when evaluating", low=1)


@dataclass(kw_only=True)
class RerankerConfig(TrainConfig):
    """`qtune train reranker`: groups of (query, positive, hard negatives), listwise or pointwise."""

    train: str = _opt("", "training groups, JSONL {query, pos, neg} (e.g. `qtune mine` output)", required=True)
    eval: str | None = _opt(None, "held-out groups in the same format; scored by the positive's rank in its group")
    batch_size: int = _opt(8, "query groups per batch (times --group-size pairs)", low=1)
    eval_batch_size: int = _opt(32, "pairs per evaluation batch", low=1)
    lr: float = _opt(1e-4, "peak learning rate (AdamW); about 2e-5 for --full", low=0, low_open=True)
    epochs: float = _opt(1.0, "training epochs (fractions allowed)", low=0, low_open=True)
    max_length: int = _opt(512, "maximum tokens per (query, document) pair, prompt included", low=16)
    group_size: int = _opt(8, "pairs per group: the positive and group_size - 1 negatives", low=2)
    loss: str = _opt("listwise", "listwise: softmax cross-entropy over each group; pointwise: binary "
                     "cross-entropy per pair", choices=("listwise", "pointwise"))
    instruction: str | None = _opt(None, "decoder rerankers: the <Instruct> text (default: the Qwen3-Reranker one)")


@dataclass(kw_only=True)
class ExtractConfig(TrainConfig):
    """`qtune train extract`: supervised fine-tuning of a causal LM to answer with JSON."""

    train: str = _opt("", "training JSONL {instruction, input, output}", required=True)
    eval: str | None = _opt(None, "evaluation JSONL in the same format (generated and scored each evaluation)")
    batch_size: int = _opt(8, "examples per batch", low=1)
    eval_batch_size: int = _opt(16, "prompts per generation batch when evaluating", low=1)
    lr: float = _opt(2e-4, "peak learning rate (AdamW); about 1e-5 for --full", low=0, low_open=True)
    max_length: int = _opt(1024, "maximum tokens per example, prompt and answer together (longer ones are "
                           "left out and reported)", low=8)
    lora_targets: list[str] | None = _opt(None, "LoRA target modules (default: every linear projection, "
                                          "q/k/v/o/gate/up/down)")
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward pass (less memory)")
    instruction: str | None = _opt(None, "instruction for rows without one (default: the most common one "
                                   "in --train)")
    max_new_tokens: int = _opt(256, "evaluation: longest answer generated", low=1)
    group_by_length: bool = _opt(True, "length-grouped batches (less padding)")


TASK_CONFIGS: dict[str, type[TrainConfig]] = {"pair-cls": PairClsConfig, "embedding": EmbeddingConfig,
                                              "reranker": RerankerConfig, "extract": ExtractConfig}


def _field_type(cls, f: dataclasses.Field):
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (list, tuple):
        return list, typing.get_args(hint)[0]
    if args and typing.get_origin(args[0]) in (list, tuple):
        return list, typing.get_args(args[0])[0]
    return (args[0] if args else hint), None


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field. Defaults are left out so only flags the user typed override YAML."""
    parser.add_argument("--config", help="YAML recipe with any of these settings (flags override it)")
    for f in dataclasses.fields(cls):
        kind, item = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "") + ("" if default in (None, "") else f" (default: {default})")
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif kind is list:
            parser.add_argument(flag, nargs="+", type=item, metavar=f.name.upper(), **common)
        else:
            parser.add_argument(flag, type=kind, choices=f.metadata.get("choices"), **common)


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
        checked[name] = _coerce(value, kind, item, f"{source}: '{name}'")
        choices = names[name].metadata.get("choices")
        if choices and checked[name] not in choices:
            raise QtuneError(f"{source}: '{name}' must be one of {', '.join(choices)}, got {value!r}")
        _check_bounds(checked[name], names[name].metadata.get("bounds"), f"{source}: '{name}'")
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
