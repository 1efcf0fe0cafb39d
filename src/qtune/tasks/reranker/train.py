"""`qtune train reranker`: groups of (query, positive, hard negatives), listwise or pointwise."""

from __future__ import annotations

from functools import partial

import numpy as np

from qtune.data.batching import length_grouped_batches
from qtune.data.retrieval import read_query_groups
from qtune.data.teacher_scores import require_teacher_scores
from qtune.errors import QtuneError
from qtune.modeling.loading import LoadedModel
from qtune.tasks.base import TrainedRun
from qtune.tasks.reranker.config import RerankerConfig
from qtune.tasks.reranker.groups import (collate, group_features, group_ranking_metrics, loss, random_order_metrics,
                                         short_groups, training_pairs)
from qtune.tasks.reranker.model import Reranker
from qtune.training.run import check_truncation, eval_dev_set, hold_out, resume_state, start_run
from qtune.training.trainer import TaskHooks, fit


def train(task, config: RerankerConfig, on_step=None) -> TrainedRun:
    groups = read_query_groups(config.train)
    eval_groups = read_query_groups(config.eval) if config.eval else None
    kept, held, dev = hold_out(config, [g.query for g in groups], "queries")
    if held:
        groups, eval_groups = [groups[i] for i in kept], [groups[i] for i in held]
    for path, found in ((config.train, groups), (config.eval or f"the dev split of {config.train}", eval_groups)):
        if found is not None and not any(g.negatives for g in found):
            raise QtuneError(f"{path}: no group has a negative, so there is nothing to rank "
                             "(add them with `qtune mine`)")
    if config.distill_only and not config.distill:
        raise QtuneError("--distill-only needs --distill (and teacher scores in the data)")
    if config.distill:
        require_teacher_scores([g for g in groups if g.negatives], config.train)

    def validate(model: LoadedModel) -> None:  # checks that need the tokenizer, before anything is written
        if config.instruction is not None and not config.resume and model.family.is_decoder:
            model.meta.settings.instruction = config.instruction
        reranker = Reranker(model)
        reranker.formatter.encode("query", "document")
        whole = reranker.features(training_pairs(groups, config.group_size), truncate=False)
        lengths = [len(f["input_ids"]) for f in whole]
        check_truncation(lengths, config.max_length, "pairs")
        task.plan_memory(config, model, lengths, groups)  # the settings it trains with (and writes to config.yaml)

    loaded = start_run(config, task, validate=validate, held_out=bool(held))
    reranker = Reranker(loaded)
    features, dropped = group_features(groups, reranker.formatter.encode, config.group_size,
                                       teacher_from=config.train if config.distill else None)
    if dropped:
        print(f"{dropped} of {len(groups)} training groups have no negative and are left out")
    short = short_groups(groups, config.group_size)
    if short:
        print(f"{short} of {len(groups)} training groups have fewer than {config.group_size - 1} negatives "
              f"(--group-size {config.group_size}); their negatives are repeated to fill the group "
              "(mine more with `qtune mine --num-negatives`, or lower --group-size)")
    evaluate = baseline = None
    if eval_groups is not None:
        scored = [g for g in eval_groups if g.negatives]
        eval_features = [reranker.formatter.encode(g.query, d) for g in scored for d in (g.positives[0], *g.negatives)]
        bounds = np.cumsum([0] + [1 + len(g.negatives) for g in scored])

        def evaluate(model: LoadedModel) -> dict:
            scores = Reranker(model).score_features(eval_features, batch_size=config.eval_batch_size)
            return group_ranking_metrics([scores[a:b] for a, b in zip(bounds[:-1], bounds[1:])])

        dev = dev or eval_dev_set(config, len(scored), "queries")
        if loaded.new_modules:  # a new score head ranks at random: that is the figure to beat
            baseline = ("random order (new head)", lambda model: random_order_metrics([1 + len(g.negatives)
                                                                                     for g in scored]))

    lengths = [f["length"] for f in features]
    hooks = TaskHooks(
        collate=partial(collate, loaded.tokenizer, packed=loaded.packs),
        loss=partial(loss, prompt=reranker.formatter.prompt, kind=config.loss, distill_weight=config.distill_weight,
                     distill_temperature=config.distill_temperature, distill_only=config.distill_only),
        evaluate=evaluate, best_metric="mrr", dev=dev, baseline=baseline,
        batches=lambda epoch, size: length_grouped_batches(lengths, size, seed=config.seed, epoch=epoch))
    return TrainedRun(loaded, fit(config, loaded, features, hooks, resume_state=resume_state(config),
                                  on_step=on_step))
