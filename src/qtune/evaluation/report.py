"""Evaluation outputs: metrics.json, report.md and a confusion-matrix PNG, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from qtune.io import write_json, write_text


def short_name(name: str) -> str:
    """A model's last two path parts ("run/best", "org/model"): enough to tell plots apart."""
    parts = Path(name).parts
    return "/".join(parts[-2:]) if parts else name


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
    parts = [f"# {title}: {data}", "", markdown_table(["metric", *names], rows), ""]
    for name in names:
        metrics = results[name]
        labels = list(metrics["per_class"])
        parts += [f"## {name}", "", markdown_table(
            ["class", "precision", "recall", "f1", "support"],
            [[c, m["precision"], m["recall"], m["f1"], m["support"]] for c, m in metrics["per_class"].items()]), "",
            "Confusion matrix (rows: true, columns: predicted)", "",
            markdown_table(["", *labels], [[labels[i], *row] for i, row in enumerate(metrics["confusion_matrix"])]), ""]
    return "\n".join(parts)


def plot_confusion(results: dict[str, dict], path: Path) -> None:
    import numpy as np

    from qtune.plotting import pyplot, save_png

    plt = pyplot()

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.6), squeeze=False)
    for ax, (name, metrics) in zip(axes[0], results.items()):
        matrix = np.asarray(metrics["confusion_matrix"])
        labels = list(metrics["per_class"])
        ax.imshow(matrix, cmap="Blues")
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(v), ha="center", va="center",
                    color="white" if v > matrix.max() / 2 else "black")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{short_name(name)}\nacc {metrics['accuracy']:.3f}  macro-F1 {metrics['macro_f1']:.3f}",
                     fontsize=9)
    save_png(fig, path)


def write_classification_outputs(results: dict[str, dict], data: str, output: str | Path,
                                 title: str = "Pair classification") -> None:
    output = Path(output)
    write_json(output / "metrics.json", results)
    write_text(output / "report.md", classification_report_md(results, data, title))
    plot_confusion(results, output / "confusion.png")
