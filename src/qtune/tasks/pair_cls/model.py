"""The pair classifier: one batch function for the Python API and the server, and its wrapper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from qtune.errors import QtuneError
from qtune.modeling.heads import LabelledClassifier
from qtune.tasks.pair_cls.encode import PairEncoder


@dataclass(frozen=True)
class PairPrediction:
    label: str
    score: float  # probability of the positive (last) label
    probs: tuple[float, ...]


class PairClassifier(LabelledClassifier):
    """A loaded pair classifier: `predict([(a, b), ...])`."""

    def encoder(self, truncate: bool = True) -> PairEncoder:
        """How pairs become features (`truncate=False`: nothing cut, to count tokens)."""
        loaded = self.loaded
        return PairEncoder(loaded.tokenizer, loaded.family.is_decoder, loaded.meta.max_length if truncate else None)

    def features(self, pairs: Iterable[tuple[str, str]], *, truncate: bool = True) -> list[dict]:
        """Unpadded features of (a, b) pairs as trained."""
        encoder = self.encoder(truncate)
        return [encoder.encode(a, b) for a, b in pairs]

    def predict_proba(self, pairs: Iterable[tuple[str, str]], batch_size: int = 64,
                      progress: bool = False) -> np.ndarray:
        """(len(pairs), num_labels) class probabilities, in input order."""
        return self.predict_features(self.features(pairs), batch_size=batch_size, progress=progress)

    def predict(self, pairs: Iterable[tuple[str, str]], batch_size: int = 64, threshold: float | None = None,
                progress: bool = False) -> list[PairPrediction]:
        """Label and probabilities per pair. With two labels, `threshold` on the positive
        probability replaces argmax (e.g. the one `qtune eval pair-cls` found)."""
        probs = self.predict_proba(pairs, batch_size=batch_size, progress=progress)
        if threshold is not None and len(self.labels) != 2:
            raise QtuneError("a threshold needs exactly two labels")
        if threshold is None:
            chosen = probs.argmax(axis=1)
        else:
            chosen = (probs[:, 1] >= threshold).astype(int)
        return [PairPrediction(self.labels[c], float(p[-1]), tuple(float(x) for x in p)) for c, p in zip(chosen, probs)]

    # -- as the FAQ matcher's rescorer (`qtune.kb.faq.ScoresPairs`)
    scorer_kind = "classifier"
    default_threshold = None  # a classifier brings no calibrated threshold

    def check_scorer(self) -> None:
        if len(self.labels) != 2:
            raise QtuneError(f"the rescoring classifier needs two labels, it has {self.labels}")

    def pair_scores(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """(len(pairs),) P(positive) of each (query, FAQ question) pair."""
        return self.predict_proba(pairs)[:, 1]

    def pair_features(self, pairs: list[tuple[str, str]]) -> list[dict]:
        """`pair_scores` in two steps, tokenizing apart from the model call: the features, ..."""
        return self.features(pairs)

    def feature_scores(self, features: list[dict]) -> np.ndarray:
        """... then (len(features),) P(positive) of each."""
        return self.predict_features(features)[:, 1]
