"""The text classifier: one batch function for the Python API and the server, and its wrapper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from qtune.errors import QtuneError
from qtune.modeling.heads import LabelledClassifier
from qtune.tasks.classify.encode import TextEncoder


@dataclass(frozen=True)
class TextPrediction:
    label: str
    probs: tuple[float, ...]  # one per label, in the model's class order

    @property
    def probability(self) -> float:
        """The probability of the predicted label."""
        return max(self.probs)


def check_texts(texts: str | Iterable[str]) -> list[str]:
    """The texts as a list, each a non-empty string (else a QtuneError naming its index)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise QtuneError(f"text {i} must be a string, got {type(text).__name__}")
        if not text:
            raise QtuneError(f"text {i} is empty")
    return texts


class TextClassifier(LabelledClassifier):
    """A loaded text classifier: `predict(["where is my parcel", ...])`."""

    def encoder(self, truncate: bool = True) -> TextEncoder:
        """How texts become features (`truncate=False`: nothing cut, to count tokens)."""
        loaded = self.loaded
        return TextEncoder(loaded.tokenizer, loaded.family.is_decoder, loaded.meta.max_length if truncate else None)

    def features(self, texts: Iterable[str], *, truncate: bool = True) -> list[dict]:
        """Unpadded features of texts as trained."""
        encoder = self.encoder(truncate)
        return [encoder.encode(t) for t in texts]

    def predict_proba(self, texts: str | Iterable[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """(len(texts), num_labels) float32 class probabilities, in input order (a str is one text)."""
        return self.predict_features(self.features(check_texts(texts)), batch_size=batch_size, progress=progress)

    def predict(self, texts: str | Iterable[str], batch_size: int = 64, progress: bool = False) -> list[TextPrediction]:
        """The most probable label and all probabilities of each text, in input order."""
        probs = self.predict_proba(texts, batch_size=batch_size, progress=progress)
        labels = self.labels
        return [TextPrediction(labels[int(p.argmax())], tuple(float(x) for x in p)) for p in probs]
