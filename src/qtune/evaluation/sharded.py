"""A command's model work shared over the ranks `torchrun` / `accelerate launch` started, with the
results every rank gets back in input order exactly as one process computes them.

The model wrappers (Embedder.embed, Reranker.score, the classifiers' predict, Extractor.extract)
sort their inputs by token length, longest first, and run them in greedy batches
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


def map_sorted_batches(run: Callable[[list], Sequence], items: Sequence, features: Callable[[list], Sequence] | None,
                       *, batch_size: int, max_tokens: int | None = None):
    """`run(items)` shared over the launched ranks, the result of each item as one process gets it.

    `run(part)` is a length-sorting wrapper call (e.g. `embedder.embed(part, ...)`) returning one
    row per item (a numpy array or a list); `features(part)` gives the features it sorts by (dicts
    with `input_ids`, or token-id lists), and `batch_size`/`max_tokens` are the ones `run` batches
    with. `features=None`: the items are split evenly in input order instead (`map_sharded`), for a
    wrapper whose batching this module does not know (same rows, not necessarily the same bits).
    """
    items = list(items)
    where = launch()
    if not where.distributed or not items:
        return run(items)
    if features is None:
        return map_sharded(run, items, concat=_joined)
    lengths = map_sharded(lambda part: [_length(f) for f in features(part)] if part else [], items)
    batches = plan_batches(lengths, batch_size, max_tokens)[where.rank::where.world_size]
    rows = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    part = run([items[i] for i in rows.tolist()]) if len(rows) else None
    return _scatter(len(items), all_gather_objects((rows, part)))


def _joined(parts: list):
    return np.concatenate(parts) if isinstance(parts[0], np.ndarray) else [x for p in parts for x in p]


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


# -- the wrappers' calls, shared

def sharded_embed(embedder, texts: Sequence[str], **kwargs) -> np.ndarray:
    """`embedder.embed(texts, **kwargs)` shared over the ranks, with the same keywords (is_query,
    batch_size, max_tokens, dimensions, progress: its progress bar on rank 0 only)."""
    if "progress" in kwargs:
        kwargs["progress"] = kwargs["progress"] and is_main()
    is_query = kwargs.get("is_query", False)
    features = (lambda part: embedder.features(part, is_query)) if hasattr(embedder, "features") else None
    return map_sorted_batches(lambda part: embedder.embed(part, **kwargs), texts, features,
                              batch_size=kwargs.get("batch_size", 64), max_tokens=kwargs.get("max_tokens"))


def sharded_score(reranker, pairs: Sequence[tuple[str, str]], *, batch_size: int = 32,
                  progress: bool = False) -> np.ndarray:
    """`reranker.score(pairs, ...)` shared over the ranks (progress bar on rank 0)."""
    show = progress and is_main()
    features = reranker.features if hasattr(reranker, "features") else None
    return map_sorted_batches(lambda part: reranker.score(part, batch_size=batch_size, progress=show),
                              pairs, features, batch_size=batch_size)


def _classifier_features(clf, pairs: bool):
    if not hasattr(clf, "encoder"):
        return None

    def features(part):
        encoder = clf.encoder()
        return [encoder.encode(a, b) for a, b in part] if pairs else [encoder.encode(t) for t in part]

    return features


def sharded_pair_proba(clf, pairs: Sequence[tuple[str, str]], *, batch_size: int = 64,
                       progress: bool = False) -> np.ndarray:
    """`clf.predict_proba(pairs, ...)` of a PairClassifier shared over the ranks."""
    show = progress and is_main()
    return map_sorted_batches(lambda part: clf.predict_proba(part, batch_size=batch_size, progress=show),
                              pairs, _classifier_features(clf, pairs=True), batch_size=batch_size)


def sharded_pair_predict(clf, pairs: Sequence[tuple[str, str]], *, batch_size: int = 64,
                         threshold: float | None = None, progress: bool = False) -> list:
    """`clf.predict(pairs, ...)` of a PairClassifier shared over the ranks."""
    show = progress and is_main()
    return map_sorted_batches(
        lambda part: clf.predict(part, batch_size=batch_size, threshold=threshold, progress=show),
        pairs, _classifier_features(clf, pairs=True), batch_size=batch_size)


def sharded_text_proba(clf, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """`clf.predict_proba(texts, ...)` of a TextClassifier shared over the ranks (check the texts
    first, `qtune.tasks.classify.model.check_texts`, so an error names a text's place in the whole input)."""
    show = progress and is_main()
    return map_sorted_batches(lambda part: clf.predict_proba(part, batch_size=batch_size, progress=show),
                              texts, _classifier_features(clf, pairs=False), batch_size=batch_size)


def sharded_text_predict(clf, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> list:
    """`clf.predict(texts, ...)` of a TextClassifier shared over the ranks (texts checked first)."""
    show = progress and is_main()
    return map_sorted_batches(lambda part: clf.predict(part, batch_size=batch_size, progress=show),
                              texts, _classifier_features(clf, pairs=False), batch_size=batch_size)


def sharded_extract(extractor, examples: Sequence, *, batch_size: int = 16, max_new_tokens: int = 256,
                    progress: bool = False) -> list:
    """`extractor.extract_examples(examples, ...)` shared over the ranks (greedy generation: the same
    left-padded batches as one process, so the same answers)."""
    show = progress and is_main()
    builder = getattr(extractor, "builder", None)
    features = (lambda part: [builder.prompt_ids(e.input, e.instruction) for e in part]) if builder else None
    return map_sorted_batches(
        lambda part: extractor.extract_examples(part, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                                progress=show),
        examples, features, batch_size=batch_size)
