"""Reranking: a relevance score per (query, document), the second stage after recall.

Decoders (Qwen3-Reranker) answer "yes"/"no" with their LM head; BERT-family encoders are
cross-encoders with one logit. Trained listwise or pointwise on mined groups, evaluated as the
second stage of retrieval, calibrated for a "no good answer" threshold, served at `/v1/rerank`.
"""

from __future__ import annotations

from qtune.modeling.family import Family
from qtune.tasks.base import Command, Endpoint, Task
from qtune.tasks.reranker.config import CalibrateConfig, RerankEvalConfig, RerankerConfig, RerankerSaved

RUNNERS = "qtune.tasks.reranker.evaluate"  # eval/predict runners, imported when a command runs


class RerankerTask(Task):
    name = "reranker"
    kind = "a reranker"
    serve_role = "reranker"
    serve_help = "rerankers for /v1/rerank (the first also rescores FAQ matches, with its calibrated threshold)"
    kb_rescore_rank = 0
    pipeline_tag = "text-ranking"
    config = RerankerConfig
    saved_settings = RerankerSaved
    trainer = "qtune.tasks.reranker.train:train"
    memory_planner = "qtune.tasks.reranker.memory:plan_run"
    encoder_packing = True  # BERT cross-encoders: a pair per sequence, scored from its [CLS] row
    wrapper = "qtune.tasks.reranker.model:Reranker"
    commands = {"evaluation": Command("rerank", RerankEvalConfig, RUNNERS),
                "calibration": Command("calibrate", CalibrateConfig, RUNNERS, "calibrate", "show_calibration",
                                       top_level=True)}
    int8_output = "logits"  # cross-encoders; decoders have no int8 path
    # cross-encoder: a one-logit classifier (encoders also for sentence-transformers); causal-lm: decoders' LM
    export_formats = ("cross-encoder", "causal-lm")
    exporter = "qtune.tasks.reranker.export"

    def auto_class(self, family: Family) -> str:
        return "AutoModelForCausalLM" if family.is_decoder else "AutoModelForSequenceClassification"

    def peft_task_type(self, family: Family) -> str:
        return "CAUSAL_LM" if family.is_decoder else "SEQ_CLS"

    def prepare(self, meta, source, tokenizer, family) -> dict:
        if family.is_decoder:
            if meta.settings.instruction is None:
                from qtune.tasks.reranker.encode import DEFAULT_INSTRUCTION

                meta.settings.instruction = DEFAULT_INSTRUCTION
            return {}
        return dict(num_labels=1, pad_token_id=tokenizer.pad_token_id)

    def endpoints(self) -> list[Endpoint]:
        from qtune.tasks.reranker import serve

        return [Endpoint("/v1/rerank", serve.RerankRequest, serve.rerank),
                Endpoint("/v2/rerank", serve.CohereRerankRequest, serve.cohere_rerank)]
