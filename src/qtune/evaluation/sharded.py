"""A command's model work shared over the ranks `torchrun` / `accelerate launch` started, with the
results every rank gets back in input order exactly as one process computes them.

The model wrappers' batch calls (`qtune.modeling.inference.InferenceModel.batch_calls`:
Embedder.embed, Reranker.score, the classifiers' predict, Extractor.extract_examples) sort their
inputs by token length, longest first, and run them in greedy batches
(`LoadedModel.sorted_batches`). A row's result can depend on the batch it runs in (padding width,
kernel shapes, packing), so splitting the INPUTS over the ranks would not give one process's
numbers bit for bit. Here the batches one process would run are planned first (from the token
lengths, themselves counted sharded) and whole batches are dealt to the ranks, round robin (the
long first batches do not all land on rank 0); each rank hands its batches, back to back, to the
same wrapper, which forms exactly those batches again (its stable sort keeps their order, and its
greedy cut depends only on each batch's first row). So every row meets the same batch as in one
process.

Every rank must call these functions, in the same order and with the same inputs (they are
collectives). They are called where a COMMAND does its model work (`qtune mine`, `qtune eval`,
`qtune predict`), never inside the wrappers: training evaluates on rank 0 alone, where a
collective would hang. Without a launcher (or with one process) each is the plain call.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from qtune.distributed import all_gather_objects, broadcast_object, launch, map_sharded
from qtune.modeling.inference import InferenceModel


def is_main() -> bool:
    """Whether this process writes the files and prints (rank 0, or no launcher)."""
    return launch().is_main


def on_main(fn: Callable, *args, **kwargs):
    """`fn(*args, **kwargs)` computed on rank 0 and handed to every rank (one process: just the call).
    For work that feeds the ranks' next shared step and must be the same everywhere (a search)."""
    if not launch().distributed:
        return fn(*args, **kwargs)
    return broadcast_object(fn(*args, **kwargs) if is_main() else None)


def plan_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """The index arrays of the batches one process runs over rows of these token lengths, in order
    (as `LoadedModel.sorted_batches`: longest first, stable, greedy)."""
    from qtune.data.batching import sorted_batches

    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    return [order[start:end] for start, end in sorted_batches(lengths[order].tolist(), batch_size, max_tokens)]


def _length(feature) -> int:
    return len(feature["input_ids"]) if isinstance(feature, dict) else len(feature)


def map_sorted_batches(run: Callable[[list], Sequence], items: Sequence, features: Callable[[list], Sequence],
                       *, batch_size: int, max_tokens: int | None = None):
    """`run(items)` shared over the launched ranks, the result of each item as one process gets it.

    `run(part)` is a length-sorting wrapper call (e.g. `embedder.embed(part, ...)`) returning one
    row per item (a numpy array or a list); `features(part)` gives the features it sorts by (dicts
    with `input_ids`, or token-id lists), and `batch_size`/`max_tokens` are the ones `run` batches
    with.
    """
    items = list(items)
    where = launch()
    if not where.distributed or not items:
        return run(items)
    lengths = map_sharded(lambda part: [_length(f) for f in features(part)] if part else [], items)
    batches = plan_batches(lengths, batch_size, max_tokens)[where.rank::where.world_size]
    rows = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    part = run([items[i] for i in rows.tolist()]) if len(rows) else None
    return _scatter(len(items), all_gather_objects((rows, part)))


def _scatter(count: int, parts: list[tuple[np.ndarray, object]]):
    """Each rank's (row indices, results) back into one result in input order."""
    first = next(part for rows, part in parts if part is not None)
    if isinstance(first, np.ndarray):
        out = np.empty((count, *first.shape[1:]), dtype=first.dtype)
        for rows, part in parts:
            if part is not None:
                out[rows] = part
        return out
    out_list: list = [None] * count
    for rows, part in parts:
        for i, value in zip(rows.tolist(), part or ()):
            out_list[i] = value
    return out_list


# -- a wrapper's batch call, shared

def sharded_call(model: InferenceModel, call: str, items: Sequence, /, *, batch_size: int, progress: bool = False,
            **options):
    """`model.<call>(items, batch_size=..., progress=..., **options)` shared over the ranks, each
    item's result as one process gets it. `call` is one of the wrapper's declared `batch_calls`
    (e.g. "embed", "score", "predict_proba", "predict", "extract_examples"); the rows are planned
    from the wrapper's `features` with the call's `feature_options` (the embedder's `is_query`), and
    `max_tokens`, when the call takes it, caps the padded tokens of a batch as the call does. The
    progress bar shows on rank 0 only."""
    run = model.batch_call(call)
    show = progress and is_main()
    chosen = {name: options[name] for name in type(model).feature_options if name in options}
    return map_sorted_batches(lambda part: run(part, batch_size=batch_size, progress=show, **options), items,
                              lambda part: model.features(part, **chosen), batch_size=batch_size,
                              max_tokens=options.get("max_tokens"))
