"""`qtune train pair-cls`: read the pairs, encode them, and run the shared loop."""

from __future__ import annotations

from functools import partial

from qtune.data.pairs import read_pairs
from qtune.evaluation.metrics import metrics_from_probs
from qtune.modeling.heads import class_loss, collate_labelled
from qtune.modeling.loading import LoadedModel
from qtune.tasks.base import TrainedRun
from qtune.tasks.pair_cls.config import PairClsConfig
from qtune.tasks.pair_cls.encode import PairEncoder
from qtune.tasks.pair_cls.model import PairClassifier
from qtune.training.run import resume_state, start_run
from qtune.training.trainer import TaskHooks, fit


def train(task, config: PairClsConfig, on_step=None) -> TrainedRun:
    read = partial(read_pairs, text_columns=config.text_columns, label_column=config.label_column,
                   labels=config.labels)
    # Every data problem surfaces here, before a model is loaded or a file written.
    train_pairs = read(config.train)
    eval_pairs = read(config.eval) if config.eval else None

    loaded = start_run(config, task, labels=config.labels)
    encoder = PairEncoder(loaded.tokenizer, loaded.family.is_decoder, config.max_length)
    features = encoder.encode_pairs(train_pairs)
    evaluate = None
    if eval_pairs is not None:
        eval_features = encoder.encode_pairs(eval_pairs)
        y_true = [p.label for p in eval_pairs]

        def evaluate(model: LoadedModel) -> dict:
            probs = PairClassifier(model).predict_features(eval_features, batch_size=config.eval_batch_size)
            return metrics_from_probs(y_true, probs, config.labels)

    hooks = TaskHooks(collate=partial(collate_labelled, loaded.tokenizer, packed=loaded.packs), loss=class_loss,
                      evaluate=evaluate, best_metric="macro_f1")
    return TrainedRun(loaded, fit(config, loaded, features, hooks, resume_state=resume_state(config),
                                  on_step=on_step))
