"""A sixth task, written the way a user's package would add one, outside qtune: text polarity as one
score in [0, 1] (P("pos") of a two-label head), trained, evaluated (also under torchrun), loaded
and served at its own path through the registry alone. tests/tasks/test_toy_task.py registers it
(QTUNE_TASKS=toy_task:ToyTask for the launched processes) and drives every command through it.

Data: JSONL rows {"text": ..., "label": "neg" | "pos"}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import StrictStr

from qtune.config import InferenceConfig, TrainConfig, opt
from qtune.errors import QtuneError, RequestError
from qtune.modeling.heads import class_probs
from qtune.modeling.inference import InferenceModel
from qtune.tasks import Command, Endpoint, TrainedRun
from qtune.tasks.base import SequenceClassificationTask
from qtune.tasks.requests import Request

LABELS = ["neg", "pos"]
PLANNED: list[tuple[int, int, int]] = []  # the memory planner's calls: (texts, longest, --batch-size)


@dataclass(kw_only=True)
class ToyConfig(TrainConfig):
    """`qtune train toy`: a polarity score from labelled texts."""

    full: bool = opt(True, "full fine-tuning (--no-full: LoRA)")


@dataclass(kw_only=True)
class ToyEvalConfig(InferenceConfig):
    """`qtune eval toy`: accuracy of the polarity score at 0.5 on labelled texts."""

    data: str = opt("", "JSONL with text and label", required=True)
    output: str | None = opt(None, "folder for metrics.json")


def read_rows(path: str) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        if row.get("label") not in LABELS:
            raise QtuneError(f"{path}:{number}: field 'label' must be one of {LABELS}, got {row.get('label')!r}")
        texts.append(row["text"])
        labels.append(LABELS.index(row["label"]))
    return texts, labels


class ToyScorer(InferenceModel):
    """`scores(texts)` -> (n,) P("pos")."""

    batch_calls = frozenset({"scores"})

    def features(self, texts, *, truncate: bool = True) -> list[dict]:
        limit = self.loaded.meta.max_length if truncate else None
        return [dict(self.loaded.tokenizer(t, truncation=limit is not None, max_length=limit)) for t in texts]

    def forward(self, batch: dict) -> np.ndarray:
        return class_probs(self.loaded.model, batch)[:, 1:]  # (rows, 1)

    def scores(self, texts, *, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), 1), dtype=np.float32)
        return self.loaded.run_sorted(self.features(list(texts)), out, self.forward, batch_size=batch_size,
                                      desc="toy", progress=progress)[:, 0]


def plan_memory(config: ToyConfig, loaded, lengths, rows) -> None:
    """The toy's memory planner: it records what it was given and keeps the batch."""
    PLANNED.append((len(rows), max(lengths), config.batch_size))


def train(task, config: ToyConfig, on_step=None) -> TrainedRun:
    from qtune.training.run import eval_dev_set, start_run

    texts, labels = read_rows(config.train)
    loaded = start_run(config, task, labels=LABELS)
    features = [{**dict(loaded.tokenizer(t, truncation=True, max_length=config.max_length)), "labels": y}
                for t, y in zip(texts, labels)]
    task.plan_memory(config, loaded, [len(f["input_ids"]) for f in features], texts)
    eval_features = None
    if config.eval:
        eval_texts, eval_labels = read_rows(config.eval)
        eval_features = [{**dict(loaded.tokenizer(t, truncation=True, max_length=config.max_length)), "labels": y}
                         for t, y in zip(eval_texts, eval_labels)]
    return task.fit(config, loaded, features, eval_features, on_step,
                    dev=eval_dev_set(config, len(eval_features or ()), "texts"))


def evaluate(config: ToyEvalConfig, load) -> dict:
    from qtune.distributed import init_process_group
    from qtune.evaluation.sharded import is_main, sharded_call
    from qtune.io import write_json

    texts, labels = read_rows(config.data)
    init_process_group()  # under a launcher the ranks share the scoring
    model = load(config.model, "toy", device=config.device, precision=config.load_precision)
    scores = sharded_call(model, "scores", texts, batch_size=config.batch_size)
    results = {"accuracy": float(np.mean((scores >= 0.5) == np.asarray(labels, dtype=bool))),
               "scores": [float(s) for s in scores]}
    if config.output and is_main():
        write_json(Path(config.output) / "metrics.json", results)
    return results


def show_evaluation(config: ToyEvalConfig, results: dict) -> str:
    return f"accuracy {results['accuracy']:.4f}"


@dataclass(frozen=True, kw_only=True)
class ToyServerSettings:
    """The toy task's own server setting: `qtune serve --toy-max-texts N`."""

    toy_max_texts: int = opt(64, "/v1/toy: texts per request, at most")


class ToyRequest(Request):
    input: list[StrictStr]
    model: StrictStr | None = None


async def handle(call, entry, body: ToyRequest) -> dict:
    # (a task registered in a running process, after qtune.serving was imported, has no settings there)
    limit = getattr(call.settings, "toy_max_texts", ToyServerSettings.toy_max_texts)
    if len(body.input) > limit:
        raise RequestError(422, f"at most {limit} texts, got {len(body.input)}", param="input")
    features = await call.tokenize(lambda served: served.model.features(body.input), entry)
    scores = await call.submit(entry, features)  # (n, 1)
    return {"object": "list", "model": entry.name,
            "data": [{"index": i, "score": float(s[0])} for i, s in enumerate(scores)]}


class ToyTask(SequenceClassificationTask):
    name = "toy"
    kind = "a toy polarity scorer"
    serve_role = "toy-scorer"
    serve_help = "toy polarity scorers: DIR or NAME=DIR"
    server_settings = ToyServerSettings
    config = ToyConfig
    trainer = "toy_task:train"
    memory_planner = "toy_task:plan_memory"
    wrapper = "toy_task:ToyScorer"
    commands = {"evaluation": Command("toy", ToyEvalConfig, "toy_task")}
    export_formats = ("transformers",)

    def formats_of(self, meta) -> tuple[str, ...]:
        return self.export_formats

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("/v1/toy", ToyRequest, handle)]
