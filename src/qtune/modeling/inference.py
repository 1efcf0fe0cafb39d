"""The inference interface every task's loaded wrapper implements (Embedder, Reranker, the
classifiers, Extractor, and a task added later).

A wrapper turns inputs into unpadded features exactly as the model was trained (`features`), runs
one collated batch (`forward`, the batch function the server's micro-batcher and the Python API
share), and declares its length-sorted batch calls in `batch_calls`: the methods that take a list
of inputs plus `batch_size` / `progress` keywords, sort the inputs' features by length, and return
one row per input in input order. Whatever shares model work over processes (`qtune.evaluation.
sharded.sharded`) or asks a model for something reads these declarations; nothing guesses a
wrapper's abilities from the methods it happens to have.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np


class InferenceModel:
    """A loaded model's inference wrapper (`loaded`: a `qtune.modeling.loading.LoadedModel`).

    Subclasses set `batch_calls` (the names of their length-sorted batch methods), `feature_options`
    (the keywords of those calls that change the features, e.g. the embedder's `is_query`) and
    `micro_batched`, and implement `features` and `forward`."""

    batch_calls: ClassVar[frozenset[str]] = frozenset()
    feature_options: ClassVar[tuple[str, ...]] = ()
    # The server micro-batches requests' rows into `run_batch` calls; False: each request is one
    # model call of its own (generation).
    micro_batched: ClassVar[bool] = True

    def __init__(self, loaded):
        self.loaded = loaded

    def features(self, items: Sequence[Any], *, truncate: bool = True, **options) -> list:
        """Unpadded features of `items` as training and inference see them: the rows a batch call
        sorts by length (dicts with `input_ids`, or token-id lists). `truncate=False`: nothing cut,
        to count tokens. `options`: the call's `feature_options`."""
        raise NotImplementedError

    def forward(self, batch: dict) -> np.ndarray:
        """The batch function: one collated batch -> one numpy row per input."""
        raise NotImplementedError

    @property
    def padding_free(self) -> bool:
        """Whether `run_batch` packs rows of mixed lengths (`LoadedModel.packed`), so a call costs
        about its real tokens and rows of any lengths may share it."""
        return bool(getattr(self.loaded, "packed", False))

    def run_batch(self, features: list[dict]) -> np.ndarray:
        """`forward` of the batch made of these unpadded features (the server's micro-batcher calls this)."""
        return self.loaded.infer_batch(features, self.forward)

    def batch_call(self, name: str):
        """The declared batch method `name`; a clear error for one this wrapper does not declare."""
        if name not in type(self).batch_calls:
            raise TypeError(f"{type(self).__name__} has no batch call {name!r} (it declares "
                            f"{', '.join(sorted(type(self).batch_calls)) or 'none'})")
        return getattr(self, name)
