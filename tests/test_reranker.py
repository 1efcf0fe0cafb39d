"""Rerankers end to end: the Qwen3-Reranker prompt, scores checked against plain transformers by
hand, the training losses and metrics by hand, threshold calibration, two-stage evaluation and
the CLI (`train reranker`, `eval rerank`, `eval retrieval --reranker`, `calibrate`).

As in test_embedding_cli.py, torch runs on one thread while this module runs, and the BERT
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
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import qtune
from qtune.cli import main
from qtune.tasks import get
from qtune.tasks.reranker.config import RerankerConfig
from qtune.data.retrieval import read_beir, read_query_groups, write_beir, write_query_groups
from qtune.errors import QtuneError
from qtune.evaluation.metrics import calibrate_threshold
from qtune.evaluation.report import short_name
from qtune.evaluation.retrieval import rerank_run, retrieve
from qtune.evaluation.retrieval_metrics import retrieval_metrics
from qtune.tasks.reranker.encode import DEFAULT_INSTRUCTION, SYSTEM_PROMPT, PairFormatter, decoder_prompt
from qtune.tasks.reranker.model import Reranker
from qtune.records import QueryGroup, RetrievalSet
from qtune.tasks.reranker.groups import collate, group_features, group_loss, group_ranking_metrics

from conftest import (ANIMALS, FILLER, SPECIALS, VEHICLES, assert_data_accepted_up_to_the_model,
                      assert_refused_before_the_model_loads, assert_user_error, run, write_lines)

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


def train_losses(out: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "runs"))
    accumulator.Reload()
    return [e.value for e in accumulator.Scalars("train/loss")]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ce_dir(tmp_path_factory) -> str:
    """A tiny BERT cross-encoder saved WITH its one-logit head (so a reload is not random), dropout 0,
    and the conftest vocabulary plus "animal" and "vehicle"."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

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


# ---------------------------------------------------------------- 1. the Qwen3-Reranker prompt


def test_decoder_prompt_is_the_qwen3_reranker_prompt_token_by_token(qwen_tokenizer):
    tok = qwen_tokenizer
    assert SYSTEM_PROMPT in QWEN_PREFIX and DEFAULT_INSTRUCTION == QWEN_INSTRUCTION
    formatter = PairFormatter(tok, True, 512)
    features = formatter.encode("what is qtune", "a toolkit")
    ids = features["input_ids"]
    assert tok.decode(ids) == EXPECTED_PROMPT

    # token by token as the model card builds it: prefix, pair text and suffix tokenised apart
    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    middle = f"<Instruct>: {QWEN_INSTRUCTION}\n<Query>: what is qtune\n<Document>: a toolkit"
    assert ids == encode(QWEN_PREFIX) + encode(middle) + encode(QWEN_SUFFIX)
    assert features["attention_mask"] == [1] * len(ids)
    assert tok.convert_ids_to_tokens(ids[:1]) == ["<|im_start|>"]

    prompt = decoder_prompt(tok)
    assert prompt.prefix == encode(QWEN_PREFIX) and prompt.suffix == encode(QWEN_SUFFIX)
    assert (prompt.yes_id, prompt.no_id) == (tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no"))
    assert encode("yes") == [prompt.yes_id] and encode("no") == [prompt.no_id]
    assert prompt.yes_id != prompt.no_id

    custom = PairFormatter(tok, True, 512, instruction="Find the answer").encode("q", "d")["input_ids"]
    assert tok.decode(custom) == QWEN_PREFIX + "<Instruct>: Find the answer\n<Query>: q\n<Document>: d" + QWEN_SUFFIX


def test_decoder_truncation_cuts_only_the_middle(qwen_tokenizer):
    tok = qwen_tokenizer
    prompt = decoder_prompt(tok)
    fixed = len(prompt.prefix) + len(prompt.suffix)
    formatter = PairFormatter(tok, True, fixed + 40)
    ids = formatter.encode("what is qtune", "a toolkit " * 50)["input_ids"]
    assert len(ids) == fixed + 40
    assert ids[:len(prompt.prefix)] == prompt.prefix
    assert ids[-len(prompt.suffix):] == prompt.suffix
    full_middle = tok(f"<Instruct>: {QWEN_INSTRUCTION}\n<Query>: what is qtune\n<Document>: " + "a toolkit " * 50,
                      add_special_tokens=False)["input_ids"]
    assert ids[len(prompt.prefix):-len(prompt.suffix)] == full_middle[:40]  # the end of the pair text is cut
    assert "<Query>: what is qtune\n<Document>: a toolkit a toolkit" in tok.decode(ids)
    short = formatter.encode("what is qtune", "a toolkit")["input_ids"]
    assert tok.decode(short) == EXPECTED_PROMPT and len(short) < fixed + 40  # nothing cut when it fits

    # the pair needs at least 8 tokens after the template
    assert len(PairFormatter(tok, True, fixed + 8).encode("q", "d " * 30)["input_ids"]) == fixed + 8
    with pytest.raises(QtuneError, match=f"max_length {fixed + 7} leaves no room .* {fixed}-token reranker prompt"):
        PairFormatter(tok, True, fixed + 7).encode("q", "d")


def test_decoder_needs_a_chat_template_and_encoders_use_the_pair_template(ce_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ce_dir)
    with pytest.raises(QtuneError, match="chat template"):
        decoder_prompt(tok)
    formatter = PairFormatter(tok, False, 8)
    features = formatter.encode("my old cat", "the big red bus is here now")
    assert features == dict(tok("my old cat", "the big red bus is here now", truncation="longest_first",
                                max_length=8))
    assert len(features["input_ids"]) == 8 and set(features) >= {"input_ids", "token_type_ids", "attention_mask"}
    assert tok.decode(formatter.encode("cat", "bus")["input_ids"]) == "[CLS] cat [SEP] bus [SEP]"


# ---------------------------------------------------------------- 2. scores equal P(yes) / sigmoid by hand


def test_qwen_score_is_p_yes_of_plain_transformers_by_hand(tiny_qwen_dir, qwen_tokenizer):
    from transformers import AutoModelForCausalLM

    tok = qwen_tokenizer
    plain = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir).eval()
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    expected, lengths = [], []
    with torch.no_grad():
        for q, d in PAIRS:
            ids = encode(QWEN_PREFIX) + encode(f"<Instruct>: {QWEN_INSTRUCTION}\n<Query>: {q}\n<Document>: {d}") \
                + encode(QWEN_SUFFIX)
            lengths.append(len(ids))
            last = plain(input_ids=torch.tensor([ids])).logits[0, -1]
            expected.append(torch.softmax(torch.stack([last[yes], last[no]]), dim=0)[0].item())
    expected = np.array(expected)
    assert len(set(lengths)) == len(PAIRS)  # every batch below is padded

    reranker = qtune.load(tiny_qwen_dir, task="reranker", device="cpu")
    assert isinstance(reranker, Reranker) and reranker.threshold is None
    assert reranker.loaded.tokenizer.padding_side == "left"
    for batch_size in (len(PAIRS), 4, 1):
        scores = reranker.score(PAIRS, batch_size=batch_size)
        assert scores.dtype == np.float32 and scores.shape == (len(PAIRS),)
        np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert np.ptp(expected) > 1e-3  # the pairs score differently: the comparison is not of constants
    # rerank: best first, by the same scores; a tie (the same document twice) keeps the input order
    docs = [d for _, d in PAIRS[:3]] + [PAIRS[0][1]]
    alone = reranker.score([("animal", d) for d in docs])
    assert alone[0] == alone[3]
    ranked = reranker.rerank("animal", docs)
    order = [i for i, _ in ranked]
    assert sorted(order) == [0, 1, 2, 3] and order.index(0) < order.index(3)
    np.testing.assert_allclose([s for _, s in ranked], alone[order], atol=1e-6)
    assert all(a[1] >= b[1] for a, b in zip(ranked, ranked[1:]))
    assert reranker.rerank("animal", docs, top_n=2) == ranked[:2]

    # packed batches (the default above) and padded ones score the same
    padded = qtune.load(tiny_qwen_dir, task="reranker", device="cpu", packing=False)
    assert reranker.loaded.packed and not padded.loaded.packed
    np.testing.assert_allclose(padded.score(PAIRS, batch_size=len(PAIRS)), expected, atol=1e-5)
    # sharp enough to see the classic bug: right padding reads a pad token as the answer slot
    padded.loaded.tokenizer.padding_side = "right"
    assert np.abs(padded.score(PAIRS, batch_size=len(PAIRS)) - expected).max() > 1e-4


def test_cross_encoder_score_is_sigmoid_of_its_logit_by_hand(ce_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ce_dir)
    plain = AutoModelForSequenceClassification.from_pretrained(ce_dir).eval()
    assert plain.config.num_labels == 1
    pairs = [("animal", "the cat"), ("my vehicle", "a big red bus is here now"), ("cat", "dog"),
             ("the old green tram", "a horse")]
    with torch.no_grad():
        expected = np.array([torch.sigmoid(plain(**tok(q, d, return_tensors="pt")).logits[0, 0]).item()
                             for q, d in pairs])
    reranker = qtune.load(ce_dir, task="reranker", device="cpu")
    assert reranker.loaded.tokenizer.padding_side == "right"
    for batch_size in (len(pairs), 1):
        np.testing.assert_allclose(reranker.score(pairs, batch_size=batch_size), expected, atol=1e-5)
    assert np.ptp(expected) > 1e-3
    assert reranker.score([]).shape == (0,)


# ---------------------------------------------------------------- 3. losses, groups, ranking metrics


def test_group_loss_equals_hand_computed_listwise_and_pointwise():
    rows = [[2.0, 1.0, 0.5], [0.0, 1.5, -1.0]]
    logits = torch.tensor([x for row in rows for x in row])  # laid out group after group
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])

    def listwise(row):
        return -(row[0] - math.log(sum(math.exp(x) for x in row)))

    def bce(x, y):
        p = 1 / (1 + math.exp(-x))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    expected_listwise = (listwise(rows[0]) + listwise(rows[1])) / 2
    expected_pointwise = sum(bce(x, 1.0 if j == 0 else 0.0) for row in rows for j, x in enumerate(row)) / 6
    assert group_loss(logits, labels, "listwise").item() == pytest.approx(expected_listwise, abs=1e-6)
    assert group_loss(logits, labels, "pointwise").item() == pytest.approx(expected_pointwise, abs=1e-6)
    assert expected_listwise == pytest.approx(1.1154, abs=1e-4)  # the numbers themselves, written down
    assert expected_pointwise == pytest.approx(0.8537, abs=1e-4)
    with pytest.raises(QtuneError, match="unknown reranker loss 'hinge'"):
        group_loss(logits, labels, "hinge")


def test_group_features_cycle_negatives_and_drop_groups_without_any():
    def encode(query, doc):
        return {"input_ids": [len(query)] * len(doc), "pair": (query, doc)}

    groups = [QueryGroup("q1", ("p1", "p1-second"), ("n1",)),
              QueryGroup("q2", ("p2",)),
              QueryGroup("q3", ("p3",), ("n1", "n2")),
              QueryGroup("q4", ("p4",), ("a", "bb", "ccc", "dddd", "eeeee"))]
    features, dropped = group_features(groups, encode, group_size=4)
    assert dropped == 1
    assert [[p["pair"] for p in f["pairs"]] for f in features] == [
        [("q1", "p1"), ("q1", "n1"), ("q1", "n1"), ("q1", "n1")],  # the first positive; one negative, cycled
        [("q3", "p3"), ("q3", "n1"), ("q3", "n2"), ("q3", "n1")],
        [("q4", "p4"), ("q4", "a"), ("q4", "bb"), ("q4", "ccc")],  # the first group_size - 1, in file order
    ]
    assert [f["length"] for f in features] == [2 + 2 * 3, 2 + 2 + 2 + 2, 2 + 1 + 2 + 3]
    with pytest.raises(QtuneError, match="no training group has a negative"):
        group_features([QueryGroup("q", ("p",)), QueryGroup("r", ("s",))], encode, group_size=4)


def test_collate_pads_every_pair_and_marks_column_zero(ce_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ce_dir)
    formatter = PairFormatter(tok, False, 32)
    features, _ = group_features(make_groups(2, seed=9), formatter.encode, group_size=3)
    batch = collate(tok, features)
    assert batch["input_ids"].shape[0] == 6
    assert batch["group_labels"].tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    flat = [p for f in features for p in f["pairs"]]
    for row, pair in enumerate(flat):
        n = len(pair["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == pair["input_ids"]
        assert batch["attention_mask"][row].sum().item() == n


def test_group_ranking_metrics_on_hand_cases():
    cases = [np.array([0.9, 0.1, 0.2]),  # rank 1
             np.array([0.5, 0.5, 0.1]),  # a tie with the positive counts against it: rank 2
             np.array([0.1, 0.9, 0.5, 0.1]),  # rank 4 (the tie at the bottom counts too)
             np.array([0.3, 0.2])]  # rank 1
    metrics = group_ranking_metrics(cases)
    assert metrics["groups"] == 4
    assert metrics["accuracy@1"] == pytest.approx(0.5)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1) / 4)
    # all tied: the positive is last
    assert group_ranking_metrics([np.zeros(4)]) == {"accuracy@1": 0.0, "mrr": 0.25, "groups": 1}


# ---------------------------------------------------------------- 4. calibrate_threshold


def test_calibrate_threshold_f1_and_min_precision_by_hand():
    y = [1, 1, 0, 1, 0, 0]
    s = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    # cuts: k=1 F1 .5, k=2 F1 .8, k=3 .667, k=4 P .75 R 1 F1 6/7, k=5 .75, k=6 .667
    best = calibrate_threshold(y, s)
    assert best["threshold"] == 0.6
    assert (best["precision"], best["recall"]) == (0.75, 1.0)
    assert best["f1"] == pytest.approx(6 / 7)
    assert (best["pairs"], best["relevant"], best["min_precision"]) == (6, 3, None)
    # the lowest threshold meeting the precision (the most recall)
    assert calibrate_threshold(y, s, min_precision=0.75)["threshold"] == 0.6
    strict = calibrate_threshold(y, s, min_precision=0.9)
    assert (strict["threshold"], strict["precision"], strict["recall"]) == (0.8, 1.0, pytest.approx(2 / 3))
    assert strict["min_precision"] == 0.9
    assert calibrate_threshold(y, s, min_precision=0.5)["threshold"] == 0.4
    # input order does not matter
    order = [3, 0, 5, 1, 4, 2]
    assert calibrate_threshold([y[i] for i in order], [s[i] for i in order])["threshold"] == 0.6
    # F1 ties go to the higher threshold: k=1 (P 1, R .5) and k=4 (P .5, R 1) both give F1 2/3 here
    assert calibrate_threshold([1, 0, 0, 1, 0, 0], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]) == pytest.approx(
        {"threshold": 0.9, "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "pairs": 6, "relevant": 2,
         "min_precision": None})


def test_calibrate_threshold_never_splits_equal_scores():
    # cutting between the two 0.8 rows would give P 1, R 1, but a threshold cannot do that
    found = calibrate_threshold([1, 0, 0], [0.8, 0.8, 0.3])
    assert (found["threshold"], found["precision"], found["recall"]) == (0.8, 0.5, 1.0)
    found = calibrate_threshold([0, 1, 0], [0.8, 0.8, 0.3], min_precision=0.5)
    assert (found["threshold"], found["precision"]) == (0.8, 0.5)
    with pytest.raises(ValueError, match="no threshold reaches precision 0.9"):
        calibrate_threshold([0, 1, 0], [0.8, 0.8, 0.3], min_precision=0.9)


def test_calibrate_threshold_agrees_with_brute_force_over_distinct_scores():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 12))
        y = rng.integers(0, 2, n)
        if y.sum() in (0, n):
            continue
        s = rng.integers(0, 5, n) / 4.0  # many ties
        table = []
        for t in sorted(set(s.tolist())):
            pred = s >= t
            tp = int((pred & (y == 1)).sum())
            p, r = tp / pred.sum(), tp / y.sum()
            table.append((t, p, r, 0.0 if tp == 0 else 2 * p * r / (p + r)))
        found = calibrate_threshold(y, s)
        best_f1 = max(row[3] for row in table)
        expected = max(row[0] for row in table if row[3] >= best_f1 - 1e-12)  # ties: the higher threshold
        row = next(row for row in table if row[0] == expected)
        assert found["threshold"] == expected
        assert (found["precision"], found["recall"], found["f1"]) == pytest.approx(row[1:])
        for p_min in (0.5, 0.8, 1.0):
            ok = [row for row in table if row[1] >= p_min]
            if ok:
                lowest = min(ok)
                found = calibrate_threshold(y, s, min_precision=p_min)
                assert (found["threshold"], found["precision"], found["recall"]) == pytest.approx(lowest[:3])
            else:
                with pytest.raises(ValueError, match=f"no threshold reaches precision {p_min}"):
                    calibrate_threshold(y, s, min_precision=p_min)


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0]])
def test_calibrate_threshold_needs_both_classes(labels):
    with pytest.raises(ValueError, match="both relevant .* and not relevant"):
        calibrate_threshold(labels, [0.2, 0.5, 0.9])


# ---------------------------------------------------------------- 6a. rerank_run with a reranker that scores by rule


class RuleReranker:
    """Scores a document by a fixed table; records what it was asked."""

    def __init__(self, table: dict[str, float]):
        self.table, self.calls = table, []

    def score(self, pairs, batch_size=32, progress=False):
        self.calls.append((list(pairs), batch_size, progress))
        return np.array([self.table[d] for _, d in pairs], dtype=np.float32)


def test_rerank_run_reorders_the_head_keeps_the_tail_and_ties_in_retriever_order():
    data = RetrievalSet(corpus={f"d{i}": f"text {i}" for i in range(6)}, queries={"a": "query a", "b": "query b"},
                        qrels={"a": {"d0": 1}, "b": {"d1": 1}})
    table = {"text 0": 0.1, "text 1": 0.5, "text 2": 0.9, "text 3": 0.5, "text 4": 1.0, "text 5": 0.0}
    run_ = {"a": ["d0", "d1", "d2", "d3", "d4", "d5"], "b": ["d3", "d1", "d5", "d4"]}
    scorer = RuleReranker(table)
    reranked = rerank_run(scorer, data, run_, top_k=4, batch_size=7)
    # a: d2 .9, then d1 and d3 (.5, tied: retriever order), d0 .1; d4 (1.0) and d5 stay below
    assert reranked == {"a": ["d2", "d1", "d3", "d0", "d4", "d5"], "b": ["d4", "d3", "d1", "d5"]}
    pairs, batch_size, _ = scorer.calls[0]
    assert len(scorer.calls) == 1 and batch_size == 7
    assert pairs == [("query a", f"text {i}") for i in range(4)] + [("query b", f"text {i}") for i in (3, 1, 5, 4)]
    assert rerank_run(RuleReranker(table), data, run_, top_k=0) == run_


# ---------------------------------------------------------------- 5. training through the CLI


@pytest.mark.parametrize("family", ["bert", "qwen"])
def test_listwise_training_learns_what_the_base_model_cannot(family, request):
    trained = request.getfixturevalue("ce_run" if family == "bert" else "qwen_run")
    out = trained["out"]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["best_metric"] == "mrr"
    history = metrics["history"]
    best = metrics["best"]
    # measured: bert 0.50 -> 1.00, qwen 0.39 -> 0.96 (chance is about 0.52 with 3 negatives)
    assert trained["before"]["mrr"] < 0.6, trained["before"]
    assert best["mrr"] >= 0.9, history
    assert best["mrr"] - trained["before"]["mrr"] >= 0.3
    assert best["mrr"] == max(h["mrr"] for h in history)
    assert all(h["groups"] == 32 and 0.0 <= h["accuracy@1"] <= 1.0 for h in history)
    # best/ really holds the best model: scoring it again gives the recorded metrics
    best_model = qtune.load(out / "best", device="cpu")
    again = group_mrr(best_model, read_query_groups(trained["eval"]))
    assert again["mrr"] == pytest.approx(best["mrr"], abs=1e-6)
    assert again["accuracy@1"] == pytest.approx(best["accuracy@1"], abs=1e-6)

    assert {"best", "last", "metrics.json", "config.yaml", "runs"} <= {p.name for p in out.iterdir()}
    config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert (config["model"], config["loss"], config["group_size"], config["resume"]) == (trained["base"], "listwise",
                                                                                       4, False)
    for name in ("best", "last"):
        meta = json.loads((out / name / "qtune.json").read_text(encoding="utf-8"))
        assert (meta["task"], meta["adapter"], meta["base_model"], meta["threshold"]) == ("reranker", False,
                                                                                         trained["base"], None)
        assert (out / name / "model.safetensors").is_file()
    assert (out / "last" / "trainer_state.pt").is_file()
    meta = json.loads((out / "best" / "qtune.json").read_text(encoding="utf-8"))
    if family == "bert":
        assert meta["max_length"] == 32 and meta["instruction"] is None
        assert metrics["train"]["steps"] == 12 * 128 // 8  # the two groups without negatives are left out
        assert "2 of 130 training groups have no negative and are left out" in trained["stdout"]
        assert f"done: {out}  best mrr: " in trained["stdout"]
    else:
        assert meta["max_length"] == 96 and meta["instruction"] == QWEN_INSTRUCTION_TRAINED
        # the stored instruction is the one every prompt of the loaded model carries
        prompt = best_model.loaded.tokenizer.decode(best_model.features([("q", "d")])[0]["input_ids"])
        assert f"<Instruct>: {QWEN_INSTRUCTION_TRAINED}\n<Query>: q\n<Document>: d" in prompt
        assert [h["step"] for h in history] == [4, 8, 12, 16]


def _first_batch_loss(ce_dir: str, groups, kind: str, batch_size: int, seed: int) -> float:
    """The loss of the first training batch, computed by hand from unpadded forward passes of the plain
    transformers model: the batch order is the trainer's (length-grouped, seeded)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from qtune.data.batching import length_grouped_batches

    tok = AutoTokenizer.from_pretrained(ce_dir)
    plain = AutoModelForSequenceClassification.from_pretrained(ce_dir).eval()
    pairs = [[(g.query, d) for d in (g.positives[0], *g.negatives[:3])] for g in groups]
    lengths = [sum(len(tok(q, d)["input_ids"]) for q, d in group) for group in pairs]
    first = length_grouped_batches(lengths, batch_size, seed=seed, epoch=0)[0]
    values = []
    with torch.no_grad():
        for i in first:
            x = [plain(**tok(q, d, return_tensors="pt")).logits[0, 0].item() for q, d in pairs[i]]
            if kind == "listwise":
                values.append(-(x[0] - math.log(sum(math.exp(v) for v in x))))
            else:
                values.extend(math.log1p(math.exp(-v)) if j == 0 else math.log1p(math.exp(v)) for j, v in enumerate(x))
    return sum(values) / len(values)


def test_pointwise_loss_is_what_the_trainer_minimises(ce_dir, data, tmp_path, capsys):
    groups = read_query_groups(data["small"])
    pointwise = _first_batch_loss(ce_dir, groups, "pointwise", batch_size=4, seed=1)
    listwise = _first_batch_loss(ce_dir, groups, "listwise", batch_size=4, seed=1)
    assert abs(pointwise - listwise) > 0.1  # the two losses are told apart
    out = tmp_path / "pointwise"
    code, stdout, err = run(capsys, "train", "reranker", "--model", ce_dir, "--train", data["small"],
                            "--eval", data["eval"], "--output", out, "--loss", "pointwise", "--full", "--lr", "3e-3",
                            "--epochs", "1", "--batch-size", "4", "--group-size", "4", "--max-length", "32",
                            "--logging-steps", "1", "--device", "cpu", "--seed", "1")
    assert code == 0, err
    assert f"done: {out}" in stdout
    assert yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))["loss"] == "pointwise"
    losses = train_losses(out)
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(pointwise, abs=1e-5)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["train"]["steps"] == 8 and 0.0 <= metrics["best"]["mrr"] <= 1.0


RESUME_FLAGS = ["--full", "--lr", "3e-3", "--epochs", "2", "--batch-size", "4", "--group-size", "4",
                "--max-length", "32", "--device", "cpu", "--seed", "2"]


def test_resume_after_a_crash_ends_where_an_uninterrupted_run_ends(ce_dir, data, tmp_path, capsys, monkeypatch):
    from qtune.tasks.reranker import train as task

    common = ["train", "reranker", "--model", ce_dir, "--train", data["small"], "--eval", data["eval"],
              *RESUME_FLAGS]
    straight = tmp_path / "straight"
    code, _, err = run(capsys, *common, "--output", straight)
    assert code == 0, err

    real_loss, calls = task.loss, {"n": 0}

    def crashing_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 11:  # mid-epoch 2 (8 batches an epoch), after the epoch-1 checkpoint
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    crashed = tmp_path / "crashed"
    monkeypatch.setattr(task, "loss", crashing_loss)
    code, _, err = run(capsys, *common, "--output", crashed)
    monkeypatch.setattr(task, "loss", real_loss)
    assert code == 130 and "interrupted" in err
    state = torch.load(crashed / "last" / "trainer_state.pt", weights_only=False)
    assert state["progress"]["step"] == 10 and not (crashed / "metrics.json").exists()

    code, _, err = run(capsys, *common, "--output", crashed)  # without --resume: refused, run left alone
    assert_user_error(code, err, "already holds a run", "--resume")
    code, _, err = run(capsys, *common, "--output", crashed, "--resume")
    assert code == 0, err

    probe = [(g.query, d) for g in read_query_groups(data["eval"])[:8] for d in (g.positives[0], *g.negatives)]
    expected = qtune.load(straight / "last", device="cpu").score(probe)
    np.testing.assert_allclose(qtune.load(crashed / "last", device="cpu").score(probe), expected, atol=1e-5)
    assert np.abs(expected - qtune.load(ce_dir, task="reranker", device="cpu").score(probe)).max() > 1e-3
    first = json.loads((straight / "metrics.json").read_text(encoding="utf-8"))
    second = json.loads((crashed / "metrics.json").read_text(encoding="utf-8"))
    assert second["train"]["steps"] == first["train"]["steps"] == 16
    assert [h["step"] for h in second["history"]] == [8, 16]
    for a, b in zip(first["history"], second["history"]):
        assert a["mrr"] == pytest.approx(b["mrr"], abs=1e-6)


def test_resume_continues_a_run_that_stopped_after_a_fraction_of_an_epoch(ce_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "reranker", "--model", ce_dir, "--train", data["small"], "--eval", data["eval"],
              "--output", out, *RESUME_FLAGS]
    code, _, err = run(capsys, *common, "--epochs", "0.5")
    assert code == 0, err
    half = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert half["train"]["steps"] == 4 and [h["epoch"] for h in half["history"]] == [0.5]

    code, _, err = run(capsys, *common, "--epochs", "1", "--resume")
    assert code == 0, err
    full = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert full["train"]["steps"] == 8
    assert [(h["step"], h["epoch"]) for h in full["history"]] == [(4, 0.5), (8, 1.0)]
    assert full["history"][0] == half["history"][0]
    config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert config["epochs"] == 1.0 and config["resume"] is False
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=False)["progress"]["step"] == 8


@pytest.mark.parametrize("family", ["bert", "qwen"])
def test_lora_run_saves_an_adapter_that_reloads_to_the_same_scores(family, ce_dir, tiny_qwen_dir, data, tmp_path):
    base = ce_dir if family == "bert" else tiny_qwen_dir
    out = tmp_path / "lora"
    config = RerankerConfig(model=base, train=str(data["small"]), output=str(out), epochs=0.5, batch_size=4,
                            group_size=4, lr=2e-2, max_length=96, device="cpu", seed=3)
    loaded, result = get("reranker").train(config)
    assert loaded.is_adapter and result["train"]["steps"] == 4
    probe = [(g.query, d) for g in read_query_groups(data["eval"])[:6] for d in (g.positives[0], *g.negatives)]
    in_process = Reranker(loaded).score(probe)
    untrained = qtune.load(base, task="reranker", device="cpu").score(probe)
    assert np.abs(in_process - untrained).max() > 1e-4  # training moved the model: the round trip is not trivial
    for name in ("best", "last"):
        folder = out / name
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        assert not (folder / "model.safetensors").exists()
        meta = json.loads((folder / "qtune.json").read_text(encoding="utf-8"))
        assert (meta["task"], meta["adapter"], meta["base_model"]) == ("reranker", True, base)
        if family == "qwen" and name == "last":
            continue  # loading the real Qwen3 tokenizer takes a second; best/ (= last/ here) was checked
        reloaded = qtune.load(folder, device="cpu")
        assert isinstance(reloaded, Reranker) and reloaded.loaded.is_adapter
        np.testing.assert_allclose(reloaded.score(probe), in_process, atol=1e-5)


# ---------------------------------------------------------------- 6b. two-stage evaluation


def test_eval_rerank_and_eval_retrieval_with_reranker_agree(ce_run, tiny_bert_dir, data, tmp_path, capsys):
    model = str(ce_run["out"] / "best")
    retriever = tiny_bert_dir
    two_stage = f"{short_name(retriever)} + {short_name(model)}"
    evaldir = tmp_path / "rerank"
    code, out, err = run(capsys, "eval", "rerank", "--model", model, "--data", data["beir"], "--retriever", retriever,
                         "--top-k", "6", "--output", evaldir, "--device", "cpu")
    assert code == 0, err
    assert f"wrote {evaldir}/metrics.json, report.md, retrieval.png" in out
    results = json.loads((evaldir / "metrics.json").read_text(encoding="utf-8"))
    assert list(results) == [retriever, two_stage]

    # the same two stages by hand
    data_set = read_beir(data["beir"])
    first = retrieve(qtune.load(retriever, task="embedding", device="cpu"), data_set, top_k=6)
    assert all(len(docs) == 6 for docs in first.values())
    reranked = rerank_run(qtune.load(model, device="cpu"), data_set, first, top_k=6)
    expected = {retriever: retrieval_metrics(first, data_set.qrels),
                two_stage: retrieval_metrics(reranked, data_set.qrels)}
    for name, metrics in expected.items():
        assert results[name] == pytest.approx(metrics, abs=1e-9), name
    # the trained reranker puts the query's kind first among what the retriever found
    assert results[two_stage]["ndcg@5"] > results[retriever]["ndcg@5"]
    assert results[two_stage]["recall@10"] == results[retriever]["recall@10"]  # the same 6 documents

    report = (evaldir / "report.md").read_text(encoding="utf-8")
    assert report.startswith(f"# Reranking: {data['beir']}")
    assert report.splitlines()[2] == f"| metric | {retriever} | {two_stage} | change |"
    row = next(line for line in report.splitlines() if line.startswith("| ndcg@5 |"))
    a, b = results[two_stage]["ndcg@5"], results[retriever]["ndcg@5"]
    assert row == f"| ndcg@5 | {b:.4f} | {a:.4f} | {a - b:+.4f} |"

    # `eval retrieval --reranker` runs the same two stages
    evaldir2 = tmp_path / "retrieval"
    code, out, err = run(capsys, "eval", "retrieval", "--model", retriever, "--data", data["beir"],
                         "--reranker", model, "--top-k", "6", "--rerank-top-k", "6", "--output", evaldir2,
                         "--device", "cpu")
    assert code == 0, err
    again = json.loads((evaldir2 / "metrics.json").read_text(encoding="utf-8"))
    assert list(again) == [retriever, two_stage]
    for name in expected:
        assert again[name] == pytest.approx(results[name], abs=1e-9), name
    report = (evaldir2 / "report.md").read_text(encoding="utf-8")
    assert f"| metric | {retriever} | {two_stage} | change |" in report


# ---------------------------------------------------------------- 7. calibrate


def _pairs_csv(path: Path, rows) -> Path:
    lines = ["sentence1,sentence2,label"] + [f"{q},{d},{y}" for q, d, y in rows]
    return write_lines(path, *lines)


def _labelled_pairs() -> list[tuple[str, str, int]]:
    rows = []
    for i, (q, kinds) in enumerate([("animal", ANIMALS), ("vehicle", VEHICLES), ("my animal", ANIMALS)]):
        for w in ANIMALS[:4] + VEHICLES[:4]:
            rows.append((q, f"the {w}", int(w in kinds)))
    # three wrong labels, so that no threshold is perfect
    for j in (0, 9, 20):
        q, d, y = rows[j]
        rows[j] = (q, d, 1 - y)
    return rows


@pytest.fixture()
def reranker_copy(ce_run, tmp_path) -> Path:
    folder = tmp_path / "reranker"
    shutil.copytree(ce_run["out"] / "best", folder)
    return folder


def test_calibrate_stores_the_threshold_of_the_models_own_scores(reranker_copy, tmp_path, capsys):
    rows = _labelled_pairs()
    pairs_csv = _pairs_csv(tmp_path / "pairs.csv", rows)
    scores = qtune.load(reranker_copy, device="cpu").score([(q, d) for q, d, _ in rows])
    labels = [y for _, _, y in rows]
    f1_best = calibrate_threshold(labels, scores)
    precise = calibrate_threshold(labels, scores, min_precision=0.95)
    assert f1_best["f1"] < 1.0 and precise["threshold"] != f1_best["threshold"]  # the two modes differ here
    meta_before = json.loads((reranker_copy / "qtune.json").read_text(encoding="utf-8"))

    code, out, err = run(capsys, "calibrate", "--model", reranker_copy, "--data", pairs_csv, "--device", "cpu",
                         "--output", tmp_path / "cal")
    assert code == 0, err
    meta = json.loads((reranker_copy / "qtune.json").read_text(encoding="utf-8"))
    assert meta["threshold"] == pytest.approx(f1_best["threshold"], abs=1e-6)
    assert {k: v for k, v in meta.items() if k != "threshold"} == {k: v for k, v in meta_before.items()
                                                                   if k != "threshold"}
    assert qtune.load(reranker_copy, device="cpu").threshold == meta["threshold"]
    assert f"threshold {f1_best['threshold']:.6f}: precision {f1_best['precision']:.4f}" in out
    assert f"on {len(rows)} pairs ({sum(labels)} relevant)" in out
    assert f"stored in {reranker_copy}/qtune.json" in out
    written = json.loads((tmp_path / "cal" / "metrics.json").read_text(encoding="utf-8"))
    assert written["threshold"] == meta["threshold"] and written["model"] == str(reranker_copy)
    assert written["f1"] == pytest.approx(f1_best["f1"])

    code, out, err = run(capsys, "calibrate", "--model", reranker_copy, "--data", pairs_csv, "--min-precision", "0.95",
                         "--device", "cpu")
    assert code == 0, err
    meta = json.loads((reranker_copy / "qtune.json").read_text(encoding="utf-8"))
    assert meta["threshold"] == pytest.approx(precise["threshold"], abs=1e-6)
    assert qtune.load(reranker_copy, device="cpu").threshold == meta["threshold"]
    # calibrating does not change the scores
    np.testing.assert_allclose(qtune.load(reranker_copy, device="cpu").score([(q, d) for q, d, _ in rows]), scores,
                               atol=1e-6)

    code, _, err = run(capsys, "calibrate", "--model", reranker_copy, "--data", pairs_csv, "--min-precision", "1.01",
                       "--device", "cpu")
    # found only after scoring, so the progress bar comes first on stderr; the error is the last line
    assert code == 2 and "Traceback" not in err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith(f"qtune: error: {pairs_csv}: no threshold reaches precision 1.01 (the best is "), err
    assert json.loads((reranker_copy / "qtune.json").read_text(encoding="utf-8")) == meta


def test_calibrating_a_plain_cross_encoder_folder_makes_it_a_reranker_folder(ce_dir, tmp_path, capsys):
    folder = tmp_path / "plain"
    shutil.copytree(ce_dir, folder)
    assert not (folder / "qtune.json").exists()
    rows = _labelled_pairs()
    pairs_csv = _pairs_csv(tmp_path / "pairs.csv", rows)
    scores = qtune.load(folder, task="reranker", device="cpu").score([(q, d) for q, d, _ in rows])
    expected = calibrate_threshold([y for _, _, y in rows], scores)
    code, _, err = run(capsys, "calibrate", "--model", folder, "--data", pairs_csv, "--device", "cpu")
    assert code == 0, err
    meta = json.loads((folder / "qtune.json").read_text(encoding="utf-8"))
    assert (meta["task"], meta["adapter"], meta["base_model"]) == ("reranker", False, str(folder))
    assert meta["threshold"] == pytest.approx(expected["threshold"], abs=1e-6)
    reranker = qtune.load(folder, device="cpu")  # no task= needed any more
    assert reranker.threshold == meta["threshold"]
    np.testing.assert_allclose(reranker.score([(q, d) for q, d, _ in rows]), scores, atol=1e-6)


def test_calibrate_refuses_a_hub_id(tmp_path, capsys):
    pairs_csv = _pairs_csv(tmp_path / "pairs.csv", [("animal", "the cat", 1), ("animal", "the bus", 0)])
    code, _, err = run(capsys, "calibrate", "--model", "Qwen/Qwen3-Reranker-0.6B", "--data", pairs_csv,
                       "--device", "cpu")
    assert_user_error(code, err, "Qwen/Qwen3-Reranker-0.6B", "local folder")


def test_calibrate_bad_label_names_the_line_and_writes_nothing(reranker_copy, tmp_path, capsys):
    pairs_csv = _pairs_csv(tmp_path / "pairs.csv", [("animal", "the cat", 1), ("animal", "the bus", 2),
                                                    ("vehicle", "the bus", 1)])
    before = (reranker_copy / "qtune.json").read_bytes()
    code, _, err = run(capsys, "calibrate", "--model", reranker_copy, "--data", pairs_csv, "--device", "cpu",
                       "--output", tmp_path / "cal")
    assert_user_error(code, err, f"{pairs_csv}:3", "field 'label'", "label '2' is not one of ['0', '1']")
    assert (reranker_copy / "qtune.json").read_bytes() == before
    assert not (tmp_path / "cal").exists()


# ---------------------------------------------------------------- 8. bad input for train reranker


def _malformed_json(tmp: Path, data: dict):
    train = write_lines(tmp / "train.jsonl", json.dumps({"query": "animal", "pos": ["cat"], "neg": ["bus"]}),
                        '{"query": "vehicle", "pos": ["bus"], "neg": ["cat"]')
    return ["--train", train], [f"{train}:2", "malformed JSON"]


def _missing_pos(tmp: Path, data: dict):
    train = write_lines(tmp / "train.jsonl", json.dumps({"query": "animal", "pos": ["cat"], "neg": ["bus"]}),
                        json.dumps({"query": "vehicle", "neg": ["cat"]}))
    return ["--train", train], [f"{train}:2", "field 'pos'", "no positive passage"]


def _bad_negative_in_eval(tmp: Path, data: dict):
    evalfile = write_lines(tmp / "eval.jsonl", json.dumps({"query": "animal", "pos": ["cat"], "neg": ["bus"]}),
                           json.dumps({"query": "animal", "pos": ["dog"], "neg": ["bus", 3]}))
    return ["--train", data["small"], "--eval", evalfile], [f"{evalfile}:2", "field 'neg'", "passage 2 is int"]


def _eval_without_negatives(tmp: Path, data: dict):
    evalfile = write_lines(tmp / "eval.jsonl", json.dumps({"query": "animal", "pos": ["cat"]}))
    return ["--train", data["small"], "--eval", evalfile], [str(evalfile), "no group has a negative"]


@pytest.mark.parametrize("case", [_malformed_json, _missing_pos, _bad_negative_in_eval, _eval_without_negatives])
def test_bad_data_is_refused_before_the_model_loads(case, data, tmp_path, capsys):
    data_args, parts = case(tmp_path, data)
    assert_refused_before_the_model_loads(capsys, "reranker", data_args, tmp_path / "out", *parts)


def test_good_data_gets_as_far_as_the_missing_model(data, tmp_path, capsys):
    """The control for the test above: with valid data the same command fails on the model."""
    assert_data_accepted_up_to_the_model(capsys, "reranker", ["--train", data["small"], "--eval", data["eval"]], tmp_path / "out")


def test_training_file_without_any_negative_is_refused_before_the_model_loads(data, tmp_path, capsys):
    train = write_lines(tmp_path / "train.jsonl", json.dumps({"query": "animal", "pos": ["cat"]}),
                        json.dumps({"query": "vehicle", "pos": ["bus"]}))
    assert_refused_before_the_model_loads(capsys, "reranker", ["--train", train], tmp_path / "out", str(train),
                                          "no group has a negative")


def test_max_length_too_small_for_the_prompt_writes_nothing(tiny_qwen_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, "train", "reranker", "--model", tiny_qwen_dir, "--train", data["small"],
                       "--output", out, "--max-length", "40", "--device", "cpu")
    assert_user_error(code, err, "max_length 40 leaves no room", "48-token reranker prompt")
    assert not out.exists()


def test_a_qwen_tokenizer_saved_without_its_template_gets_the_same_prompt(tiny_qwen_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    with_template = decoder_prompt(tok)
    tok.chat_template = None
    assert decoder_prompt(tok) == with_template
