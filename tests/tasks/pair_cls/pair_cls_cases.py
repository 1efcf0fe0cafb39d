"""Shared runs and inputs of the pair-cls CLI tests: one tiny BERT run (a module fixture, imported
by the test modules) feeds the eval, predict and export tests."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from qtune.cli import main

from support import synthetic_pairs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--epochs", "1", "--batch-size", "16", "--max-length", "32", "--device", "cpu"]


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# ---------------------------------------------------------------- shared runs and inputs


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, synthetic_files, tmp_path_factory) -> Path:
    """One LoRA run of the tiny BERT through the CLI: OUT folder."""
    out = tmp_path_factory.mktemp("cli-train") / "out"
    code = main(["train", "pair-cls", "--model", tiny_bert_dir, "--train", str(synthetic_files["train"]),
                 "--eval", str(synthetic_files["eval"]), "--output", str(out), "--lr", "0.003", "--seed", "5",
                 "--logging-steps", "5", *TINY])
    assert code == 0
    return out


PROBE_COLUMNS = ["id", "sentence1", "sentence2", "label", "note"]


@pytest.fixture(scope="module")
def probe_rows() -> list[dict]:
    """Rows with extra columns (an id, a label, a note with commas, quotes and CJK) to be kept as they are."""
    return [{"id": f"r{i:02d}", "sentence1": a, "sentence2": b, "label": str(y), "note": f'note "{i}", 第{i}行'}
            for i, (a, b, y) in enumerate(synthetic_pairs(40, seed=11))]


def write_rows(path: Path, rows: list[dict], columns: list[str], header: bool = True) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(columns)
        writer.writerows([row[c] for c in columns] for row in rows)
    return path


@pytest.fixture(scope="module")
def probe_csv(probe_rows, tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("probe") / "probe.csv", probe_rows, PROBE_COLUMNS)


@pytest.fixture(scope="module")
def best_predictions(trained, probe_csv, tmp_path_factory) -> tuple[list[str], list[dict]]:
    """`predict pair-cls --model OUT/best` on the probe CSV: (columns, rows)."""
    output = tmp_path_factory.mktemp("pred") / "pred.csv"
    code = main(["predict", "pair-cls", "--model", str(trained / "best"), "--input", str(probe_csv),
                 "--output", str(output), "--device", "cpu"])
    assert code == 0
    return read_csv(output)
