"""The embedder: texts -> L2-normalised vectors, with one batch function for the Python API and the server.

Matryoshka `dimensions` truncate the full vectors, THEN normalise again (`truncate_normalize`),
in `Embedder.embed` and in `/v1/embeddings` alike.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qtune.modeling.inference import InferenceModel
from qtune.modeling.pooling import normalize, pool
from qtune.tasks.embedding.encode import format_text, tokenize_texts


def forward_embeddings(model, batch: dict, pooling: str, prefix: str = ""):
    """Embed one padded or packed batch; `prefix` selects keys such as `q_input_ids`. -> (batch, dim) float32."""
    from qtune.modeling.packing import is_packed, packed_hidden, pool_packed

    if is_packed(batch, prefix):
        hidden = packed_hidden(model, batch, prefix)  # (tokens, hidden)
        return normalize(pool_packed(hidden, batch[f"{prefix}cu_seq_lens_q"], pooling))
    inputs = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)} if prefix else dict(batch)
    mask = inputs["attention_mask"]
    hidden = model(**inputs).last_hidden_state  # (batch, seq, hidden)
    return normalize(pool(hidden, mask, pooling))


def truncate_normalize(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka on unit vectors: keep the first `dimensions`, then L2-normalise again. (n, dim) -> (n, dimensions)."""
    if dimensions is None:
        return vectors
    short = vectors[:, :dimensions]
    return (short / np.maximum(np.linalg.norm(short, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class Embedder(InferenceModel):
    """A loaded embedding model: `embed(texts, is_query=...)` -> normalised float32 array."""

    batch_calls = frozenset({"embed"})
    feature_options = ("is_query",)

    @property
    def dimension(self) -> int:
        config = getattr(self.loaded.model, "config", None)
        return int(config.hidden_size)

    def features(self, texts: Sequence[str], is_query: bool = False, *, truncate: bool = True) -> list[dict]:
        """Unpadded features exactly as training and inference see them (`truncate=False`: nothing
        cut, to count tokens)."""
        meta, family = self.loaded.meta, self.loaded.family
        formatted = [format_text(t, is_query=is_query, instruction=meta.settings.query_instruction,
                                 is_decoder=family.is_decoder) for t in texts]
        return tokenize_texts(self.loaded.tokenizer, formatted, max_length=meta.max_length if truncate else 10 ** 9,
                              is_decoder=family.is_decoder)

    def forward(self, batch: dict) -> np.ndarray:
        """(rows, dim) float32 unit vectors of one collated batch: the batch function."""
        return forward_embeddings(self.loaded.model, batch, self.loaded.meta.settings.pooling).cpu().numpy()

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is not None and not 0 < dimensions <= self.dimension:
            raise ValueError(f"dimensions must be between 1 and {self.dimension}, got {dimensions}")

    def embed(self, texts: Sequence[str], *, is_query: bool = False, batch_size: int = 64,
              max_tokens: int | None = None, dimensions: int | None = None, progress: bool = False) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalised, in input order; batches are length-sorted,
        of at most `batch_size` texts and (with `max_tokens`) that many padded tokens."""
        texts = list(texts)
        self.check_dimensions(dimensions)
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        if texts:
            self.loaded.run_sorted(self.features(texts, is_query), out, self.forward, batch_size=batch_size,
                                   max_tokens=max_tokens, desc="embed", progress=progress)
        return truncate_normalize(out, dimensions)
