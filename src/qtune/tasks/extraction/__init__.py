"""JSON extraction (SFT): a causal LM (Qwen3) learns to answer a chat prompt with a JSON object;
batched greedy generation, validity and per-field exact match, `/v1/extract`."""

from __future__ import annotations

from qtune.modeling.family import Family
from qtune.tasks.base import Command, Endpoint, Task
from qtune.tasks.extraction.config import ExtractConfig, ExtractEvalConfig, ExtractPredictConfig, ExtractServerSettings, ExtractionSaved

RUNNERS = "qtune.tasks.extraction.evaluate"  # eval/predict runners, imported when a command runs


class ExtractionTask(Task):
    name = "extract"
    kind = "an extractor"
    serve_role = "extractor"
    serve_help = "extraction models for /v1/extract"
    server_settings = ExtractServerSettings
    pipeline_tag = "text-generation"
    config = ExtractConfig
    saved_settings = ExtractionSaved
    trainer = "qtune.tasks.extraction.train:train"
    wrapper = "qtune.tasks.extraction.model:Extractor"
    commands = {"evaluation": Command("extract", ExtractEvalConfig, RUNNERS),
                "prediction": Command("extract", ExtractPredictConfig, RUNNERS, "predict", "show_prediction",
                                      top_level=True)}
    stats_unit = "example (chat prompt, answer, EOS)"
    over_length = "left out of training"
    export_formats = ("causal-lm",)  # the merged LM with greedy generation settings and thinking off
    exporter = "qtune.tasks.extraction.export"

    def auto_class(self, family: Family) -> str:
        return "AutoModelForCausalLM"

    def peft_task_type(self, family: Family) -> str:
        return "CAUSAL_LM"

    def lora_targets(self, family: Family) -> list[str]:
        # generation learns a new output format: every linear projection of a decoder
        return family.linear_targets

    def token_lengths(self, data: str, tokenizer, family: Family, **_) -> list[int]:
        """Tokens per example exactly as training encodes it (chat prompt + answer + EOS)."""
        from qtune.data.extraction import read_extraction
        from qtune.tasks.extraction.encode import PromptBuilder

        builder = PromptBuilder(tokenizer)
        return [len(builder.encode(e)["input_ids"]) for e in read_extraction(data)]

    def endpoints(self) -> list[Endpoint]:
        from qtune.tasks.extraction import serve

        return [Endpoint("/v1/extract", serve.ExtractRequest, serve.extract)]
