"""JSON-extraction data: SFT rows for a causal LM that turns free text into a JSON object.

A data file is JSONL, one example per line::

    {"instruction": str (optional), "input": str, "output": {...} | str}

`output` is the answer the model must write: a JSON object (serialised with `target_text`, so the
model learns compact, unescaped JSON) or a string kept exactly as it is. Other keys on a line are
ignored. A Parquet file, datasets folder or hub dataset (`qtune.data.sources`) with these columns
reads the same (`output` as a struct or as text; a null is a missing field). `pii_to_sft` converts
the Chinese PII person records (a JSON list) into such files.

Every problem is raised as a DataError naming file, 1-based line and field.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from qtune.config import is_integer
from qtune.data.sources import COLUMNAR_TYPES, is_columnar, source_name
from qtune.data.tables import _decode, iter_records, json_problem, required_text
from qtune.errors import DataError, QtuneError
from qtune.io import write_jsonl
from qtune.records import ExtractionExample

EXTRACTION_SUFFIXES = (".jsonl", ".json")

PII_INSTRUCTION = ("Extract the person's name, address, email and phone from the text. "
                   "Answer with a JSON object with the keys name, address, email, phone.")
# Output key -> field of a PII person record, in the order the model writes them.
PII_FIELDS = {"name": "name", "address": "location", "email": "emailAddress", "phone": "phoneNumbers"}
PII_TEXT_FIELD = "naturalParagraph"


def target_text(value: object) -> str:
    """The answer text the model is trained to write.

    A dict or list becomes ``json.dumps(value, ensure_ascii=False)`` (default separators ", " and
    ": ", non-ASCII text as it is, not as \\u escapes); a string is returned unchanged.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"an extraction target is a dict, a list or a string, not {type(value).__name__}")


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


# --- reading SFT rows ----------------------------------------------------------------------------

def _instruction(obj: dict, path: str | Path, line: int) -> str | None:
    value = obj.get("instruction")
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"expected text, got {_kind(value)}", path=str(path), line=line, field="instruction")
    return value if value.strip() else None  # empty: the model's default instruction


def _output(obj: dict, path: str | Path, line: int, require: bool) -> str | None:
    if obj.get("output") is None:
        if not require:
            return None
        reason = "missing field" if "output" not in obj else "expected a JSON object or text, got null"
        raise DataError(reason, path=str(path), line=line, field="output")
    value = obj["output"]
    if isinstance(value, dict):
        return target_text(value)
    if isinstance(value, str):
        if not value.strip():
            raise DataError("empty text", path=str(path), line=line, field="output")
        return value
    raise DataError(f"expected a JSON object or text, got {_kind(value)}", path=str(path), line=line,
                    field="output")


def read_extraction(path: str | Path, *, require_output: bool = True) -> list[ExtractionExample]:
    """Extraction examples from a JSONL file (``.jsonl`` or ``.json``, one object per line), or a
    Parquet file, datasets folder or hub dataset with those columns.

    - ``input``: required, non-empty text.
    - ``instruction``: optional text; missing, null, empty or blank means the model's default
      instruction (``None`` in the record).
    - ``output``: a JSON object (stored as `target_text` of it) or non-empty text (stored as it is).
      Required when `require_output` (training, evaluation); otherwise a missing or null output is
      ``None``, while a present one is still checked. Lists, numbers and booleans are errors.

    Blank lines are skipped and other keys ignored; the file must hold at least one example.
    """
    path = Path(path)
    if path.suffix.lower() not in EXTRACTION_SUFFIXES and not is_columnar(path):
        raise DataError(f"unsupported file type '{path.suffix}'; extraction data is JSONL "
                        f"({' or '.join(EXTRACTION_SUFFIXES)}, one object per line) or {COLUMNAR_TYPES}",
                        path=str(path))
    path, examples = source_name(path), []
    for line, obj in iter_records(path):
        text = required_text(obj, "input", path, line, kind="field")
        examples.append(ExtractionExample(input=text, output=_output(obj, path, line, require_output),
                                          instruction=_instruction(obj, path, line), line=line))
    if not examples:
        raise DataError("no data rows", path=str(path))
    return examples


# --- PII person records -> SFT rows --------------------------------------------------------------

def _pii_value(record: dict, field: str, index: int, path: str | Path, *, allow_int: bool) -> str | None:
    """The field as text; None when it is missing, null or blank (the record is skipped)."""
    value = record.get(field)
    if value is None:
        return None
    if allow_int and is_integer(value):
        return str(value)  # phone numbers are sometimes written as JSON numbers
    if not isinstance(value, str):
        expected = "text or an integer" if allow_int else "text"
        raise DataError(f"record at index {index}: expected {expected}, got {_kind(value)}", path=str(path),
                        field=field)
    return value if value.strip() else None


def pii_to_sft(source: str | Path, output_dir: str | Path, *, eval_fraction: float = 0.1, seed: int = 42,
               instruction: str | None = PII_INSTRUCTION) -> dict:
    """Convert PII person records (a JSON list of objects, as in ``data_person_1000_zh.json``, or the
    rows of a Parquet file, datasets folder or hub dataset, index = row - 1) into extraction SFT files
    ``output_dir/train.jsonl`` and ``output_dir/eval.jsonl``.

    Each record becomes ``{"instruction": instruction, "input": naturalParagraph, "output": {"name":
    name, "address": location, "email": emailAddress, "phone": phoneNumbers}}``, every output value
    as text (an integer becomes its digits). A record with any of these five fields missing, null or
    blank is skipped (counted in "skipped"); a field of another type (a list, a float, ...) or an
    item that is not an object is an error naming its 0-based index in the list.

    The split, exactly: the kept records in list order get indices 0..n-1,
    ``random.Random(seed).shuffle(indices)``, and the first ``round(eval_fraction * n)`` indices are
    eval rows, the rest train rows. Both files list their rows in source order. Each file is
    written atomically.

    Returns {"records" (items in the source list), "train", "eval", "skipped"}.
    """
    if not 0 < eval_fraction < 1:
        raise QtuneError(f"eval fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    path = Path(source)
    if is_columnar(source):  # one record per row; a null is a missing field, so the record is skipped
        path = source_name(source)
        data = [fields for _, fields in iter_records(path)]
    else:
        try:
            data = json.loads(_decode(path))
        except (ValueError, RecursionError) as e:
            line = e.lineno if isinstance(e, json.JSONDecodeError) else None  # the parser's limits say no line
            raise DataError(f"not valid JSON: {json_problem(e)}", path=str(path), line=line) from None
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of person records, got {_kind(data)}", path=str(path))
    if not data:
        raise DataError("no records", path=str(path))

    rows = []
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"record at index {index}: expected a JSON object, got {_kind(record)}", path=str(path))
        text = _pii_value(record, PII_TEXT_FIELD, index, path, allow_int=False)
        values = {key: _pii_value(record, field, index, path, allow_int=True) for key, field in PII_FIELDS.items()}
        if text is None or any(v is None for v in values.values()):
            continue
        rows.append({"instruction": instruction, "input": text, "output": values})
    skipped = len(data) - len(rows)

    n_eval = round(eval_fraction * len(rows))
    if n_eval == 0 or n_eval == len(rows):
        side = "eval" if n_eval == 0 else "train"
        raise DataError(f"{len(rows)} usable records with eval fraction {eval_fraction} leave no {side} row"
                        f" ({skipped} skipped)", path=str(path))
    indices = list(range(len(rows)))
    random.Random(seed).shuffle(indices)
    eval_set = set(indices[:n_eval])

    out = Path(output_dir)
    write_jsonl(out / "train.jsonl", (r for i, r in enumerate(rows) if i not in eval_set))
    write_jsonl(out / "eval.jsonl", (r for i, r in enumerate(rows) if i in eval_set))
    return {"records": len(data), "train": len(rows) - n_eval, "eval": n_eval, "skipped": skipped}
