"""The no-duplicate batch sampler of embedding training: full batches whenever the data allows
them, every group once per epoch, never one text twice in a batch, and a reason when batches
cannot be full."""

from __future__ import annotations

import random

import pytest

from qtune.tasks.embedding.encode import short_batches_note, unique_text_batches


def faq_like_groups(answers: int = 16, paraphrases: int = 4, seed: int = 0) -> list[dict]:
    """Mined-FAQ-shaped groups: several paraphrase queries share each answer (their positive), and
    every mined negative is shared by two groups. A batch of `answers // 2` groups can always be
    filled without repeating a text, but only if groups sharing texts are spread over batches."""
    rng = random.Random(seed)
    groups = [(f"q{a}-{p}", f"answer {a}") for a in range(answers) for p in range(paraphrases)]
    negatives = [f"negative {i}" for i in range(len(groups) // 2)] * 2
    rng.shuffle(negatives)
    return [{"texts": frozenset([q, pos, neg])} for (q, pos), neg in zip(groups, negatives)
            if neg != pos]


def _check_epoch(features, batches, batch_size):
    assert sorted(i for b in batches for i in b) == list(range(len(features)))  # each group once
    for b in batches:
        texts = [t for i in b for t in features[i]["texts"]]
        assert len(texts) == len(set(texts))  # no text twice in a batch


@pytest.mark.parametrize("seed", range(6))
def test_batches_are_full_when_the_data_allows_it(seed):
    features = faq_like_groups(seed=seed)
    assert len(features) == 64
    for epoch in range(3):
        batches = unique_text_batches(features, 8, seed=seed, epoch=epoch)
        _check_epoch(features, batches, 8)
        assert [len(b) for b in batches] == [8] * 8
        assert short_batches_note(features, batches, 8) is None


def test_only_the_last_batch_is_short_when_groups_do_not_divide():
    features = faq_like_groups()[:60]
    batches = unique_text_batches(features, 8, seed=3, epoch=0)
    _check_epoch(features, batches, 8)
    assert [len(b) for b in batches] == [8] * 7 + [4]


def test_a_text_in_more_groups_than_batches_is_the_reason_given():
    # "answer 0" is the positive of 12 groups: 12 batches are needed, so they cannot all be full
    features = [{"texts": frozenset([f"q{i}", "answer 0" if i < 12 else f"answer {i}"])} for i in range(24)]
    batches = unique_text_batches(features, 8, seed=0, epoch=0)
    _check_epoch(features, batches, 8)
    assert len(batches) == 12
    note = short_batches_note(features, batches, 8)
    assert note == ("12 of 12 batches hold fewer than --batch-size 8 query groups: a batch never holds a text "
                    "twice and the groups share texts (one is in 12 of the 24 groups); a smaller --batch-size or "
                    "fewer --hard-negatives fill them")
    assert sorted(len(b) for b in batches) == [2] * 12  # evenly, not 8 + 6 + ten batches of 1
