"""JSON-extraction evaluation: parsing a generated answer, field-level metrics, and reports."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from qtune.evaluation.report import markdown_table, short_name
from qtune.io import write_json, write_text

SUMMARY_METRICS = ("json_valid", "all_fields_exact")
# A whole answer wrapped in a Markdown code fence: ```json ... ``` (the language tag is optional).
_FENCE = re.compile(r"\A```[ \t]*(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```\Z", re.DOTALL | re.IGNORECASE)


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_answer(text: str) -> tuple[object | None, str | None]:
    """(object, None) when `text` is one JSON object, else (None, reason).

    Surrounding whitespace is ignored, and so is a Markdown fence around the whole answer
    (```json ... ``` or ``` ... ```). Anything else around the object (a sentence before it, text
    after it, a second object) makes the answer invalid: the model was trained to write the object
    alone. NaN and Infinity are not JSON and are rejected. Reasons: "not valid JSON: ..." or
    "not a JSON object: got list" (str, int, float, bool, null).
    """
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    if not text:
        return None, "not valid JSON: empty answer"
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
    except ValueError as e:
        return None, f"not valid JSON: {e}"
    if not isinstance(value, dict):
        return None, f"not a JSON object: got {_kind(value)}"
    return value, None


def _parse_reference(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a plain-text target


def _field_text(value: object) -> str:
    """A field value as compared: text as it is, anything else as compact JSON; then stripped."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text.strip()


def extraction_metrics(references: Sequence[str], predictions: Sequence[object | None]) -> dict:
    """Exact-match metrics of parsed answers against target texts, row by row.

    `references` are the target texts (as `qtune.data.extraction.target_text` writes them, usually
    a JSON object); `predictions` the parsed answers (`parse_answer`'s value; None when the answer
    was not a JSON object). The rules, exactly:

    - "count": the number of rows.
    - "json_valid": the share of predictions that are dicts.
    - Each reference is parsed with `json.loads`; a text that is not JSON stands for itself.
    - Values are compared as text: a string as it is, any other value (number, bool, null, list,
      object) as ``json.dumps(value, ensure_ascii=False, sort_keys=True)``; both sides stripped of
      surrounding whitespace, then compared exactly (case-sensitive). So 13800000000 and
      "13800000000" match; null and "" do not, nor 1 and 1.0, nor true and 1.
    - "all_fields_exact": the share of rows where the prediction is correct. For a JSON-object
      reference: the prediction is a dict holding every reference key with an equal value (extra
      keys in the prediction do not matter; an empty reference object matches any dict). For any
      other reference: the prediction (not None) equals the parsed reference by the rule above.
    - "fields": {key: share of rows that get this key right}, keys being the union of the keys of
      the object references in first-seen order. Each key is scored over the rows whose reference
      object has it (all rows when every reference has the same keys); a prediction that is not a
      dict, or lacks the key, is wrong. Rows whose reference is not an object are left out here.
    """
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not references:
        raise ValueError("no rows to score")
    fields: dict[str, list[int]] = {}  # key -> [right, scored]
    valid = exact = 0
    for reference_text, prediction in zip(references, predictions):
        reference = _parse_reference(reference_text)
        is_dict = isinstance(prediction, dict)
        valid += is_dict
        if not isinstance(reference, dict):
            exact += prediction is not None and _field_text(prediction) == _field_text(reference)
            continue
        row_exact = is_dict
        for key, value in reference.items():
            right = is_dict and key in prediction and _field_text(prediction[key]) == _field_text(value)
            tally = fields.setdefault(key, [0, 0])
            tally[0] += right
            tally[1] += 1
            row_exact = row_exact and right
        exact += row_exact
    n = len(references)
    return {"count": n, "json_valid": valid / n, "all_fields_exact": exact / n,
            "fields": {key: right / scored for key, (right, scored) in fields.items()}}


# --- reports -------------------------------------------------------------------------------------

def _field_names(results: dict[str, dict]) -> list[str]:
    names: dict[str, None] = {}
    for metrics in results.values():
        names.update(dict.fromkeys(metrics.get("fields", {})))
    return list(names)


def _rows(results: dict[str, dict]) -> list[tuple[str, list[object]]]:
    """(label, value per model) for the summary metrics and every field; "" where a model has none."""
    models = list(results.values())
    rows = [(key, [m.get(key, "") for m in models]) for key in SUMMARY_METRICS]
    rows += [(f"field:{f}", [m.get("fields", {}).get(f, "") for m in models]) for f in _field_names(results)]
    return rows


def extraction_report(results: dict[str, dict], data: str) -> str:
    """Markdown report; `results` maps a model name to its `extraction_metrics`, shown side by side.

    With two models (--model first, --compare second) a "change" column holds model minus compare.
    """
    names = list(results)
    header = ["metric", *names]
    rows = [[label, *values] for label, values in _rows(results)]
    if len(names) == 2:
        header.append("change")
        for row in rows:
            a, b = row[1], row[2]
            row.append(f"{a - b:+.4f}" if isinstance(a, float) and isinstance(b, float) else "")
    counts = ", ".join(f"{short_name(n)}: {results[n].get('count', '?')}" for n in names)
    return "\n".join([f"# JSON extraction: {data}", "", f"Rows scored: {counts}", "",
                      markdown_table(header, rows), ""])


def plot_extraction(results: dict[str, dict], path: Path) -> None:
    """Grouped bars: JSON validity, all-fields exact match and each field's exact match, per model."""
    import numpy as np

    from qtune.plotting import pyplot, save_png

    plt = pyplot()

    rows = _rows(results)
    labels = [label.removeprefix("field:") for label, _ in rows]
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels)), 4))
    for i, name in enumerate(results):
        values = [v[i] if isinstance(v[i], (int, float)) else 0.0 for _, v in rows]
        bars = ax.bar(np.arange(len(labels)) + i * width, values, width, label=short_name(name))
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(np.arange(len(labels)) + width * (len(results) - 1) / 2, labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact match")
    ax.legend(fontsize=8)
    ax.set_title("JSON extraction", fontsize=10)
    save_png(fig, path)


def write_extraction_outputs(results: dict[str, dict], data: str, output: str | Path) -> None:
    """``metrics.json``, ``report.md`` and ``extraction.png`` in `output`, each written atomically."""
    output = Path(output)
    write_json(output / "metrics.json", results)
    write_text(output / "report.md", extraction_report(results, data))
    plot_extraction(results, output / "extraction.png")
