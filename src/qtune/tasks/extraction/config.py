"""Settings of `qtune train|eval|predict extract` (and `qtune extract`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qtune.config import InferenceConfig, TrainConfig, opt
from qtune.modeling.loading import SavedSettings, check_optional_text


@dataclass(kw_only=True)
class ExtractConfig(TrainConfig):
    """`qtune train extract`: supervised fine-tuning of a causal LM to answer with JSON."""

    train: str = opt("", "training JSONL {instruction, input, output}", required=True)
    eval: str | None = opt(None, "evaluation JSONL in the same format (generated and scored each evaluation)")
    batch_size: int = opt(8, "examples per batch", low=1)
    eval_batch_size: int = opt(16, "prompts per generation batch when evaluating", low=1)
    lr: float = opt(2e-4, "peak learning rate (AdamW); about 1e-5 for --full", low=0, low_open=True)
    max_length: int = opt(1024, "maximum tokens per example, prompt and answer together (longer ones are "
                           "left out and reported)", low=8)
    lora_targets: list[str] | None = opt(None, "LoRA target modules (default: every linear projection, "
                                          "q/k/v/o/gate/up/down)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (less memory)")
    instruction: str | None = opt(None, "instruction for rows without one (default: the most common one "
                                   "in --train)")
    max_new_tokens: int = opt(256, "evaluation: longest answer generated", low=1)
    group_by_length: bool = opt(True, "length-grouped batches (less padding)")


@dataclass(kw_only=True)
class ExtractEvalConfig(InferenceConfig):
    """`qtune eval extract`: JSON validity, per-field and all-fields exact match."""

    model: str = opt("", "extraction model: trained folder or base model", required=True)
    data: str = opt("", "JSONL {instruction, input, output}", required=True)
    compare: str | None = opt(None, "a second model, side by side (e.g. the base model)")
    output: str | None = opt(None, "folder for metrics.json, report.md and extraction.png")
    max_new_tokens: int = opt(256, "longest answer", low=1)
    batch_size: int = opt(16, "prompts per generation batch", low=1)


@dataclass(kw_only=True)
class ExtractPredictConfig(InferenceConfig):
    """`qtune predict extract` (or `qtune extract`): JSON from every row of a JSONL file, in input order."""

    model: str = opt("", "extraction model (a `qtune train extract` folder)", required=True)
    input: str = opt("", "JSONL rows {input, instruction?}", required=True)
    output: str = opt("", "JSONL: each row with output (JSON or null) and error", required=True)
    max_new_tokens: int = opt(256, "longest answer", low=1)
    batch_size: int = opt(16, "prompts per generation batch", low=1)


@dataclass(frozen=True, kw_only=True)
class ExtractServerSettings:
    """What `qtune serve` (`qtune.serving.ServerSettings`) adds for extractors."""

    max_new_tokens: int = opt(512, "/v1/extract: the most tokens a request may ask to generate")  # more -> 422
    extract_batch_size: int = opt(16, "/v1/extract: prompts per generate() call", flag=False)


@dataclass
class ExtractionSaved(SavedSettings):
    """An extractor's own field of qtune.json: the instruction put in every prompt unless a row has one."""

    instruction: str | None = field(default=None, metadata={"check": check_optional_text})
