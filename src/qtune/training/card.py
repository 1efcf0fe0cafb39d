"""The model card of an export: a Hugging Face README.md (YAML front matter with base_model,
library_name, pipeline_tag and the metrics as a model-index), then what the model was trained from
and on, its dev figures against the base, the verdict, and its test figures when the export is
given the report of a `qtune eval ... --compare BASE --output DIR` run.

Everything comes from files the run wrote (config.yaml, metrics.json beside the checkpoint) and
from the checkpoint's qtune.json; a model of no run (a hub id, a base model) gets a card without
training figures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from qtune.errors import QtuneError
from qtune.evaluation.report import column_name
from qtune.training.verdict import run_verdict


def _run_file(checkpoint: Path, name: str) -> Path | None:
    for path in (checkpoint / name, checkpoint.parent / name):
        if path.is_file():
            return path
    return None


def read_test_report(path: str | os.PathLike) -> dict[str, dict]:
    """A `qtune eval --output DIR` report (DIR or DIR/metrics.json): model name -> its metrics."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QtuneError(f"{path}: test report not found (the metrics.json of `qtune eval ... --output DIR`)") from None
    except (OSError, ValueError) as e:
        raise QtuneError(f"{path}: not a qtune eval report: {e}") from None
    if not isinstance(report, dict) or not report or not all(isinstance(v, dict) for v in report.values()):
        raise QtuneError(f"{path}: not a qtune eval report (expected model name -> metrics, as `qtune eval "
                         "--output` writes)")
    return report


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch", "groups")}


def model_card(checkpoint: str | os.PathLike, *, meta, pipeline_tag: str, library_name: str, body: str = "",
               test_report: dict[str, dict] | None = None, test_source: str | None = None) -> str:
    """The README.md of an export of `checkpoint` (a qtune folder, usually `run/best`); `body` is
    the task's own usage text, kept after the training section."""
    checkpoint = Path(checkpoint)
    settings = {}
    config_path = _run_file(checkpoint, "config.yaml")
    if config_path is not None:
        settings = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    verdict = run_verdict(checkpoint)
    base = settings.get("model") or meta.base_model
    results = []
    if verdict:
        metric = verdict["metric"]
        results.append({"task": {"type": pipeline_tag},
                        "dataset": {"name": verdict["dev_source"], "type": "dev"},
                        "metrics": [{"type": metric, "value": round(verdict["tuned"], 4), "name": f"dev {metric}"},
                                    {"type": metric, "value": round(verdict["base"], 4),
                                     "name": f"dev {metric} of {verdict['base_name']}"}]})
    if test_report:
        for name, metrics in test_report.items():
            numbers = _numbers(metrics)
            if numbers:
                results.append({"task": {"type": pipeline_tag},
                                "dataset": {"name": test_source or "test", "type": "test"},
                                "metrics": [{"type": k, "value": round(v, 4),
                                             "name": f"test {k} ({column_name(name, metrics)})"}
                                            for k, v in numbers.items()]})
    front = {"base_model": str(base), "library_name": library_name, "pipeline_tag": pipeline_tag,
             "tags": ["qtune", meta.task]}
    if results:
        front["model-index"] = [{"name": checkpoint.parent.name if checkpoint.name in ("best", "last")
                                 else checkpoint.name, "results": results}]
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {meta.task} model tuned from {base}", ""]
    if settings:
        how = "full fine-tuning" if settings.get("full") else f"LoRA r={settings.get('lora_r')}"
        lines += [f"Trained with `qtune train {meta.task}` on `{settings.get('train')}` ({how}, lr "
                  f"{settings.get('lr')}, {settings.get('epochs')} epochs, batch {settings.get('batch_size')}, "
                  f"seed {settings.get('seed')}).", ""]
    if verdict:
        lines += ["## Dev set: tuned vs base", "", f"**Verdict:** {verdict['line']}", ""]
    else:
        lines += ["No dev figures: the run had no dev set (or this is not a trained qtune folder).", ""]
    if test_report:
        metrics = sorted({k for m in test_report.values() for k in _numbers(m)})
        lines += [f"## Test set ({test_source or 'test'})", "", "| model | " + " | ".join(metrics) + " |",
                  "|---" * (len(metrics) + 1) + "|"]
        for name, m in test_report.items():
            numbers = _numbers(m)
            lines.append(f"| {column_name(name, m)} | "
                         + " | ".join(f"{numbers[k]:.4f}" if k in numbers else "" for k in metrics) + " |")
        lines.append("")
    else:
        lines += ["No test figures were given to the export (`qtune export --test-report DIR`, the `--output` "
                  "of `qtune eval ... --compare BASE`).", ""]
    lines += meta.settings.card_lines()
    if body:
        lines += [body.strip(), ""]
    return "\n".join(lines)
