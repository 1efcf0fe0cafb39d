"""`qtune eval pair-cls` and `qtune predict pair-cls`.

Under `torchrun` / `accelerate launch` the ranks share the predictions (the same numbers as one
process, see `qtune.evaluation.sharded`) and rank 0 alone writes."""

from __future__ import annotations

from qtune.data.pairs import pair_column_flags, pairs_from_rows, read_pairs
from qtune.data.tables import read_table, table_format, write_rows_with
from qtune.distributed import init_process_group
from qtune.evaluation.metrics import metrics_from_probs
from qtune.evaluation.report import classification_report_md, mark_untrained, write_classification_outputs
from qtune.evaluation.sharded import is_main, sharded_call
from qtune.modeling.loading import read_meta
from qtune.tasks.base import ClassifierSaved
from qtune.tasks.pair_cls.config import PairClsEvalConfig, PairClsPredictConfig


def evaluate(config: PairClsEvalConfig, load) -> dict:
    """Metrics for one model (or two side by side) on a labelled pair file; optional report folder.
    `load(name, task, device=, precision=)` gives a loaded model (`qtune.load`)."""
    results = {}
    init_process_group()  # under a launcher: the ranks share the predictions
    for name in [config.model] + ([config.compare] if config.compare else []):
        meta = read_meta(name, ClassifierSaved)  # a base model without qtune.json: the saved default labels
        labels = (meta.settings if meta else ClassifierSaved()).labels
        pairs = read_pairs(config.data, text_columns=config.text_columns, label_column=config.label_column,
                           labels=labels, labels_flag=None)
        clf = load(name, "pair-cls", device=config.device, precision=config.load_precision)
        probs = sharded_call(clf, "predict_proba", [(p.sentence1, p.sentence2) for p in pairs],
                             batch_size=config.batch_size, progress=True)
        results[name] = mark_untrained(metrics_from_probs([p.label for p in pairs], probs, labels), clf)
    if config.output and is_main():
        write_classification_outputs(results, str(config.data), config.output)
    return results


def show_evaluation(config: PairClsEvalConfig, results: dict) -> str:
    text = classification_report_md(results, config.data)
    if config.output:
        text += f"\nwrote {config.output}/metrics.json, report.md, confusion.png"
    return text


def predict(config: PairClsPredictConfig, load) -> int:
    """Predict every row of `input` and write it, with `predicted_label` and `probability` (of the
    positive label), to `output` (CSV, TSV or JSONL by extension). Returns the row count."""
    table_format(config.output)  # fail on an unsupported output type before any work
    rows, names = read_table(config.input, config.text_columns, column_flags=pair_column_flags(labelled=False))
    pairs = pairs_from_rows(rows, config.input, text_columns=config.text_columns, labels=None)
    init_process_group()  # under a launcher: the ranks share the predictions
    clf = load(config.model, "pair-cls", device=config.device, precision=config.load_precision)
    predictions = sharded_call(clf, "predict", [(p.sentence1, p.sentence2) for p in pairs],
                               batch_size=config.batch_size, threshold=config.threshold, progress=True)
    if not is_main():
        return len(predictions)
    return write_rows_with(config.output, rows, names, [
        {"predicted_label": p.label, "probability": round(p.score, 6)} for p in predictions])


def show_prediction(config: PairClsPredictConfig, count: int) -> str:
    return f"wrote {count} predictions to {config.output}"
