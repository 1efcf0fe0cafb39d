"""Domain embeddings: contrastive fine-tuning (InfoNCE over in-batch and mined hard negatives),
retrieval evaluation on BEIR folders, pair scoring (STS), and `/v1/embeddings`."""

from __future__ import annotations

from qtune.modeling.family import Family
from qtune.tasks.base import Command, Endpoint, Task
from qtune.tasks.embedding.config import EmbeddingConfig, EmbeddingSaved, MineConfig, RetrievalEvalConfig, StsEvalConfig

RUNNERS = "qtune.tasks.embedding.evaluate"  # eval/predict runners, imported when a command runs


class EmbeddingTask(Task):
    name = "embedding"
    kind = "an embedding model"
    serve_role = "embedding"
    serve_help = "embedding models for /v1/embeddings (the first one that built --kb also serves /v1/match)"
    kb_recall = True
    pipeline_tag = "sentence-similarity"
    config = EmbeddingConfig
    saved_settings = EmbeddingSaved
    trainer = "qtune.tasks.embedding.train:train"
    memory_planner = "qtune.tasks.embedding.memory:plan_run"
    encoder_packing = True  # single texts, pooled per sequence
    wrapper = "qtune.tasks.embedding.model:Embedder"
    commands = {"evaluation": (Command("retrieval", RetrievalEvalConfig, RUNNERS),
                               Command("sts", StsEvalConfig, RUNNERS, "evaluate_sts", "show_sts")),
                "mining": Command("mine", MineConfig, "qtune.tasks.embedding.mine", "run_mine", "show_mine",
                                  top_level=True)}
    int8_output = "last_hidden_state"
    export_formats = ("sentence-transformers", "transformers")
    exporter = "qtune.tasks.embedding.export"

    def auto_class(self, family: Family) -> str:
        return "AutoModel"

    def peft_task_type(self, family: Family) -> str:
        return "FEATURE_EXTRACTION"

    def prepare(self, meta, source, tokenizer, family) -> dict:
        if meta.settings.pooling is None:
            from qtune.modeling.pooling import default_pooling
            from qtune.tasks.embedding.encode import default_query_instruction

            meta.settings.pooling = default_pooling(source, family)
            meta.settings.query_instruction = default_query_instruction(family)
        return {}

    def endpoints(self) -> list[Endpoint]:
        from qtune.tasks.embedding import serve

        return [Endpoint("/v1/embeddings", serve.EmbeddingRequest, serve.embeddings),
                Endpoint("/v2/embed", serve.CohereEmbedRequest, serve.cohere_embed_v2),
                Endpoint("/v1/embed", serve.CohereEmbedRequest, serve.cohere_embed_v1)]
