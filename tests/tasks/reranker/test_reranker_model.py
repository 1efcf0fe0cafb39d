"""Rerankers: the Qwen3-Reranker prompt, scores checked against plain transformers by hand, the
training losses, groups and ranking metrics by hand, threshold calibration by hand, rerank_run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reranker_cases import (  # noqa: F401
    EXPECTED_PROMPT,
    PAIRS,
    QWEN_INSTRUCTION,
    QWEN_PREFIX,
    QWEN_SUFFIX,
    ce_dir,
    ce_run,
    data,
    make_groups,
    qwen_run,
    qwen_tokenizer,
)

import qtune
from qtune.errors import QtuneError
from qtune.evaluation.metrics import calibrate_threshold
from qtune.evaluation.retrieval import rerank_run
from qtune.records import QueryGroup, RetrievalSet
from qtune.tasks.reranker.encode import (
    DEFAULT_INSTRUCTION,
    SYSTEM_PROMPT,
    PairFormatter,
    decoder_prompt,
)
from qtune.tasks.reranker.groups import (
    collate,
    group_features,
    group_loss,
    group_ranking_metrics,
)
from qtune.tasks.reranker.model import Reranker

pytestmark = pytest.mark.usefixtures("one_torch_thread")

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



def test_a_qwen_tokenizer_saved_without_its_template_gets_the_same_prompt(tiny_qwen_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    with_template = decoder_prompt(tok)
    tok.chat_template = None
    assert decoder_prompt(tok) == with_template
