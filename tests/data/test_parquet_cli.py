"""The commands take Parquet files and datasets folders wherever they take a CSV (one training run
of a tiny model, then prediction)."""

from __future__ import annotations

import csv

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict

from support import run, synthetic_pairs


def pair_rows(n: int, seed: int) -> list[dict]:
    return [{"sentence1": a, "sentence2": b, "label": label} for a, b, label in synthetic_pairs(n, seed)]


def test_train_on_parquet_evaluate_on_a_datasets_split_and_predict_parquet(tiny_bert_dir, tmp_path, capsys):
    pq.write_table(pa.Table.from_pylist(pair_rows(48, seed=1)), tmp_path / "train.parquet")
    DatasetDict(train=Dataset.from_list(pair_rows(16, seed=2)),
                test=Dataset.from_list(pair_rows(16, seed=3))).save_to_disk(str(tmp_path / "afqmc"))
    out = tmp_path / "out"
    code, _, err = run(capsys, "train", "pair-cls", "--model", tiny_bert_dir, "--train", tmp_path / "train.parquet",
                       "--eval", f"{tmp_path / 'afqmc'}:test", "--output", out, "--epochs", "1", "--batch-size", "16",
                       "--max-length", "32", "--device", "cpu")
    assert code == 0, err
    assert (out / "best" / "qtune.json").is_file()

    probe = [{"sentence1": r["sentence1"], "sentence2": r["sentence2"], "id": i} for i, r in enumerate(pair_rows(5, 4))]
    pq.write_table(pa.Table.from_pylist(probe), tmp_path / "probe.parquet")
    code, out_text, err = run(capsys, "predict", "pair-cls", "--model", out / "best", "--input",
                              tmp_path / "probe.parquet", "--output", tmp_path / "pred.csv", "--device", "cpu")
    assert code == 0, err
    with open(tmp_path / "pred.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["sentence1"], r["id"]) for r in rows] == [(p["sentence1"], str(p["id"])) for p in probe]
    assert all(0 <= float(r["probability"]) <= 1 and r["predicted_label"] in ("0", "1") for r in rows)


def test_a_datasets_folder_with_several_splits_and_none_picked(tiny_bert_dir, tmp_path, capsys):
    DatasetDict(train=Dataset.from_list(pair_rows(4, 1)), test=Dataset.from_list(pair_rows(4, 2))).save_to_disk(
        str(tmp_path / "afqmc"))
    code, _, err = run(capsys, "train", "pair-cls", "--model", tiny_bert_dir, "--train", tmp_path / "afqmc",
                       "--output", tmp_path / "out", "--device", "cpu")
    assert code == 2 and "Traceback" not in err
    assert f"{tmp_path / 'afqmc'}: holds the splits train, test; pick one as {tmp_path / 'afqmc'}:SPLIT" in err
    assert not (tmp_path / "out").exists()
