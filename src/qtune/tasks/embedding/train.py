"""`qtune train embedding`: InfoNCE over in-batch and mined hard negatives, best/ by nDCG@10."""

from __future__ import annotations

from functools import partial

from qtune.data.retrieval import read_beir, read_query_groups
from qtune.errors import QtuneError
from qtune.evaluation.retrieval import evaluate_retrieval
from qtune.modeling.loading import LoadedModel
from qtune.tasks.base import TrainedRun
from qtune.tasks.embedding.config import EmbeddingConfig
from qtune.tasks.embedding.encode import (collate, group_features, short_batches_note, unique_text_batches,
                                          untruncated_lengths)
from qtune.tasks.embedding.loss import ContrastiveSettings, cached_backward, loss
from qtune.tasks.embedding.model import Embedder
from qtune.training.run import check_truncation, resume_state, start_run
from qtune.training.trainer import TaskHooks, fit


def train(task, config: EmbeddingConfig, on_step=None) -> TrainedRun:
    groups = read_query_groups(config.train)
    eval_set = read_beir(config.eval) if config.eval else None

    def validate(model: LoadedModel) -> None:
        width = Embedder(model).dimension
        if config.matryoshka_dims and not all(0 < d <= width for d in config.matryoshka_dims):
            raise QtuneError(f"--matryoshka-dims must be between 1 and the model's {width} dimensions")
        if config.query_instruction is not None and not config.resume:
            model.meta.query_instruction = config.query_instruction or None
        check_truncation(untruncated_lengths(groups, Embedder(model).features, config.hard_negatives),
                         config.max_length, "texts")

    loaded = start_run(config, task, validate=validate)
    embedder = Embedder(loaded)
    features = group_features(groups, embedder.features, config.hard_negatives)
    settings = ContrastiveSettings(pooling=loaded.meta.pooling, temperature=config.temperature,
                                   false_negative_offset=config.false_negative_offset,
                                   matryoshka_dims=tuple(config.matryoshka_dims or ()),
                                   mini_batch_size=config.mini_batch_size)
    note = short_batches_note(features, unique_text_batches(features, config.batch_size, seed=config.seed, epoch=0),
                              config.batch_size)
    if note:
        print(note)
    evaluate = None
    if eval_set is not None:
        def evaluate(model: LoadedModel) -> dict:
            return evaluate_retrieval(Embedder(model), eval_set, top_k=config.eval_top_k,
                                      batch_size=config.eval_batch_size)

    hooks = TaskHooks(
        collate=partial(collate, loaded.tokenizer, packed=loaded.packs), loss=partial(loss, settings=settings),
        evaluate=evaluate, best_metric="ndcg@10",
        batches=lambda epoch: unique_text_batches(features, config.batch_size, seed=config.seed, epoch=epoch),
        backward=(lambda model, batch, scale: cached_backward(model, batch, settings, scale))
        if config.cached else None)
    return TrainedRun(loaded, fit(config, loaded, features, hooks, resume_state=resume_state(config),
                                  on_step=on_step))
