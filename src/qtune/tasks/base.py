"""The Task contract: everything the rest of qtune needs to know about one task.

A task is a `Task` subclass in `qtune/tasks/<task>/__init__.py`, listed once in the registry
(`qtune/tasks/__init__.py`). Loading, training, the CLI, int8, serving and the knowledge base
ask the registry; nothing outside `qtune/tasks/` branches on a task name. A task folder holds:

- `config.py`: its settings dataclasses (training; evaluation and prediction if it has them),
  from which YAML recipes and CLI flags are generated;
- `encode.py`: records -> unpadded model features (exactly as training and inference see them);
- `model.py`: the batch function (one collated batch -> output rows), the training loss and the
  inference wrapper that `qtune.load` returns;
- `train.py`: reading the data, the training hooks (collate, loss, evaluation, best metric);
- `evaluate.py`: the `qtune eval` runner and report; `serve.py`: its HTTP endpoints.

Task modules import torch, transformers and pydantic only inside functions, so `import qtune`
and `qtune --help` stay light. No task imports another task.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple

from qtune.modeling.loading import SavedSettings, check_labels, check_pooling

if TYPE_CHECKING:
    from qtune.modeling.family import Family
    from qtune.modeling.loading import CheckpointMeta, LoadedModel


def resolve(path: str):
    """The object at "package.module:name", imported on first use (so building the CLI imports no
    task's training, model or runner code)."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


class TrainedRun(NamedTuple):
    """What `Task.train` returns: the model as it stands at the end (it equals `output/last`) and
    the metrics also written to `output/metrics.json`."""

    loaded: "LoadedModel"
    metrics: dict


@dataclass(frozen=True)
class Command:
    """An `eval`, `predict` or `calibrate` subcommand of a task. Its flags are generated from
    `config` (whose docstring is its help); `run(config, load)` does the work and returns the
    results, `show(config, results)` is what the CLI prints. Both live in `module`."""

    name: str
    config: type
    module: str
    run_name: str = "evaluate"
    show_name: str = "show_evaluation"
    top_level: bool = False  # also (or only, for a kind no group takes: "mining") `qtune NAME`: `qtune extract`, `qtune mine`

    @property
    def help(self) -> str:
        return self.config.__doc__ or ""

    def run(self, config, load):
        return resolve(f"{self.module}:{self.run_name}")(config, load)

    def show(self, config, results) -> str:
        return resolve(f"{self.module}:{self.show_name}")(config, results)


@dataclass(frozen=True)
class Endpoint:
    """What a task serves at one HTTP path.

    `handle(call, entry, body)` is an async function: `body` is the parsed `request` model, `entry`
    the served model (`.name`, `.model` = the task's wrapper, `.max_input_tokens`), `call` the
    server's side (`.settings`, `await call.submit(entry, features)` for micro-batched rows,
    `await call.run(entry, fn, *args)` for one model call on the model thread, `await
    call.tokenize(fn, *args)` for tokenizing off the event loop, one tokenizing call at a time, and
    `call.prepare` for other CPU work). It raises
    `qtune.errors.RequestError` for a bad request and returns the JSON answer.
    `accepts(body)`: when a request names no model, whether this task takes it (several tasks
    may share a path, e.g. /v1/classify for pairs and for single texts)."""

    path: str
    request: type
    handle: Callable
    accepts: Callable[[Any], bool] = lambda body: True


class Task:
    """One task: its name, settings, model head, training, inference wrapper, evaluation and endpoints."""

    name: ClassVar[str]  # as in `qtune train NAME` and qtune.json
    kind: ClassVar[str]  # what a model of this task is called in messages: "a pair classifier"
    config: ClassVar[type]  # the training settings dataclass (a `qtune.config.TrainConfig`)
    # its own fields of qtune.json (a `SavedSettings` dataclass, each field checked on load)
    saved_settings: ClassVar[type[SavedSettings]] = SavedSettings
    pipeline_tag: ClassVar[str] = "feature-extraction"  # the Hugging Face pipeline tag of its model cards
    # The model output an int8 ONNX export returns ("logits", "last_hidden_state"); None: no int8.
    int8_output: ClassVar[str | None] = None
    # `qtune data stats --task NAME` (tasks with `token_lengths`): what one row is, what happens
    # to rows over the suggested --max-length.
    stats_unit: ClassVar[str] = "row"
    over_length: ClassVar[str] = "truncated"
    token_lengths: ClassVar[Callable | None] = None  # (data, tokenizer, family, **settings) -> [tokens per row]
    # Its batches of BERT encoders may be packed (`qtune.modeling.packing`): its model reads each
    # sequence out on its own (an embedder pools it, a cross-encoder scores its [CLS] row).
    # Decoders pack whatever the task.
    encoder_packing: ClassVar[bool] = False

    # -- the model: which transformers class carries the head, how LoRA wraps it
    def auto_class(self, family: Family) -> str:
        raise NotImplementedError

    def peft_task_type(self, family: Family) -> str:
        raise NotImplementedError

    def lora_targets(self, family: Family) -> list[str]:
        """Default LoRA targets (without --lora-targets): the attention projections."""
        return family.attention_targets

    def prepare(self, meta: CheckpointMeta, source: str, tokenizer, family: Family) -> dict:
        """Fill `meta.settings`' task defaults for a model being loaded from `source`; return the
        head's `from_pretrained` keyword arguments."""
        return {}

    # -- training and inference
    trainer: ClassVar[str]  # "module:function", called (task, config, on_step) -> TrainedRun
    # "module:Class": the inference wrapper around a LoadedModel, a `qtune.modeling.inference.
    # InferenceModel` (features as trained, the batch function, its declared batch calls)
    wrapper: ClassVar[str]
    # The task's commands by kind: "evaluation" (`qtune eval`), "prediction" (`qtune predict`), ...;
    # a tuple where a task has several of one kind (embedding: `qtune eval retrieval` and `qtune eval sts`).
    commands: ClassVar[dict[str, Command | tuple[Command, ...]]] = {}

    def commands_of(self, kind: str) -> list[Command]:
        found = self.commands.get(kind, ())
        return list(found) if isinstance(found, tuple) else [found]

    def all_commands(self) -> list[Command]:
        return [command for kind in self.commands for command in self.commands_of(kind)]

    def train(self, config, on_step=None) -> TrainedRun:
        return resolve(self.trainer)(self, config, on_step)

    # -- memory: "module:function" called (config, loaded, lengths, groups) before a run trains
    # (`plan_memory`, unless the config's `memory_check` is off): it sets the settings the run
    # trains with (e.g. --cached, --batch-size) so that one batch fits the device's free memory, or
    # stops with a clear error; `lengths` are the tokens of every training text as the task encodes it. None:
    # the task trains as asked.
    memory_planner: ClassVar[str | None] = None

    def plan_memory(self, config, loaded: LoadedModel, lengths, groups) -> None:
        if self.memory_planner and getattr(config, "memory_check", True):
            resolve(self.memory_planner)(config, loaded, lengths, groups)

    def wrap(self, loaded: LoadedModel):
        """The inference wrapper (`qtune.load` returns it)."""
        from qtune.modeling.inference import InferenceModel

        cls = resolve(self.wrapper)
        if not (isinstance(cls, type) and issubclass(cls, InferenceModel)):
            raise TypeError(f"task {self.name!r}: its wrapper {self.wrapper} is not a "
                            "qtune.modeling.inference.InferenceModel")
        return cls(loaded)

    # -- `qtune export`: the formats this task writes (the first is what `--format auto` picks) and
    # the module ("qtune.tasks.embedding.export"; `resolve` names its functions as everything lazily
    # imported is named, "module:name") with `write_export(loaded, output, fmt)`,
    # which writes the model into `output` (a temp folder that replaces the target whole, holding
    # only the export note, see `qtune.modeling.export`; `loaded` is on the CPU in fp32 with LoRA
    # merged), and `check_export(output, model, texts) -> {engine: max abs difference}` against
    # `model`, the task's wrapper of the source. None: the plain merged transformers checkpoint only.
    export_formats: ClassVar[tuple[str, ...]] = ("transformers",)
    exporter: ClassVar[str | None] = None

    def formats_of(self, meta: CheckpointMeta | None) -> tuple[str, ...]:
        """The export formats of one model of this task (`meta`: its qtune.json, None for a folder
        without one), the first being what `--format auto` picks."""
        return self.export_formats

    # -- serving (nothing by default). `serve_role`: the `qtune serve --ROLE` flag that takes this
    # task's models (several tasks may share one: the first registered is what a folder without a
    # qtune.json loads as, and `serve_help` of that first task is the flag's help). What the FAQ
    # matcher may ask of a served model: `kb_recall`, it embeds the knowledge base's questions;
    # `kb_rescore_rank`, it rescores the recalled candidates (`pair_scores`), the lowest rank served
    # being the one used; None: it does neither.
    serve_role: ClassVar[str | None] = None
    serve_help: ClassVar[str] = ""
    # The task's own server settings: a dataclass of `qtune.config.opt` fields that
    # `qtune.serving.ServerSettings` (and so `qtune serve`'s flags) takes in beside the common ones.
    server_settings: ClassVar[type | None] = None
    kb_recall: ClassVar[bool] = False
    kb_rescore_rank: ClassVar[int | None] = None

    def endpoints(self) -> list[Endpoint]:
        return []

    def __repr__(self) -> str:
        return f"<task {self.name}>"


@dataclass
class ClassifierSaved(SavedSettings):
    """A classifier's own fields of qtune.json: its labels (the head's outputs, in order) and which
    vector its head reads ("mean": the mean of the last hidden state; None: the transformers head's
    own pooling; see `qtune.modeling.heads`)."""

    labels: list[str] = field(default_factory=lambda: ["0", "1"], metadata={"check": check_labels})
    pooling: str | None = field(default=None, metadata={"check": check_pooling})


class SequenceClassificationTask(Task):
    """A task whose model is a sequence-classification head with named labels (pair and text
    classification): `*ForSequenceClassification`, LoRA of type SEQ_CLS, int8 on encoders."""

    saved_settings = ClassifierSaved
    int8_output = "logits"
    export_formats = ("transformers", "sentence-transformers")  # per model: see `formats_of`

    def auto_class(self, family: Family) -> str:
        return "AutoModelForSequenceClassification"

    def peft_task_type(self, family: Family) -> str:
        return "SEQ_CLS"

    def prepare(self, meta: CheckpointMeta, source: str, tokenizer, family: Family) -> dict:
        """The labels, and which vector the head classifies (see `qtune.modeling.heads`)."""
        from qtune.modeling.heads import classifier_head_kwargs

        return classifier_head_kwargs(meta, source, tokenizer, family)

    def formats_of(self, meta: CheckpointMeta | None) -> tuple[str, ...]:
        """A head over the mean of the last hidden state is no transformers head (BERT's reads the
        pooler): such a classifier exports as sentence-transformers (Pooling mean, then Dense)."""
        return ("sentence-transformers",) if meta is not None and meta.settings.pooling == "mean" else ("transformers",)

    def fit(self, config, loaded: LoadedModel, features: list[dict], eval_features: list[dict] | None,
            on_step=None, dev=None) -> TrainedRun:
        """The shared loop for a classification head: cross-entropy on collated (padded or packed)
        labelled features; with `eval_features` (labelled too: the dev set `dev` describes) best/ is
        chosen by macro-F1, and the verdict compares it with always answering the training data's
        most frequent label (a new head's random predictions are no baseline)."""
        from collections import Counter
        from functools import partial

        import numpy as np

        from qtune.evaluation.metrics import metrics_from_probs
        from qtune.modeling import heads
        from qtune.training.run import resume_state
        from qtune.training.trainer import TaskHooks, fit

        evaluate = baseline = None
        if eval_features is not None:
            y_true = [f["labels"] for f in eval_features]

            def evaluate(model: LoadedModel) -> dict:
                probs = heads.LabelledClassifier(model).predict_features(eval_features,
                                                                         batch_size=config.eval_batch_size)
                return metrics_from_probs(y_true, probs, model.meta.settings.labels)

            majority = Counter(f["labels"] for f in features).most_common(1)[0][0]

            def majority_class(model: LoadedModel) -> dict:
                probs = np.zeros((len(y_true), len(model.meta.settings.labels)), dtype=np.float32)
                probs[:, majority] = 1.0
                return metrics_from_probs(y_true, probs, model.meta.settings.labels)

            baseline = (f"majority class '{loaded.meta.settings.labels[majority]}'", majority_class)

        hooks = TaskHooks(collate=partial(heads.collate_labelled, loaded.tokenizer, packed=loaded.packs),
                          loss=heads.class_loss, evaluate=evaluate, best_metric="macro_f1", dev=dev,
                          baseline=baseline)
        return TrainedRun(loaded, fit(config, loaded, features, hooks, resume_state=resume_state(config),
                                      on_step=on_step))
