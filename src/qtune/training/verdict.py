"""The base-vs-tuned verdict: every run with a dev set evaluates the model it starts from before
step 1 and compares best/ with it at the end, so a fine-tune that made the model worse is said
at once, in metrics.json, and again when the model is exported or served.

The baseline is the model as loaded when its head is pretrained (an embedder, a Qwen3 reranker,
a LoRA run, whose untrained adapter adds nothing), and a trivial predictor where the head is new
(a classifier's majority class, a cross-encoder's random order): a randomly initialised head is
not a baseline.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# What a regression is called: the tuned figure below the baseline's (at it: "NO BETTER").
WORSE = "WORSE than the base"
LIKELY_CAUSES = ("the learning rate (too high: the loss jumps or the model forgets; too low: nothing moves), too "
                 "few optimizer steps for the data (more epochs), label noise or a dev set unlike the training "
                 "data")


@dataclass(frozen=True)
class DevSet:
    """What a run's dev set is, for the verdict line: how many units, and where they came from."""

    size: int
    unit: str  # "queries", "texts", "pairs", "groups"
    source: str  # "a 10% dev split of train.jsonl" or "--eval dev.csv"


def make_verdict(metric: str, tuned: float, base: float, base_name: str, dev: DevSet) -> dict:
    """The verdict record written to metrics.json (and read back by export and serve)."""
    delta = tuned - base
    worse = delta <= 0
    figures = f"tuned {tuned:.4f} vs {base_name} {base:.4f} {metric} on {dev.size} dev {dev.unit} ({dev.source})"
    label = WORSE if delta < 0 else "NO BETTER than the base"
    line = f"{label}: {figures}: {delta:+.4f}" if worse else f"{figures}: {delta:+.4f}"
    return {"metric": metric, "tuned": tuned, "base": base, "base_name": base_name, "delta": delta,
            "worse": worse, "dev_size": dev.size, "dev_unit": dev.unit, "dev_source": dev.source, "line": line}


def verdict_message(verdict: dict) -> str:
    """The line a run prints at its end; a regression also names its likely causes."""
    if not verdict["worse"]:
        return "verdict: " + verdict["line"]
    return (f"verdict: {verdict['line']}\n"
            f"  best/ is not better than the model this run started from. Likely causes: {LIKELY_CAUSES}. "
            "Do not ship it as it is.")


def run_verdict(checkpoint: str | os.PathLike) -> dict | None:
    """The verdict of the run a checkpoint folder belongs to (its metrics.json, in it or beside it:
    `run/best` -> `run/metrics.json`); None for a model of no run, or a run without a dev set."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        return None
    for path in (folder / "metrics.json", folder.parent / "metrics.json"):
        if path.is_file():
            try:
                metrics = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            verdict = metrics.get("verdict") if isinstance(metrics, dict) else None
            return verdict if isinstance(verdict, dict) and "worse" in verdict else None
    return None


def regression_warning(name: str, checkpoint: str | os.PathLike) -> str | None:
    """The warning `qtune export` / `qtune serve` print for a model whose run ended worse than its base."""
    verdict = run_verdict(checkpoint)
    if not verdict or not verdict.get("worse"):
        return None
    return f"warning: {name} is not better than the model it was trained from: {verdict.get('line', '')}"
