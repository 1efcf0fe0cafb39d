"""Pair classification (semantic matching): "do these two sentences mean the same thing?"

A sequence-classification head over the pair, LoRA or full, on a BERT-family encoder (the
tokenizer's `[CLS] a [SEP] b [SEP]`) or a Qwen3 decoder (`a \\n b <eos>`, last token pooled).
"""

from __future__ import annotations

from qtune.modeling.family import Family
from qtune.tasks.base import Command, Endpoint, SequenceClassificationTask
from qtune.tasks.pair_cls.config import PairClsConfig, PairClsEvalConfig, PairClsPredictConfig

RUNNERS = "qtune.tasks.pair_cls.evaluate"  # eval/predict runners, imported when a command runs


class PairClsTask(SequenceClassificationTask):
    name = "pair-cls"
    kind = "a pair classifier"
    serve_role = "classifier"
    serve_help = "pair and/or text classifiers for /v1/classify (a pair classifier also rescores FAQ matches)"
    kb_rescore_rank = 1
    pipeline_tag = "text-classification"
    config = PairClsConfig
    trainer = "qtune.tasks.pair_cls.train:train"
    wrapper = "qtune.tasks.pair_cls.model:PairClassifier"
    commands = {"evaluation": Command("pair-cls", PairClsEvalConfig, RUNNERS),
                "prediction": Command("pair-cls", PairClsPredictConfig, RUNNERS, "predict", "show_prediction")}
    stats_unit = "pair"
    exporter = "qtune.tasks.pair_cls.export"
    over_length = "truncated"

    def token_lengths(self, data: str, tokenizer, family: Family, text_columns=("sentence1", "sentence2"),
                      **_) -> list[int]:
        """Tokens of each pair exactly as training encodes it (both sentences, special tokens)."""
        from qtune.data.pairs import pairs_from_rows
        from qtune.data.tables import read_table
        from qtune.tasks.pair_cls.encode import PairEncoder

        rows, _ = read_table(data, text_columns)
        pairs = pairs_from_rows(rows, data, text_columns=text_columns, labels=None)
        encoder = PairEncoder(tokenizer, family.is_decoder, max_length=None)
        return [len(encoder.encode(p.sentence1, p.sentence2)["input_ids"]) for p in pairs]

    def endpoints(self) -> list[Endpoint]:
        from qtune.tasks.pair_cls import serve
        from qtune.tasks.requests import ClassifyRequest

        return [Endpoint("/v1/classify", ClassifyRequest, serve.classify, accepts=serve.is_pairs)]
