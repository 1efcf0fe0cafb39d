"""Tests for length-grouped batching (qtune.data.batching)."""

from __future__ import annotations

import numpy as np
import pytest

from qtune.data.batching import length_grouped_batches


def wide_lengths(n: int, seed: int = 0) -> list[int]:
    """Token lengths from 4 to ~500, log-normally spread, like real sentence pairs."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=3.5, sigma=0.9, size=n), 4, 512).astype(int).tolist()


def padding(batches: list[list[int]], lengths: list[int]) -> int:
    """Pad tokens with dynamic padding: per batch, max_len * rows - sum of lengths."""
    total = 0
    for batch in batches:
        batch_lengths = [lengths[i] for i in batch]
        total += max(batch_lengths) * len(batch_lengths) - sum(batch_lengths)
    return total


@pytest.mark.parametrize("group_by_length", [True, False])
@pytest.mark.parametrize("n,batch_size,group_size", [(1000, 32, 64), (1000, 32, 4), (95, 10, 4), (7, 16, 64),
                                                     (64, 8, 2), (1, 1, 1)])
def test_every_index_once_per_epoch(n, batch_size, group_size, group_by_length):
    lengths = wide_lengths(n)
    for epoch in range(3):
        batches = length_grouped_batches(lengths, batch_size, seed=1, epoch=epoch, group_by_length=group_by_length,
                                         group_size=group_size)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))
        assert all(type(i) is int for i in flat)


@pytest.mark.parametrize("group_by_length", [True, False])
@pytest.mark.parametrize("n,batch_size,group_size,short", [
    (1000, 32, 64, [8]),      # one group of 1000 rows: 31 full batches and one of 1000 - 31*32 = 8
    (95, 10, 4, [5]),         # groups of 40, 40, 15 rows: the last group ends with a batch of 5
    (96, 8, 3, []),           # divides evenly
    (7, 16, 64, [7]),         # fewer rows than one batch
])
def test_batch_sizes(n, batch_size, group_size, short, group_by_length):
    batches = length_grouped_batches(wide_lengths(n), batch_size, seed=3, group_by_length=group_by_length,
                                     group_size=group_size)
    sizes = [len(b) for b in batches]
    assert len(batches) == -(-n // batch_size)
    assert sorted(s for s in sizes if s != batch_size) == short


def test_at_most_one_short_batch_across_many_groups():
    # a group spans batch_size * group_size rows, a multiple of batch_size, so only the very last
    # group can end with a short batch: 70 rows, groups of 24 -> 24, 24, 22 -> eight batches of 8 and one of 6
    batches = length_grouped_batches(wide_lengths(70), 8, seed=0, group_size=3)
    assert sorted(len(b) for b in batches) == [6] + [8] * 8


def test_same_seed_and_epoch_give_the_same_batches():
    lengths = wide_lengths(500)
    for group_by_length in (True, False):
        a = length_grouped_batches(lengths, 16, seed=7, epoch=2, group_by_length=group_by_length)
        b = length_grouped_batches(list(lengths), 16, seed=7, epoch=2, group_by_length=group_by_length)
        assert a == b


@pytest.mark.parametrize("group_by_length", [True, False])
def test_other_epoch_or_seed_gives_another_order(group_by_length):
    lengths = wide_lengths(500)
    base = length_grouped_batches(lengths, 16, seed=7, epoch=0, group_by_length=group_by_length)
    next_epoch = length_grouped_batches(lengths, 16, seed=7, epoch=1, group_by_length=group_by_length)
    other_seed = length_grouped_batches(lengths, 16, seed=8, epoch=0, group_by_length=group_by_length)
    assert next_epoch != base and other_seed != base
    # not just the batch order: the batches themselves differ
    assert {tuple(sorted(b)) for b in next_epoch} != {tuple(sorted(b)) for b in base}


def test_input_lengths_are_not_modified():
    lengths = wide_lengths(100)
    copy = list(lengths)
    length_grouped_batches(lengths, 8, seed=0)
    assert lengths == copy


def test_grouping_cuts_padding():
    lengths = wide_lengths(4096, seed=5)
    assert max(lengths) / min(lengths) > 50  # a wide distribution
    for epoch in range(3):
        grouped = padding(length_grouped_batches(lengths, 32, seed=0, epoch=epoch), lengths)
        plain = padding(length_grouped_batches(lengths, 32, seed=0, epoch=epoch, group_by_length=False), lengths)
        assert grouped < plain / 3, (grouped, plain)


def test_grouped_batches_hold_similar_lengths_but_are_not_in_length_order():
    lengths = wide_lengths(2048, seed=2)
    batches = length_grouped_batches(lengths, 32, seed=0, group_size=64)  # one group: a global sort
    maxima = [max(lengths[i] for i in b) for b in batches]
    minima = [min(lengths[i] for i in b) for b in batches]
    # inside one group the batches are consecutive slices of the length-sorted rows, so they never overlap
    intervals = sorted(zip(minima, maxima))
    assert all(hi1 <= lo2 for (_, hi1), (lo2, _) in zip(intervals, intervals[1:]))
    # ... but the batch order is shuffled, not longest (or shortest) first
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_without_grouping_batches_are_chunks_of_a_permutation():
    lengths = wide_lengths(103)
    batches = length_grouped_batches(lengths, 10, seed=4, epoch=3, group_by_length=False)
    order = np.random.default_rng([4, 3]).permutation(103).tolist()
    assert batches == [order[i:i + 10] for i in range(0, 103, 10)]
    # and the lengths play no part
    assert length_grouped_batches([1] * 103, 10, seed=4, epoch=3, group_by_length=False) == batches


def test_empty_input():
    assert length_grouped_batches([], 8, seed=0) == []
    assert length_grouped_batches([], 8, seed=0, group_by_length=False) == []


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_size_must_be_positive(batch_size):
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        length_grouped_batches([1, 2, 3], batch_size, seed=0)
