"""Texts to vectors, exactly as each model family was trained to do it.

- Qwen3-Embedding (decoders): `<|endoftext|>` appended to every text, padding on the LEFT, the
  last token's hidden state; queries read `Instruct: {task}\\nQuery:{query}` (no space after
  `Query:`), documents carry no instruction.
- BERT-family encoders: right padding, pooling from the model's own sentence-transformers config
  (`1_Pooling/config.json`: mean for MiniLM) or the [CLS] token (bge) when there is none.
- Always L2-normalised; Matryoshka `dimensions` truncate first, then normalise.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np

from qtune.modeling.family import Family
from qtune.modeling.packing import pack_or_pad
from qtune.records import QueryGroup

QWEN3_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def default_query_instruction(family: Family) -> str | None:
    return QWEN3_QUERY_INSTRUCTION if family.is_decoder else None


def format_text(text: str, *, is_query: bool, instruction: str | None, is_decoder: bool) -> str:
    if not is_query or not instruction:
        return text
    if is_decoder:
        return f"Instruct: {instruction}\nQuery:{text}"
    return f"{instruction}{text}"


def end_token_id(tokenizer) -> int | None:
    """The token a decoder embedder reads its vector from: `<|endoftext|>` for Qwen, else EOS."""
    # One lookup, not get_vocab(): that builds a dict of the whole vocabulary (0.3 s for Qwen's) on every call.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    found = backend.token_to_id("<|endoftext|>") if backend is not None else tokenizer.get_vocab().get("<|endoftext|>")
    return found if found is not None else tokenizer.eos_token_id


def tokenize_texts(tokenizer, texts: Sequence[str], *, max_length: int, is_decoder: bool) -> list[dict]:
    """Unpadded features; decoders get the end token appended after truncation, so it is never cut."""
    if not texts:
        return []
    if not is_decoder:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        return [{k: enc[k][i] for k in enc} for i in range(len(texts))]
    end = end_token_id(tokenizer)
    enc = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length - 1)
    return [{"input_ids": ids + [end], "attention_mask": [1] * (len(ids) + 1)} for ids in enc["input_ids"]]


def group_features(groups: Sequence[QueryGroup], embed_features, hard_negatives: int) -> list[dict]:
    """Tokenised query, first positive and up to `hard_negatives` negatives per group.

    `embed_features(texts, is_query)` is `Embedder.features`, so training sees texts exactly as
    inference does (instruction, end token, truncation).
    """
    queries = embed_features([g.query for g in groups], True)
    positives = embed_features([g.positives[0] for g in groups], False)
    negative_texts = [list(g.negatives[:hard_negatives]) for g in groups]
    flat = embed_features([t for texts in negative_texts for t in texts], False)
    features, start = [], 0
    for g, q, p, texts in zip(groups, queries, positives, negative_texts):
        features.append({"query": q, "positive": p, "negatives": flat[start:start + len(texts)],
                         "texts": frozenset([g.query, g.positives[0], *texts])})
        start += len(texts)
    return features


def untruncated_lengths(groups: Sequence[QueryGroup], embed_features, hard_negatives: int) -> list[int]:
    """Tokens, before --max-length cuts them, of every text `group_features` encodes (query, first
    positive, up to `hard_negatives` negatives per group); `embed_features` is `Embedder.features`."""
    queries = [g.query for g in groups]
    passages = [t for g in groups for t in (g.positives[0], *g.negatives[:hard_negatives])]
    return [len(f["input_ids"]) for texts, is_query in ((queries, True), (passages, False))
            for f in embed_features(texts, is_query, truncate=False)]


def unique_text_batches(features: Sequence[dict], batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """Seeded batches in which no text (query, positive or negative) occurs twice, each group
    once per epoch, full whenever the texts allow it.

    A text shared by k groups (an FAQ answer that is the positive of k paraphrases, a popular
    mined negative) needs k batches. So the epoch gets `ceil(n / batch_size)` batches, all full
    but the last, or, when some text is in more groups than that, one batch per group sharing it,
    of even sizes. Groups that share their most shared text are dealt out in turn over the
    batches, most shared first (filling one batch at a time instead leaves the groups that share
    texts for the end, in ever smaller batches); a group that fits nowhere trades places along a
    short seeded chain of groups, and only opens a batch of its own when that fails. Full batches
    come first, in a seeded order.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if not features:
        return []
    rng = np.random.default_rng([seed, epoch])
    texts = [f["texts"] for f in features]
    sharing = Counter(t for group in texts for t in group)
    key = [max(group, key=lambda t: (sharing[t], t)) for group in texts]  # each group's most shared text
    key_rank = {k: r for r, k in enumerate(rng.permutation(sorted(set(key))).tolist())}
    tie = rng.permutation(len(texts))
    order = sorted(range(len(texts)), key=lambda i: (-sharing[key[i]], key_rank[key[i]], tie[i]))
    count = max(math.ceil(len(texts) / batch_size), sharing[key[order[0]]])
    batches = _Batches(texts, _sizes(len(texts), batch_size, count), batch_size)
    cursor, unplaced = 0, []
    for i in order:  # dealt in turn: consecutive groups sharing a text land in consecutive batches
        slot = next((b % count for b in range(cursor, cursor + count) if batches.fits(i, b % count)), None)
        if slot is None:
            unplaced.append(i)
            continue
        batches.add(i, slot)
        cursor = slot + 1
    for i in unplaced:
        batches.place_by_trading(i, rng, steps=20 * count)
    shuffled = [batches.members[b] for b in rng.permutation(len(batches.members))]
    return sorted(shuffled, key=lambda b: len(b) < batch_size)


def _sizes(n: int, batch_size: int, count: int) -> list[int]:
    """How many groups each of `count` batches takes: full ones and a last with the rest, or, with
    more batches than `n / batch_size` needs, sizes that differ by one at most."""
    if count == math.ceil(n / batch_size):
        return [batch_size] * (count - 1) + [n - batch_size * (count - 1)]
    return [n // count + (b < n % count) for b in range(count)]


class _Batches:
    """Batches of group indices being filled (up to `sizes[b]` each; batches opened beyond the
    planned ones take up to `batch_size`), with the texts each batch already holds and whose they are."""

    def __init__(self, texts: Sequence[frozenset], sizes: list[int], batch_size: int):
        self.texts, self.sizes, self.batch_size, self.planned = texts, list(sizes), batch_size, len(sizes)
        self.members: list[list[int]] = [[] for _ in sizes]
        self.holder: list[dict] = [{} for _ in sizes]  # per batch: text -> the group that brought it

    def fits(self, i: int, b: int) -> bool:
        return len(self.members[b]) < self.sizes[b] and self.holder[b].keys().isdisjoint(self.texts[i])

    def add(self, i: int, b: int) -> None:
        self.members[b].append(i)
        self.holder[b].update(dict.fromkeys(self.texts[i], i))

    def remove(self, i: int, b: int) -> None:
        self.members[b].remove(i)
        for t in self.texts[i]:
            del self.holder[b][t]

    def place_by_trading(self, i: int, rng, steps: int) -> None:
        """Place group `i` into a planned batch with room that holds none of its texts, or in place
        of the one group it clashes with in some batch, which then looks for a place in turn. The
        group in hand when no trade is left (or after `steps`) goes to a batch beyond the planned ones."""
        left = None  # the batch the moving group just left: it does not go straight back
        for _ in range(steps):
            free = next((b for b in range(self.planned) if self.fits(i, b)), None)
            if free is not None:
                self.add(i, free)
                return
            swaps = []
            for b in range(self.planned):
                clash = {self.holder[b][t] for t in self.texts[i] if t in self.holder[b]}
                if b != left and len(clash) == 1:
                    swaps.append((b, clash.pop()))
            if not swaps:
                break
            b, j = swaps[int(rng.integers(len(swaps)))]
            self.remove(j, b)
            self.add(i, b)
            i, left = j, b
        extra = next((b for b in range(self.planned, len(self.members)) if self.fits(i, b)), None)
        if extra is None:
            self.members.append([])
            self.holder.append({})
            self.sizes.append(self.batch_size)
            extra = len(self.members) - 1
        self.add(i, extra)


def short_batches_note(features: Sequence[dict], batches: Sequence[Sequence[int]], batch_size: int) -> str | None:
    """Why batches of an epoch hold fewer than `batch_size` groups (the last one aside, when the
    groups do not divide evenly), for the user; None when they are full."""
    expected_short = 1 if len(features) % batch_size else 0
    short = sum(len(b) < batch_size for b in batches)
    if short <= expected_short and len(batches) == math.ceil(len(features) / batch_size):
        return None
    most = max(Counter(t for f in features for t in f["texts"]).values())
    return (f"{short} of {len(batches)} batches hold fewer than --batch-size {batch_size} query groups: a batch "
            f"never holds a text twice and the groups share texts (one is in {most} of the {len(features)} "
            "groups); a smaller --batch-size or fewer --hard-negatives fill them")


def collate(tokenizer, features: Sequence[dict], packed=False) -> dict:
    """Queries and candidates (positives first, then all hard negatives), each side padded or
    packed (`packed`: True/False or a policy, see `qtune.modeling.packing.wants_packing`)."""
    candidates = [f["positive"] for f in features] + [n for f in features for n in f["negatives"]]
    sides = {"q_": [f["query"] for f in features], "p_": candidates}
    return {prefix + k: v for prefix, rows in sides.items() for k, v in pack_or_pad(tokenizer, rows, packed).items()}
