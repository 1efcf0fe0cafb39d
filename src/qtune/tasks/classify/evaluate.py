"""`qtune eval classify` and `qtune predict classify`.

Under `torchrun` / `accelerate launch` the ranks share the predictions (the same numbers as one
process, see `qtune.evaluation.sharded`) and rank 0 alone writes."""

from __future__ import annotations

from qtune.data.tables import table_format, write_rows_with
from qtune.distributed import init_process_group
from qtune.errors import QtuneError
from qtune.evaluation.metrics import metrics_from_probs
from qtune.evaluation.report import (
    classification_report_md,
    mark_untrained,
    write_classification_outputs,
)
from qtune.evaluation.sharded import is_main, sharded_call
from qtune.modeling.loading import read_meta
from qtune.tasks.base import ClassifierSaved
from qtune.tasks.classify.config import ClassifyEvalConfig, ClassifyPredictConfig
from qtune.tasks.classify.data import read_labelled, read_texts
from qtune.tasks.classify.model import check_texts

TASK = "classify"
TITLE = "Text classification"


def evaluate(config: ClassifyEvalConfig, load) -> dict:
    """Metrics for one model (or two side by side) on a labelled text file; optional report folder.
    `load(name, task, device=, precision=)` gives a loaded model (`qtune.load`). A trained model
    brings its labels (qtune.json); a base model takes the sorted labels of the file."""
    # The data is checked against every model's labels before any model loads.
    runs = []
    for name in [config.model] + ([config.compare] if config.compare else []):
        meta = read_meta(name, ClassifierSaved)
        if meta is not None and meta.task != TASK:
            raise QtuneError(f"'{name}' was trained for {meta.task}, not {TASK}")
        saved = list(meta.settings.labels) if meta is not None else None
        examples, labels = read_labelled(config.data, text_column=config.text_column,
                                         label_column=config.label_column, labels=saved)
        runs.append((name, examples, labels, saved is None))
    results = {}
    init_process_group()  # under a launcher: the ranks share the predictions
    for name, examples, labels, base in runs:
        extra = {"labels": labels} if base else {}
        clf = load(name, TASK, device=config.device, precision=config.load_precision, **extra)
        probs = sharded_call(clf, "predict_proba", check_texts([e.text for e in examples]),
                             batch_size=config.batch_size, progress=True)
        results[name] = mark_untrained(metrics_from_probs([e.label for e in examples], probs, labels), clf)
    if config.output and is_main():
        write_classification_outputs(results, str(config.data), config.output, title=TITLE)
    return results


def show_evaluation(config: ClassifyEvalConfig, results: dict) -> str:
    text = classification_report_md(results, config.data, title=TITLE)
    if config.output:
        text += f"\nwrote {config.output}/metrics.json, report.md, confusion.png"
    return text


def predict(config: ClassifyPredictConfig, load) -> int:
    """Predict every row of `input` and write it, with `predicted_label` and `probability` (of the
    predicted label), to `output` (CSV, TSV or JSONL by extension). Returns the row count."""
    table_format(config.output)  # fail on an unsupported output type before any work
    rows, names, examples = read_texts(config.input, text_column=config.text_column)
    init_process_group()  # under a launcher: the ranks share the predictions
    clf = load(config.model, TASK, device=config.device, precision=config.load_precision)
    predictions = sharded_call(clf, "predict", check_texts([e.text for e in examples]),
                               batch_size=config.batch_size, progress=True)
    if not is_main():
        return len(predictions)
    return write_rows_with(config.output, rows, names, [
        {"predicted_label": p.label, "probability": round(p.probability, 6)} for p in predictions])


def show_prediction(config: ClassifyPredictConfig, count: int) -> str:
    return f"wrote {count} predictions to {config.output}"
