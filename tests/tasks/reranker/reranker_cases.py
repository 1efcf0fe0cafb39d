"""Shared data, models and runs of the reranker tests (fixtures are imported by the test modules).

As in test_embedding_cli.py, torch runs on one thread while these modules run, and the BERT
cross-encoder built here has dropout 0: with hidden size 32, dropout drowns the signal.

Two synthetic tasks only training can solve (an untrained model ranks at chance):
- "category" (BERT cross-encoder): the query is "animal" or "vehicle" (with a filler word or not);
  the relevant document names a thing of that kind, the negatives things of the other kind. The
  same documents are relevant to one query and not to the other, so the model must relate the two.
- "vehicles" (tiny Qwen3, which is slow to train on a CPU): documents about vehicles are relevant,
  whatever the query says.
"""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import pytest
import torch
from support import (
    ANIMALS,
    FILLER,
    SPECIALS,
    VEHICLES,
)

import qtune
from qtune.cli import main
from qtune.data.retrieval import (
    read_query_groups,
    write_beir,
    write_query_groups,
)
from qtune.records import QueryGroup
from qtune.tasks.reranker.groups import (
    group_ranking_metrics,
)
from qtune.tasks.reranker.model import Reranker

KINDS = {"animal": ANIMALS, "vehicle": VEHICLES}

# The Qwen3-Reranker recipe (model card), written out here rather than taken from qtune.
QWEN_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
               "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
QWEN_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
EXPECTED_PROMPT = (QWEN_PREFIX + "<Instruct>: " + QWEN_INSTRUCTION + "\n<Query>: what is qtune\n<Document>: a toolkit"
                   + QWEN_SUFFIX)

# Pairs of very different lengths, so a batch of them is padded.
PAIRS = [("what is qtune", "a toolkit"),
         ("animal", "the cat"),
         ("which vehicle is the fastest on land and on water", "the old red train is here now, the boat is there"),
         ("花呗怎么还款", "花呗如何还钱"),
         ("vehicle", "my big green bus is here and the small tram is there now"),
         ("x", "y")]

# BERT cross-encoder training (full fine-tuning; measured: eval mrr 0.50 before, 1.00 from epoch 5 on; 1.5 s).
CE_FLAGS = ["--full", "--lr", "3e-3", "--epochs", "12", "--batch-size", "8", "--group-size", "4",
            "--max-length", "32", "--device", "cpu", "--seed", "1"]
# Qwen3 training on the "vehicles" rule (full; measured: eval mrr 0.39 before, 0.96 after 16 steps; 3 s).
QWEN_INSTRUCTION_TRAINED = "Find passages about vehicles"
QWEN_FLAGS = ["--full", "--lr", "3e-3", "--epochs", "2", "--batch-size", "4", "--group-size", "4",
              "--max-length", "96", "--eval-steps", "4", "--device", "cpu", "--seed", "1",
              "--instruction", QWEN_INSTRUCTION_TRAINED]


# ---------------------------------------------------------------- data, models and shared runs


def make_groups(n: int, seed: int, rule: str = "category", negatives: int = 3) -> list[QueryGroup]:
    rng = random.Random(seed)

    def text(word: str) -> str:
        return " ".join(rng.sample(FILLER, rng.randint(0, 1)) + [word])

    groups = []
    for _ in range(n):
        word = rng.choice(sorted(KINDS))
        kind = {"animals": ANIMALS, "vehicles": VEHICLES}.get(rule) or KINDS[word]
        other = VEHICLES if kind is ANIMALS else ANIMALS
        groups.append(QueryGroup(text(word), (text(rng.choice(kind)),),
                                 tuple(text(w) for w in rng.sample(other, negatives))))
    return groups


def group_mrr(reranker: Reranker, groups) -> dict:
    """group_ranking_metrics of `reranker` on `groups` (the positive first in each)."""
    scores = [reranker.score([(g.query, d) for d in (g.positives[0], *g.negatives)]) for g in groups]
    return group_ranking_metrics(scores)


@pytest.fixture(scope="module")
def ce_dir(tmp_path_factory) -> str:
    """A tiny BERT cross-encoder saved WITH its one-logit head (so a reload is not random), dropout 0,
    and the tiny_bert_dir fixture's vocabulary plus "animal" and "vehicle"."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertTokenizerFast,
    )

    folder = tmp_path_factory.mktemp("cross-encoder")
    words = SPECIALS + sorted(set(ANIMALS + VEHICLES + FILLER + list(KINDS))) + list("abcdefghijklmnopqrstuvwxyz")
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0, num_labels=1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        # wider than BERT's 0.02: training breaks the symmetry of a near-constant model
                        # reliably (every data and training seed tried), and the scores spread out
                        initializer_range=0.1)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def qwen_tokenizer(tiny_qwen_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("rerank-data")
    # two groups without negatives at the end: left out of training, and said so
    no_negatives = [QueryGroup("animal", ("the cat",)), QueryGroup("my vehicle", ("a bus",))]
    write_query_groups(folder / "train.jsonl", make_groups(128, seed=1) + no_negatives)
    write_query_groups(folder / "eval.jsonl", make_groups(32, seed=2))
    write_query_groups(folder / "small.jsonl", make_groups(32, seed=3))
    write_query_groups(folder / "vehicles-train.jsonl", make_groups(32, seed=4, rule="vehicles"))
    write_query_groups(folder / "vehicles-eval.jsonl", make_groups(32, seed=5, rule="vehicles"))
    # BEIR: 16 documents, 4 queries; every document of the query's kind is relevant
    docs = {f"d{i:02d}": f"{FILLER[i % len(FILLER)]} {w}" for i, w in enumerate(ANIMALS + VEHICLES)}
    queries = {"q0": "animal", "q1": "my animal", "q2": "vehicle", "q3": "the vehicle"}
    qrels = {q: {d: 1 for d, t in docs.items() if t.split()[-1] in KINDS[text.split()[-1]]}
             for q, text in queries.items()}
    write_beir(folder / "beir", corpus=docs, queries=queries, qrels=qrels)
    return {"train": folder / "train.jsonl", "eval": folder / "eval.jsonl", "small": folder / "small.jsonl",
            "vehicles_train": folder / "vehicles-train.jsonl", "vehicles_eval": folder / "vehicles-eval.jsonl",
            "beir": folder / "beir"}


@pytest.fixture(scope="module")
def ce_run(ce_dir, data, tmp_path_factory) -> dict:
    """`qtune train reranker` (listwise) on the cross-encoder: OUT folder, stdout and the base model's eval."""
    before = group_mrr(qtune.load(ce_dir, task="reranker", device="cpu"), read_query_groups(data["eval"]))
    out = tmp_path_factory.mktemp("ce-train") / "out"
    argv = ["train", "reranker", "--model", ce_dir, "--train", data["train"], "--eval", data["eval"],
            "--output", out, *CE_FLAGS]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([str(a) for a in argv])
    assert code == 0
    return {"out": out, "stdout": stdout.getvalue(), "before": before, "base": ce_dir, "eval": data["eval"]}


@pytest.fixture(scope="module")
def qwen_run(tiny_qwen_dir, data, tmp_path_factory) -> dict:
    before = group_mrr(qtune.load(tiny_qwen_dir, task="reranker", device="cpu"),
                       read_query_groups(data["vehicles_eval"]))
    out = tmp_path_factory.mktemp("qwen-train") / "out"
    code = main([str(a) for a in ["train", "reranker", "--model", tiny_qwen_dir, "--train", data["vehicles_train"],
                                  "--eval", data["vehicles_eval"], "--output", out, *QWEN_FLAGS]])
    assert code == 0
    return {"out": out, "stdout": "", "before": before, "base": tiny_qwen_dir, "eval": data["vehicles_eval"]}
