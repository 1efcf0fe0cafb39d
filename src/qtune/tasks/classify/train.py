"""`qtune train classify`: read the texts, encode them, and run the shared loop."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from qtune.errors import QtuneError
from qtune.modeling.loading import LoadedModel, read_meta
from qtune.tasks.base import TrainedRun
from qtune.tasks.classify.config import ClassifyConfig
from qtune.tasks.classify.data import read_labelled
from qtune.tasks.classify.encode import TextEncoder
from qtune.training.run import check_truncation, eval_dev_set, hold_out, start_run


def model_labels(config: ClassifyConfig, task_name: str) -> list[str] | None:
    """The labels of the text classifier training continues from (last/ with --resume, or a
    trained --model), read from its qtune.json without loading it; None for a base model."""
    meta = read_meta(Path(config.output, "last") if config.resume else config.model)
    return list(meta.settings.labels) if meta is not None and meta.task == task_name else None


def train(task, config: ClassifyConfig, on_step=None) -> TrainedRun:
    read = partial(read_labelled, text_column=config.text_column, label_column=config.label_column)
    # Every data problem surfaces here, before a model is loaded or a file written.
    train_examples, labels = read(config.train, labels=config.labels or model_labels(config, task.name))
    eval_examples = read(config.eval, labels=labels)[0] if config.eval else None
    kept, held, dev = hold_out(config, [e.text for e in train_examples], "texts")
    if held:
        train_examples, eval_examples = [train_examples[i] for i in kept], [train_examples[i] for i in held]
    else:
        dev = eval_dev_set(config, len(eval_examples or ()), "texts")

    def validate(loaded: LoadedModel) -> None:
        if list(loaded.meta.settings.labels) != labels:
            raise QtuneError(f"the model has labels {list(loaded.meta.settings.labels)}, the data {labels}; "
                             "train with the model's labels (--labels) or from a base model")
        lengths = TextEncoder(loaded.tokenizer, loaded.family.is_decoder).untruncated_lengths(train_examples)
        check_truncation(lengths, config.max_length, "texts")

    loaded = start_run(config, task, validate=validate, held_out=bool(held), labels=labels)
    encoder = TextEncoder(loaded.tokenizer, loaded.family.is_decoder, config.max_length)
    features = encoder.encode_examples(train_examples)
    eval_features = encoder.encode_examples(eval_examples) if eval_examples is not None else None
    return task.fit(config, loaded, features, eval_features, on_step, dev=dev)
