"""Synthetic single-text data for the classify tests: the label is the family of the one noun a
text contains (farm animals, road vehicles, other transport); fillers carry no signal, so only a
trained model beats chance. Every word is in the tiny BERT's vocabulary."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

FAMILIES = {"farm": ["horse", "cow", "sheep", "goat"], "road": ["car", "bus", "truck", "bike"],
            "travel": ["train", "plane", "boat", "tram"]}
LABELS = sorted(FAMILIES)  # the default class order: the sorted labels of the training file
FILLER = ["the", "a", "my", "old", "big", "small", "red", "green", "is", "here", "there", "now"]


def synthetic_texts(n: int, seed: int) -> list[tuple[str, str]]:
    """(text, label) rows: 0-3 fillers and one noun, in random order."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        words = rng.sample(FILLER, rng.randint(0, 3)) + [rng.choice(FAMILIES[label])]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, objs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs), encoding="utf-8")
    return path


PROBE = [text for text, _ in synthetic_texts(12, seed=99)] + ["cow", "the big red bus is here now", "a"]



def mean_pooled_copy(model_dir: str, folder: Path) -> str:
    """`model_dir` with a sentence-transformers config saying it was trained with mean pooling (as
    all-MiniLM-L6-v2 says): a classifier on it classifies the mean of the last hidden state."""
    import shutil

    shutil.copytree(model_dir, folder, dirs_exist_ok=True)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                   "pooling_mode_cls_token": False,
                                                                   "pooling_mode_mean_tokens": True}),
                                                       encoding="utf-8")
    return str(folder)
