"""`qtune train embedding`: InfoNCE over in-batch and mined hard negatives, best/ by nDCG@10."""

from __future__ import annotations

from functools import partial

from qtune.data.retrieval import held_out_retrieval_set, read_beir, read_query_groups
from qtune.data.teacher_scores import group_teacher_scores, require_teacher_scores
from qtune.distributed import launch
from qtune.errors import QtuneError
from qtune.evaluation.retrieval import evaluate_retrieval
from qtune.modeling.loading import LoadedModel
from qtune.tasks.base import TrainedRun
from qtune.tasks.embedding.config import EmbeddingConfig
from qtune.tasks.embedding.encode import (collate, group_features, short_batches_note, unique_text_batches,
                                          untruncated_lengths)
from qtune.tasks.embedding.loss import (ContrastiveSettings, cached_backward, collate_for_loss, loss,
                                        with_teacher_scores)
from qtune.tasks.embedding.model import Embedder
from qtune.training.run import check_truncation, eval_dev_set, hold_out, resume_state, start_run
from qtune.training.trainer import TaskHooks, fit


def train(task, config: EmbeddingConfig, on_step=None) -> TrainedRun:
    check_loss_options(config)
    groups = read_query_groups(config.train)
    if config.distill:
        require_teacher_scores(groups, config.train)
    if config.hard_negatives == 0 and any(g.negatives for g in groups):
        print(f"{config.train} has mined negatives; --hard-negatives 0 (the default) trains on in-batch "
              "negatives only: --hard-negatives N adds N of them to each query's group")
    eval_set = read_beir(config.eval) if config.eval else None
    kept, held, dev = hold_out(config, [g.query for g in groups], "queries")
    if held:
        eval_set = held_out_retrieval_set([groups[i] for i in held], groups)
        groups = [groups[i] for i in kept]
    else:
        dev = eval_dev_set(config, len(eval_set.queries) if eval_set else 0, "queries")

    def validate(model: LoadedModel) -> None:
        width = Embedder(model).dimension
        if config.matryoshka_dims and not all(0 < d <= width for d in config.matryoshka_dims):
            raise QtuneError(f"--matryoshka-dims must be between 1 and the model's {width} dimensions")
        if config.query_instruction is not None and not config.resume:
            model.meta.settings.query_instruction = config.query_instruction or None
        lengths = untruncated_lengths(groups, Embedder(model).features, config.hard_negatives)
        check_truncation(lengths, config.max_length, "texts")
        task.plan_memory(config, model, lengths, groups)  # the settings it trains with (and writes to config.yaml)

    loaded = start_run(config, task, validate=validate, held_out=bool(held))
    embedder = Embedder(loaded)
    features = group_features(groups, embedder.features, config.hard_negatives)
    settings = ContrastiveSettings(pooling=loaded.meta.settings.pooling, temperature=config.temperature,
                                   false_negative_offset=config.false_negative_offset,
                                   matryoshka_dims=tuple(config.matryoshka_dims or ()),
                                   mini_batch_size=config.mini_batch_size, symmetric=config.symmetric,
                                   improved_contrastive=config.improved_contrastive,
                                   distill_weight=config.distill_weight if config.distill else None,
                                   distill_only=config.distill_only, distill_temperature=config.distill_temperature,
                                   cross_device=config.cross_device_negatives and launch().distributed)
    if config.distill:
        features = with_teacher_scores(features, [group_teacher_scores(g, config.train) for g in groups])
    global_batch = config.batch_size * launch().world_size  # what the sampler fills under a launcher
    note = short_batches_note(features, unique_text_batches(features, global_batch, seed=config.seed, epoch=0),
                              global_batch)
    if note:
        print(note)
    evaluate = None
    if eval_set is not None:
        def evaluate(model: LoadedModel) -> dict:
            return evaluate_retrieval(Embedder(model), eval_set, top_k=config.eval_top_k,
                                      batch_size=config.eval_batch_size)

    hooks = TaskHooks(
        collate=partial(collate_for_loss, partial(collate, loaded.tokenizer, packed=loaded.packs)),
        loss=partial(loss, settings=settings),
        evaluate=evaluate, best_metric="ndcg@10", dev=dev,
        batches=lambda epoch, size: unique_text_batches(features, size, seed=config.seed, epoch=epoch),
        backward=(lambda replica, batch, scale, sync: cached_backward(replica, batch, settings, scale, sync))
        if config.cached else None,
        global_loss=settings.cross_device)
    return TrainedRun(loaded, fit(config, loaded, features, hooks, resume_state=resume_state(config),
                                  on_step=on_step))


def check_loss_options(config: EmbeddingConfig) -> None:
    """Loss flags that contradict each other, refused before anything is read or written."""
    if config.symmetric and config.improved_contrastive:
        raise QtuneError("--symmetric and --improved-contrastive overlap (the improved loss already has the "
                         "passage -> query terms, in one softmax): pick one")
    if config.distill_only and not config.distill:
        raise QtuneError("--distill-only needs --distill (and teacher scores in the data)")
    if config.distill and config.hard_negatives == 0:
        raise QtuneError("--distill with --hard-negatives 0 (the default) has nothing to learn: the teacher's "
                         "softmax runs over each group's positive and hard negatives; add --hard-negatives N")
    if config.distill_only and (config.symmetric or config.improved_contrastive):
        raise QtuneError("--distill-only drops the contrastive loss, so --symmetric / --improved-contrastive "
                         "would do nothing: leave them out")
