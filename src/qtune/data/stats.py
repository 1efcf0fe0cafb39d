"""Token-length statistics of a data file as the model sees it, and a suggested --max-length."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

PERCENTILES = (50, 90, 95, 99)


def length_summary(lengths: Sequence[int], coverage: float = 0.99, multiple: int = 8) -> dict:
    """Percentiles, mean and max, and the smallest multiple of `multiple` that covers
    `coverage` of the rows (no row is cut below that share)."""
    values = np.asarray(lengths, dtype=np.int64)
    if values.size == 0:
        raise ValueError("no lengths")
    summary = {"rows": int(values.size), "mean": float(values.mean()), "min": int(values.min())}
    for p in PERCENTILES:
        # "higher": a percentile is a real row length, so p99 rows are really covered by it.
        summary[f"p{p}"] = int(np.percentile(values, p, method="higher"))
    summary["max"] = int(values.max())
    needed = int(np.percentile(values, coverage * 100, method="higher"))
    summary["suggested_max_length"] = max(multiple, int(math.ceil(needed / multiple) * multiple))
    summary["coverage"] = coverage
    summary["rows_truncated_at_suggestion"] = int((values > summary["suggested_max_length"]).sum())
    return summary


def text_histogram(lengths: Sequence[int], bins: int = 12, width: int = 40) -> str:
    values = np.asarray(lengths)
    counts, edges = np.histogram(values, bins=bins)
    top = counts.max() or 1
    lines = []
    for count, lo, hi in zip(counts, edges[:-1], edges[1:]):
        bar = "#" * int(round(width * count / top))
        lines.append(f"{int(lo):>6}-{int(hi):<6} {bar:<{width}} {count}")
    return "\n".join(lines)


# Marks the PNG (its "Software" text chunk) so a later run knows the file as its own plot.
PLOT_SOFTWARE = "qtune data stats"


def default_plot_path(data: str) -> Path:
    """`NAME.lengths.png` in the current folder, NAME being the input's whole file name: train.csv
    and train.jsonl get plots of their own. Characters a file name should not hold (a hub
    dataset's `:` and `/`) become `_`."""
    name = re.sub(r"[^\w.-]", "_", Path(str(data).rstrip("/")).name) or "data"
    return Path(f"{name}.lengths.png")


def plot_of(path: str | Path, data: str) -> bool:
    """Whether `path` is a length plot this command made of a file named like `data`."""
    from qtune.plotting import png_text

    text = png_text(path)
    return text.get("Software") == PLOT_SOFTWARE and text.get("Title", "").startswith(f"{Path(data).name}:")


def plot_target(data: str, chosen: str | None) -> tuple[Path, str]:
    """Where `qtune data stats` writes its plot, and a note for the user ("" or why it replaces a
    file). A chosen path is the user's to replace; the default path is replaced only when it holds
    this command's plot of a file of the same name, otherwise it is refused (QtuneError) before any
    work. The input file itself is never a target."""
    from qtune.errors import QtuneError

    path = Path(chosen) if chosen else default_plot_path(data)
    if Path(data).exists() and path.exists() and path.resolve() == Path(data).resolve():
        raise QtuneError(f"--output {path} is the input file; choose another path for the plot")
    if not path.exists():
        return path, ""
    if chosen:
        return path, "replaced the file that was there"
    if plot_of(path, data):
        return path, f"replaced the earlier plot of {Path(data).name}"
    raise QtuneError(f"{path} exists and is not a qtune length plot of {Path(data).name}: it is left as it is; "
                     "pass --output PATH to write the plot elsewhere (or move that file away)")


def plot_lengths(lengths: Sequence[int], summary: dict, path: str | Path, title: str) -> None:
    """The histogram with p50, p99 and the suggested --max-length; `title` starts with the input's
    file name and a colon (`plot_of` reads it back from the PNG)."""
    from qtune.plotting import pyplot, save_png

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 3.8))
    lo, hi = min(lengths), max(lengths)
    step = max(1, (hi - lo) // 60 + 1)  # whole-token bins, at most about 60 of them
    ax.hist(lengths, bins=np.arange(lo, hi + step + 1, step) - 0.5, color="#4C72B0")
    for key, style in (("p50", ":"), ("p99", "--")):
        ax.axvline(summary[key], color="black", linestyle=style, label=f"{key} = {summary[key]}")
    ax.axvline(summary["suggested_max_length"], color="#C44E52",
               label=f"suggested --max-length {summary['suggested_max_length']}")
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.set_title(title, fontsize=10)
    ax.legend()
    save_png(fig, path, dpi=110, metadata={"Software": PLOT_SOFTWARE, "Title": title})
