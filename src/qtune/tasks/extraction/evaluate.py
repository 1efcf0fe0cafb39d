"""`qtune eval extract` and `qtune predict extract` (also `qtune extract`).

Under `torchrun` / `accelerate launch` the ranks share the generation (the same batches, so the
same answers as one process, see `qtune.evaluation.sharded`) and rank 0 alone writes."""

from __future__ import annotations

from qtune.data.extraction import read_extraction
from qtune.data.tables import table_format
from qtune.distributed import init_process_group
from qtune.errors import QtuneError
from qtune.evaluation.extraction import extraction_metrics, extraction_report, write_extraction_outputs
from qtune.evaluation.sharded import is_main, sharded_call
from qtune.io import write_jsonl
from qtune.tasks.extraction.config import ExtractEvalConfig, ExtractPredictConfig


def evaluate(config: ExtractEvalConfig, load) -> dict:
    """JSON validity and field exact match of one model (or two side by side) on a labelled JSONL."""
    examples = read_extraction(config.data)
    init_process_group()  # under a launcher: the ranks share the generation
    results = {}
    for name in [config.model] + ([config.compare] if config.compare else []):
        extractor = load(name, "extract", device=config.device, precision=config.load_precision)
        found = sharded_call(extractor, "extract_examples", examples, batch_size=config.batch_size,
                             max_new_tokens=config.max_new_tokens, progress=True)
        results[name] = extraction_metrics([e.output for e in examples], [r.output for r in found])
    if config.output and is_main():
        write_extraction_outputs(results, str(config.data), config.output)
    return results


def show_evaluation(config: ExtractEvalConfig, results: dict) -> str:
    text = extraction_report(results, config.data)
    if config.output:
        text += f"\nwrote {config.output}/metrics.json, report.md, extraction.png"
    return text


def predict(config: ExtractPredictConfig, load) -> dict:
    """Extract every row of a JSONL file ({input, instruction?}); rows are written in input order with
    `output` (parsed JSON, or null and an `error`). Returns counts (rows, parsed, failed)."""
    if table_format(config.output) != "jsonl":
        raise QtuneError(f"{config.output}: extraction results are written as JSONL (.jsonl)")
    examples = read_extraction(config.input, require_output=False)
    init_process_group()  # under a launcher: the ranks share the generation
    extractor = load(config.model, "extract", device=config.device, precision=config.load_precision)
    found = sharded_call(extractor, "extract_examples", examples, batch_size=config.batch_size,
                         max_new_tokens=config.max_new_tokens, progress=True)
    rows = []
    for example, result in zip(examples, found):
        row = {"input": example.input, "output": result.output}
        if example.instruction is not None:
            row = {"instruction": example.instruction, **row}
        if result.error is not None:
            row["error"] = result.error
            row["raw"] = result.text
        rows.append(row)
    if is_main():
        write_jsonl(config.output, rows)
    failed = sum(r.error is not None for r in found)
    return {"rows": len(found), "parsed": len(found) - failed, "failed": failed}


def show_prediction(config: ExtractPredictConfig, counts: dict) -> str:
    return (f"wrote {counts['rows']} rows to {config.output}: {counts['parsed']} parsed, {counts['failed']} did not "
            "parse (output null, see their error field)")
