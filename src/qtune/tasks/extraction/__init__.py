"""JSON extraction (SFT): a causal LM (Qwen3) learns to answer a chat prompt with a JSON object;
batched greedy generation, validity and per-field exact match, `/v1/extract`."""

from __future__ import annotations

from qtune.modeling.family import Family
from qtune.tasks.base import Command, Endpoint, Task, lazy
from qtune.tasks.extraction.config import ExtractConfig, ExtractEvalConfig, ExtractPredictConfig

RUNNERS = "qtune.tasks.extraction.evaluate"  # eval/predict runners, imported when a command runs


class ExtractionTask(Task):
    name = "extract"
    kind = "an extractor"
    config = ExtractConfig
    stats_unit = "example (chat prompt, answer, EOS)"
    over_length = "left out of training"

    def auto_class(self, family: Family) -> str:
        return "AutoModelForCausalLM"

    def peft_task_type(self, family: Family) -> str:
        return "CAUSAL_LM"

    def lora_targets(self, family: Family) -> list[str]:
        # generation learns a new output format: every linear projection of a decoder
        return family.linear_targets

    def train(self, config, on_step=None):
        from qtune.tasks.extraction.train import train

        return train(self, config, on_step)

    def wrap(self, loaded):
        from qtune.tasks.extraction.model import Extractor

        return Extractor(loaded)

    def evaluation(self) -> Command:
        return Command("extract", ExtractEvalConfig.__doc__, ExtractEvalConfig, lazy(RUNNERS, "evaluate"),
                       lazy(RUNNERS, "show_evaluation"))

    def prediction(self) -> Command:
        return Command("extract", ExtractPredictConfig.__doc__, ExtractPredictConfig, lazy(RUNNERS, "predict"),
                       lazy(RUNNERS, "show_prediction"))

    def token_lengths(self, data: str, tokenizer, family: Family, **_) -> list[int]:
        """Tokens per example exactly as training encodes it (chat prompt + answer + EOS)."""
        from qtune.data.extraction import read_extraction
        from qtune.tasks.extraction.encode import PromptBuilder

        builder = PromptBuilder(tokenizer)
        return [len(builder.encode(e)["input_ids"]) for e in read_extraction(data)]

    def endpoints(self) -> list[Endpoint]:
        from qtune.tasks.extraction import serve

        return [Endpoint("/v1/extract", serve.ExtractRequest, serve.extract)]
