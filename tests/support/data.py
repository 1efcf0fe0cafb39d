"""Synthetic data for the tests: the tiny vocabulary, data-file writers and readers, and DataError checks."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

ANIMALS = ["cat", "dog", "horse", "cow", "sheep", "goat", "mouse", "tiger"]
VEHICLES = ["car", "bus", "train", "truck", "bike", "plane", "boat", "tram"]
FILLER = ["the", "a", "my", "old", "big", "small", "red", "green", "is", "here", "there", "now"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

FAQ_QUESTIONS = ["the cat is here", "a red bus now", "my old horse", "big green train there", "small goat"]

BOM = b"\xef\xbb\xbf"


def synthetic_pairs(n: int, seed: int) -> list[tuple[str, str, int]]:
    """Label 1 when both sentences talk about the same kind of thing (animal or vehicle).

    The two nouns always differ and fillers are drawn independently for each side, so word
    overlap says nothing: only a model trained to relate the two sentences beats chance.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        first_kind, second_kind = rng.choice([ANIMALS, VEHICLES]), rng.choice([ANIMALS, VEHICLES])
        a = rng.choice(first_kind)
        b = rng.choice([w for w in second_kind if w != a])
        s1 = " ".join(rng.sample(FILLER, rng.randint(0, 2)) + [a])
        s2 = " ".join(rng.sample(FILLER, rng.randint(0, 2)) + [b])
        rows.append((s1, s2, int(first_kind is second_kind)))
    return rows


GROUP_WORDS = ["cat", "dog", "bus", "car", "cow", "goat", "train", "red", "green", "big", "small", "old"]


def write_query_groups(path: Path, n: int) -> Path:
    """`n` distinct queries as FlagEmbedding JSONL, each with one positive and one negative."""
    rows = []
    for i in range(n):
        a, b, c = GROUP_WORDS[i % 12], GROUP_WORDS[(i * 5 + 1) % 12], GROUP_WORDS[(i * 7 + 3) % 12]
        rows.append({"query": f"{a} {b} {i}", "pos": [f"{a} {b} {c}"], "neg": [f"{c} {c} {b}"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_pairs_csv(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence1", "sentence2", "label"])
        writer.writerows(rows)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


# ---------------------------------------------------------------- files

def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def jsonl(objs) -> str:
    """JSONL text: objects are serialised (non-ASCII kept), strings are taken as lines as they are."""
    return "".join((o if isinstance(o, str) else json.dumps(o, ensure_ascii=False)) + "\n" for o in objs)


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- data errors

def data_error(func, *args, **kwargs):
    """The DataError that `func(*args, **kwargs)` raises."""
    from qtune.errors import DataError

    with pytest.raises(DataError) as info:
        func(*args, **kwargs)
    return info.value


def assert_located(err, path: Path, line: int | None, field: str | None) -> None:
    """A DataError names exactly this file, line and field, in the message too."""
    assert (err.path, err.line, err.field) == (str(path), line, field)
    where = str(path) if line is None else f"{path}:{line}"
    assert str(err).startswith(where + (f", field '{field}'" if field else "") + ": ")
