"""Length-grouped batches: rows of similar length share a batch, so dynamic padding wastes little."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def length_grouped_batches(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int = 0,
                           group_by_length: bool = True, group_size: int = 64) -> list[list[int]]:
    """Batches of row indices for one epoch, a pure function of (lengths, seed, epoch).

    Rows are shuffled, cut into groups of `group_size` batches, sorted by length inside each
    group and split into batches; the batch order is then shuffled, so similar lengths meet
    without the model seeing the data in length order. Reproducible, so a resumed run sees
    the same batches as an uninterrupted one.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if not group_by_length:
        return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    lengths = np.asarray(lengths)
    span = batch_size * group_size
    batches = []
    for start in range(0, len(order), span):
        group = order[start:start + span]
        group = group[np.argsort(-lengths[group], kind="stable")]
        batches.extend(group[i:i + batch_size].tolist() for i in range(0, len(group), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[tuple[int, int]]:
    """[start, end) slices of longest-first `lengths`: at most `batch_size` rows each, and with
    `max_tokens` at most that many padded tokens (rows x the first, longest row)."""
    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError("batch_size and max_tokens must be at least 1")
    slices, start = [], 0
    while start < len(lengths):
        size = batch_size if max_tokens is None else min(batch_size, max(1, max_tokens // max(lengths[start], 1)))
        slices.append((start, min(start + size, len(lengths))))
        start += size
    return slices
