"""How an embedding training batch fits in memory (`qtune.training.memory` estimates a pass): a batch
of G query groups is two forward passes, as sentence-transformers runs it: the G queries, padded to
the longest query, and the G positives and the batch's hard negatives, padded to the longest passage
(`qtune.tasks.embedding.encode.collate`). Both graphs are kept until the backward, so a batch costs
the sum of the two passes. When the plain batch does not fit, GradCache (--cached) runs it in
chunks with the same loss and gradients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from qtune.errors import QtuneError
from qtune.training.memory import ModelShape, fits, optimizer_bytes, pass_bytes, plan_for_device, size_text


def embedding_bytes(shape: ModelShape, query_lengths: Sequence[int], passage_lengths: Sequence[int], *,
                    groups: int, texts_per_group: int, max_length: int, mini_batch_size: int | None = None) -> int:
    """Memory of one embedding training step of `groups` query groups of `texts_per_group` texts
    (the query, its positive, hard negatives), beyond the loaded weights.

    Plain (`mini_batch_size` None): the query pass and the passage pass, each padded to its own
    longest row (`encode.collate`), both kept until the backward. GradCache: one chunk of
    `mini_batch_size` rows of one side at a time (the larger of the two), plus every vector and
    its gradient."""
    passages = groups * (texts_per_group - 1)
    sides = ((query_lengths, groups), (passage_lengths, passages))
    if mini_batch_size is None:
        return optimizer_bytes(shape) + sum(pass_bytes(shape, lengths, rows, max_length) for lengths, rows in sides)
    chunk = max(pass_bytes(shape, lengths, min(mini_batch_size, rows), max_length) for lengths, rows in sides)
    return optimizer_bytes(shape) + chunk + (groups + passages) * shape.hidden * 4 * 2


@dataclass(frozen=True)
class EmbeddingPlan:
    """How an embedding batch is run: plainly, or with GradCache in `mini_batch_size`-row passes."""

    cached: bool
    mini_batch_size: int
    needed: int  # bytes the chosen way needs
    note: str | None = None  # the line to print when the plan differs from the flags


def plan_embedding(shape: ModelShape, query_lengths: Sequence[int], passage_lengths: Sequence[int], *,
                   groups: int, texts_per_group: int, max_length: int, free: int, cached: bool,
                   mini_batch_size: int) -> EmbeddingPlan:
    """Keep the flags when the batch fits in `free` bytes; else, unless the user chose --cached,
    switch to GradCache with the largest power-of-two --mini-batch-size that fits (the same loss
    and gradients, `qtune.tasks.embedding.loss.cached_backward`): GradCache embeds the batch twice,
    so it is chosen only when the plain batch does not fit. Raises when nothing fits.

    `query_lengths`, `passage_lengths`: token counts of the training queries and of the passages
    (positives and the hard negatives used); a batch holds `groups` x `texts_per_group` texts."""
    rows = groups * texts_per_group
    what = f"a batch of {groups} query groups x {texts_per_group} texts"

    def needed(per_pass: int | None) -> int:
        return embedding_bytes(shape, query_lengths, passage_lengths, groups=groups, texts_per_group=texts_per_group,
                               max_length=max_length, mini_batch_size=per_pass)

    if cached:
        need = needed(mini_batch_size)
        if fits(need, free):
            return EmbeddingPlan(True, mini_batch_size, need)
        smaller = _largest_power_of_two(lambda n: fits(needed(n), free), below=mini_batch_size)
        hint = f"--mini-batch-size {smaller}" if smaller else "a lower --max-length or --batch-size"
        raise QtuneError(f"{what} with --cached --mini-batch-size {mini_batch_size} needs ~{size_text(need)}, "
                         f"{size_text(free)} free: use {hint} (or --no-memory-check to try anyway)")
    need = needed(None)
    if fits(need, free):
        return EmbeddingPlan(False, mini_batch_size, need)
    size = _largest_power_of_two(lambda n: fits(needed(n), free), below=rows)
    if not size:
        raise QtuneError(f"{what} needs ~{size_text(need)}, {size_text(free)} free, and even --cached "
                         f"--mini-batch-size 1 needs ~{size_text(needed(1))}: lower --max-length, free memory, or "
                         "pass --no-memory-check to try anyway")
    return EmbeddingPlan(True, size, needed(size),
                         f"{what} needs ~{size_text(need)}, {size_text(free)} free: using --cached "
                         f"--mini-batch-size {size} (same loss and gradients)")


def _largest_power_of_two(ok, below: int) -> int | None:
    """The largest power of two under `below` for which `ok(n)`; None when not even 1."""
    n = 1
    while n * 2 < below:
        n *= 2
    while n >= 1 and n < below:
        if ok(n):
            return n
        n //= 2
    return None


def plan_run(config, loaded, lengths: Sequence[int], groups: Sequence) -> None:
    """The embedding task's memory planner (`Task.memory_planner`): `plan_embedding` against the
    free memory of the model's device. `lengths` are the queries' tokens, then the candidates'
    (positives, then the hard negatives trained with); sets the run's --cached and
    --mini-batch-size, said in one line when they change; unchanged when the model's config does
    not name its sizes."""
    negatives = min(config.hard_negatives, max((len(g.negatives) for g in groups), default=0))
    plan = plan_for_device(loaded, lambda shape, free: plan_embedding(
        shape, lengths[:len(groups)], lengths[len(groups):], groups=min(config.batch_size, len(groups)),
        texts_per_group=2 + negatives, max_length=config.max_length, free=free, cached=config.cached,
        mini_batch_size=config.mini_batch_size))
    if plan is not None:
        config.cached, config.mini_batch_size = plan.cached, plan.mini_batch_size
