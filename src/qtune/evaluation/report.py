"""Evaluation outputs: metrics.json, report.md and a confusion-matrix PNG, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from qtune.io import write_json, write_text


def short_name(name: str) -> str:
    """A model's last two path parts ("run/best", "org/model"): enough to tell plots apart."""
    parts = Path(name).parts
    return "/".join(parts[-2:]) if parts else name


# results[name][UNTRAINED_HEAD]: the modules the model's checkpoint lacked, so they were randomly
# initialised for the evaluation (a plain encoder given as a reranker or classifier). Its figures are
# chance, not what the base model can do: the column says so rather than passing it off as a baseline.
UNTRAINED_HEAD = "untrained_head"
UNTRAINED_NOTE = "untrained head: not a baseline"


def untrained_modules(model) -> list[str]:
    """The modules of a loaded task model (`.loaded`, a LoadedModel) that start random; [] for none."""
    return list(getattr(getattr(model, "loaded", None), "new_modules", ()) or ())


def mark_untrained(metrics: dict, model) -> dict:
    """`metrics` with UNTRAINED_HEAD set when `model` has modules its checkpoint did not provide."""
    modules = untrained_modules(model)
    if modules:
        metrics[UNTRAINED_HEAD] = modules
    return metrics


def column_name(name: str, metrics: dict) -> str:
    """A model's name in a table, marked when its head was untrained."""
    return f"{name} ({UNTRAINED_NOTE})" if metrics.get(UNTRAINED_HEAD) else name


def untrained_notes(results: dict[str, dict]) -> list[str]:
    """One line per model whose head was untrained: which modules, and what to compare with instead."""
    return [f"- {name} ({UNTRAINED_NOTE}): its checkpoint has no {', '.join(m[UNTRAINED_HEAD])}, which starts "
            "from random weights, so its figures are chance; compare with a trained model instead."
            for name, m in results.items() if m.get(UNTRAINED_HEAD)]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def classification_report_md(results: dict[str, dict], data: str, title: str = "Pair classification") -> str:
    """Markdown report; `results` maps a model name to its metrics, shown side by side."""
    names = list(results)
    summary_keys = ["accuracy", "macro_f1", "best_threshold", "best_threshold_macro_f1"]
    rows = [[key] + [results[n].get(key, "") for n in names] for key in summary_keys]
    parts = [f"# {title}: {data}", "", markdown_table(["metric", *(column_name(n, results[n]) for n in names)], rows),
             ""]
    notes = untrained_notes(results)
    if notes:
        parts += [*notes, ""]
    for name in names:
        metrics = results[name]
        labels = list(metrics["per_class"])
        parts += [f"## {column_name(name, metrics)}", "", markdown_table(
            ["class", "precision", "recall", "f1", "support"],
            [[c, m["precision"], m["recall"], m["f1"], m["support"]] for c, m in metrics["per_class"].items()]), "",
            "Confusion matrix (rows: true, columns: predicted)", "",
            markdown_table(["", *labels], [[labels[i], *row] for i, row in enumerate(metrics["confusion_matrix"])]), ""]
    return "\n".join(parts)


# Tick labels longer than this, or more labels than FLAT_LABELS, are slanted: flat ones run into
# each other under cells about 0.6 inch wide.
FLAT_LABEL_CHARS = 4
FLAT_LABELS = 3


def confusion_figure(results: dict[str, dict]):
    """One confusion matrix per model, side by side; each panel grows with its label count and
    slants long or many column labels so they do not overlap."""
    import numpy as np

    from qtune.plotting import pyplot

    plt = pyplot()
    counts = [len(m["per_class"]) for m in results.values()]
    longest = max(len(str(label)) for m in results.values() for label in m["per_class"])
    side = max(3.6, 0.6 * max(counts) + 0.09 * longest + 1.4)  # inches: cells plus room for the labels
    fig, axes = plt.subplots(1, len(results), figsize=(side * len(results), side), squeeze=False)
    for ax, (name, metrics) in zip(axes[0], results.items()):
        matrix = np.asarray(metrics["confusion_matrix"])  # (labels, labels)
        labels = list(metrics["per_class"])
        ax.imshow(matrix, cmap="Blues")
        size = 9 if len(labels) <= 6 else 7
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=size,
                    color="white" if v > matrix.max() / 2 else "black")
        slanted = len(labels) > FLAT_LABELS or max(len(str(label)) for label in labels) > FLAT_LABEL_CHARS
        ax.set_xticks(range(len(labels)), labels, fontsize=size)
        if slanted:
            plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(labels)), labels, fontsize=size)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        untrained = " (untrained head)" if metrics.get(UNTRAINED_HEAD) else ""
        ax.set_title(f"{short_name(name)}{untrained}\nacc {metrics['accuracy']:.3f}  "
                     f"macro-F1 {metrics['macro_f1']:.3f}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_confusion(results: dict[str, dict], path: Path) -> None:
    from qtune.plotting import save_png

    save_png(confusion_figure(results), path)


def write_classification_outputs(results: dict[str, dict], data: str, output: str | Path,
                                 title: str = "Pair classification") -> None:
    output = Path(output)
    write_json(output / "metrics.json", results)
    write_text(output / "report.md", classification_report_md(results, data, title))
    plot_confusion(results, output / "confusion.png")
