"""Offline example data for `qtune demo`: customer-service questions from a banking / shopping app.

The table, the package data file `intents.jsonl`, holds 40 hand-written FAQ intents (password
resets, refunds, deliveries, cards, fees, app login, ...). Each intent has a canonical question, a
short help-desk answer and 7-8 paraphrases a customer might type, typos included. The intents
come in confusable pairs ("reset my password" vs "change my email address", "card declined" vs
"card stolen", ...) that share vocabulary but not meaning, so word overlap alone cannot solve the
task.

From the table, `make_pairs` builds a question-matching data set (same intent or not) to
fine-tune a small sentence encoder, and `write_demo_files` writes it as `train.csv` / `dev.csv`
together with `faq.csv`, the knowledge base of canonical questions and answers.

Everything here is standard library only; importing it reads the one small table file.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from qtune.io import atomic_path

__all__ = [
    "FaqIntent",
    "INTENTS",
    "CONFUSABLE_PAIRS",
    "sibling_id",
    "make_pairs",
    "write_demo_files",
]

Pair = tuple[str, str, int]


@dataclass(frozen=True)
class FaqIntent:
    id: str
    question: str
    answer: str
    paraphrases: tuple[str, ...]


# The table lives in intents.jsonl next to this module, one intent per line:
# {"id", "question", "answer", "paraphrases": [...]}, in a fixed order.
# Consecutive intents form a confusable pair (see CONFUSABLE_PAIRS below): they reuse each
# other's words on purpose, while paraphrases of one intent often share few words with it.
def _read_intents() -> tuple[FaqIntent, ...]:
    """The 40 FAQ intents from the package data file `intents.jsonl`."""
    text = (files("qtune.demo") / "intents.jsonl").read_text(encoding="utf-8")
    return tuple(FaqIntent(row["id"], row["question"], row["answer"], tuple(row["paraphrases"]))
                 for row in map(json.loads, filter(str.strip, text.splitlines())))


INTENTS: tuple[FaqIntent, ...] = _read_intents()

CONFUSABLE_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (INTENTS[i].id, INTENTS[i + 1].id) for i in range(0, len(INTENTS), 2)
)

TRAIN_PAIRS = 400
DEV_PAIRS = 150
POSITIVE_RATIO = 0.4
# Paraphrases per intent kept out of train. Three leaves three positive pairs per intent in dev
# and still at least five sentences (the canonical question plus four) per intent in train.
DEV_PARAPHRASES_PER_INTENT = 3


def sibling_id(intent_id: str) -> str:
    """The id of the intent deliberately written to be confused with `intent_id`."""
    for a, b in CONFUSABLE_PAIRS:
        if intent_id == a:
            return b
        if intent_id == b:
            return a
    raise KeyError(intent_id)


def make_pairs(seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """Build (train, dev) lists of (sentence1, sentence2, label); label 1 = same intent.

    About 40% of each split is positive; negatives are half confusable-sibling pairs, half
    random other intents. Dev uses only paraphrases held out from train, so it measures
    generalisation to unseen wording, not memorisation. The result depends only on `seed`.
    """
    rng = random.Random(seed)
    train_sents, dev_sents = _split_sentences(rng)
    train = _build_split(train_sents, TRAIN_PAIRS, rng)
    dev = _build_split(dev_sents, DEV_PAIRS, rng)
    return train, dev


def _split_sentences(rng: random.Random) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per intent: the training sentences and the held-out dev paraphrases."""
    train_sents: dict[str, list[str]] = {}
    dev_sents: dict[str, list[str]] = {}
    for intent in INTENTS:
        paraphrases = list(intent.paraphrases)
        rng.shuffle(paraphrases)
        k = DEV_PARAPHRASES_PER_INTENT
        # The canonical question stays in train: it is also the FAQ entry the model will match.
        train_sents[intent.id] = [intent.question, *paraphrases[k:]]
        dev_sents[intent.id] = paraphrases[:k]
    return train_sents, dev_sents


def faq_passage(intent: FaqIntent) -> str:
    """An FAQ entry as a retrieval passage: its question followed by its answer."""
    return f"{intent.question} {intent.answer}"


def write_demo_retrieval(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Retrieval data from the same split as `make_pairs`: customer paraphrases -> FAQ entries.

    `train.jsonl` pairs each training paraphrase with its FAQ passage; `test/` is a BEIR folder
    whose corpus is the 40 FAQ passages and whose queries are the held-out dev paraphrases.
    """
    from qtune.data.retrieval import write_beir, write_query_groups
    from qtune.records import QueryGroup

    out = Path(out_dir)
    train_sents, dev_sents = _split_sentences(random.Random(seed))
    passages = {intent.id: faq_passage(intent) for intent in INTENTS}
    canonical = {intent.id: intent.question for intent in INTENTS}
    groups = [QueryGroup(text, (passages[i],)) for i in passages for text in train_sents[i] if text != canonical[i]]
    queries = {f"{i}-{n}": text for i in passages for n, text in enumerate(dev_sents[i])}
    qrels = {qid: {qid.rsplit("-", 1)[0]: 1} for qid in queries}
    write_query_groups(out / "train.jsonl", groups)
    write_beir(out / "test", passages, queries, qrels)
    return {"train": out / "train.jsonl", "test": out / "test", "corpus": out / "test" / "corpus.jsonl"}


def _build_split(sents: dict[str, list[str]], size: int, rng: random.Random) -> list[Pair]:
    n_pos = round(size * POSITIVE_RATIO)
    n_confusable = (size - n_pos) // 2
    n_random = size - n_pos - n_confusable
    seen: set[frozenset[str]] = set()

    positives = [list(itertools.combinations(sents[i], 2)) for i in sents]
    confusable = [list(itertools.product(sents[a], sents[b])) for a, b in CONFUSABLE_PAIRS]
    pairs = [(*p, 1) for p in _round_robin(positives, n_pos, seen, rng)]
    pairs += [(*p, 0) for p in _round_robin(confusable, n_confusable, seen, rng)]
    pairs += [(*p, 0) for p in _random_negatives(sents, n_random, seen, rng)]
    rng.shuffle(pairs)
    return pairs


def _round_robin(pools: Sequence[list[tuple[str, str]]], n: int, seen: set[frozenset[str]],
                 rng: random.Random) -> list[tuple[str, str]]:
    """Take `n` unseen pairs, cycling over the pools so every intent is represented evenly."""
    iters = []
    for pool in pools:
        pool = list(pool)
        rng.shuffle(pool)
        iters.append(iter(pool))
    order = list(range(len(iters)))
    rng.shuffle(order)
    taken: list[tuple[str, str]] = []
    while len(taken) < n and order:
        still_open = []
        for i in order:
            pair = _next_unseen(iters[i], seen)
            if pair is None:
                continue
            still_open.append(i)
            taken.append(_orient(pair, rng))
            if len(taken) == n:
                break
        order = still_open
    if len(taken) < n:
        raise ValueError(f"only {len(taken)} distinct pairs available, {n} wanted")
    return taken


def _next_unseen(pairs: Iterator[tuple[str, str]], seen: set[frozenset[str]]):
    for a, b in pairs:
        key = frozenset((a, b))
        if a != b and key not in seen:
            seen.add(key)
            return a, b
    return None


def _random_negatives(sents: dict[str, list[str]], n: int, seen: set[frozenset[str]],
                      rng: random.Random) -> list[tuple[str, str]]:
    """Pairs from two unrelated intents (never siblings): the easy negatives."""
    ids = list(sents)
    taken: list[tuple[str, str]] = []
    attempts = 0
    while len(taken) < n:
        attempts += 1
        if attempts > 100 * n:
            raise ValueError(f"could not draw {n} distinct random negatives")
        a = ids[len(taken) % len(ids)]  # cycle over intents so each gets its share
        b = rng.choice([i for i in ids if i != a and i != sibling_id(a)])
        pair = _next_unseen(iter([(rng.choice(sents[a]), rng.choice(sents[b]))]), seen)
        if pair is not None:
            taken.append(_orient(pair, rng))
    return taken


def _orient(pair: tuple[str, str], rng: random.Random) -> tuple[str, str]:
    # Random order, so a model cannot learn anything from which side a sentence is on.
    return pair if rng.random() < 0.5 else (pair[1], pair[0])


def write_demo_files(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write train.csv, dev.csv and faq.csv into `out_dir` (created if needed); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, dev = make_pairs(seed)
    paths = {"train": out / "train.csv", "dev": out / "dev.csv", "faq": out / "faq.csv"}
    _write_csv(paths["train"], ("sentence1", "sentence2", "label"), train)
    _write_csv(paths["dev"], ("sentence1", "sentence2", "label"), dev)
    _write_csv(paths["faq"], ("id", "question", "answer"),
               ((i.id, i.question, i.answer) for i in INTENTS))
    return paths


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    with atomic_path(path) as tmp:
        # newline="" lets the csv module write its own line endings, as its docs require.
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
