"""`qtune train pair-cls`: read the pairs, encode them, and run the shared loop."""

from __future__ import annotations

from functools import partial

from qtune.data.pairs import read_pairs
from qtune.modeling.loading import LoadedModel
from qtune.tasks.base import TrainedRun
from qtune.tasks.pair_cls.config import PairClsConfig
from qtune.tasks.pair_cls.encode import PairEncoder
from qtune.training.run import check_truncation, eval_dev_set, hold_out, start_run


def train(task, config: PairClsConfig, on_step=None) -> TrainedRun:
    read = partial(read_pairs, text_columns=config.text_columns, label_column=config.label_column,
                   labels=config.labels)
    # Every data problem surfaces here, before a model is loaded or a file written.
    train_pairs = read(config.train)
    eval_pairs = read(config.eval) if config.eval else None
    # split by the first text, so a question never sits on both sides
    kept, held, dev = hold_out(config, [p.sentence1 for p in train_pairs], "pairs")
    if held:
        train_pairs, eval_pairs = [train_pairs[i] for i in kept], [train_pairs[i] for i in held]
    else:
        dev = eval_dev_set(config, len(eval_pairs or ()), "pairs")

    def validate(model: LoadedModel) -> None:  # the data checks that need the tokenizer
        lengths = PairEncoder(model.tokenizer, model.family.is_decoder).untruncated_lengths(train_pairs)
        check_truncation(lengths, config.max_length, "pairs")

    loaded = start_run(config, task, validate=validate, held_out=bool(held), labels=config.labels)
    encoder = PairEncoder(loaded.tokenizer, loaded.family.is_decoder, config.max_length)
    features = encoder.encode_pairs(train_pairs)
    eval_features = encoder.encode_pairs(eval_pairs) if eval_pairs is not None else None
    return task.fit(config, loaded, features, eval_features, on_step, dev=dev)
