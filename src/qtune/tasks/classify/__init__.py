"""Text classification: one text, one label (intent routing, complaint category, topic).

A sequence-classification head over the text, LoRA or full, on a BERT-family encoder (the
tokenizer's `[CLS] text [SEP]`) or a Qwen3 decoder (`text <eos>`, last token pooled). The labels
are the sorted set found in the training file unless `--labels` gives their order.
"""

from __future__ import annotations

from qtune.modeling.family import Family
from qtune.tasks.base import Command, Endpoint, SequenceClassificationTask
from qtune.tasks.classify.config import ClassifyConfig, ClassifyEvalConfig, ClassifyPredictConfig

RUNNERS = "qtune.tasks.classify.evaluate"  # eval/predict runners, imported when a command runs


class ClassifyTask(SequenceClassificationTask):
    name = "classify"
    kind = "a text classifier"
    serve_role = "classifier"
    pipeline_tag = "text-classification"
    config = ClassifyConfig
    trainer = "qtune.tasks.classify.train:train"
    wrapper = "qtune.tasks.classify.model:TextClassifier"
    commands = {"evaluation": Command("classify", ClassifyEvalConfig, RUNNERS),
                "prediction": Command("classify", ClassifyPredictConfig, RUNNERS, "predict", "show_prediction")}
    stats_unit = "text"
    exporter = "qtune.tasks.classify.export"
    over_length = "truncated"

    def token_lengths(self, data: str, tokenizer, family: Family, text_column: str | None = None, **_) -> list[int]:
        """Tokens of each text exactly as training encodes it (special tokens, EOS for decoders)."""
        from qtune.tasks.classify.data import read_texts
        from qtune.tasks.classify.encode import TextEncoder

        _, _, examples = read_texts(data, text_column=text_column or "text")
        encoder = TextEncoder(tokenizer, family.is_decoder, max_length=None)
        return [len(encoder.encode(e.text)["input_ids"]) for e in examples]

    def endpoints(self) -> list[Endpoint]:
        from qtune.tasks.classify import serve
        from qtune.tasks.requests import ClassifyRequest

        return [Endpoint("/v1/classify", ClassifyRequest, serve.classify, accepts=serve.is_texts)]
