"""The reranker: a relevance score in [0, 1] per (query, document), with one batch function for
the Python API and the server. Training and inference share `forward_logits`."""

from __future__ import annotations

import copy
import functools
from typing import Sequence

import numpy as np

from qtune.modeling.inference import InferenceModel
from qtune.tasks.reranker.encode import PairFormatter, RerankPrompt


def forward_logits(model, batch: dict, prompt: RerankPrompt | None):
    """(rows,) float32 logits whose sigmoid is the relevance score.

    Decoders are padded on the left, so the last position is the answer slot of every row; only
    that position's logits are computed. In a packed batch the answer slots are the sequences'
    last tokens.
    """
    from qtune.modeling.packing import head_model, is_packed, last_positions, packed_hidden

    if is_packed(batch):
        hidden = packed_hidden(model, batch)  # (tokens, hidden)
        if prompt is None:  # a BERT cross-encoder: its head reads each pair's first token ([CLS])
            return encoder_head_logits(head_model(model), hidden[batch["cu_seq_lens_q"][:-1].long()])
        logits = head_model(model).lm_head(hidden[last_positions(batch["cu_seq_lens_q"])]).float()  # (rows, vocab)
        return logits[:, prompt.yes_id] - logits[:, prompt.no_id]
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if prompt is None:
        return model(**inputs).logits[:, 0].float()
    logits = model(**inputs, logits_to_keep=1).logits[:, -1, :].float()  # (rows, vocab)
    return logits[:, prompt.yes_id] - logits[:, prompt.no_id]


def encoder_head_logits(hf, first):
    """(rows,) logits of `BertForSequenceClassification`'s head on the rows' first hidden states
    (rows, hidden): the pooler (dense, tanh), dropout, the classifier, as it reads a padded batch."""
    return hf.classifier(hf.dropout(hf.bert.pooler(first.unsqueeze(1))))[:, 0].float()


class Reranker(InferenceModel):
    """A loaded reranker: `score([(query, doc), ...])` -> relevance in [0, 1]."""

    batch_calls = frozenset({"score"})

    def __init__(self, loaded):
        super().__init__(loaded)
        self.formatter = PairFormatter(loaded.tokenizer, loaded.family.is_decoder, loaded.meta.max_length,
                                       loaded.meta.settings.instruction)

    @property
    def threshold(self) -> float | None:
        """The calibrated threshold stored with the model (`qtune calibrate`), if any."""
        return self.loaded.meta.settings.threshold

    # -- as the FAQ matcher's rescorer (`qtune.kb.faq.ScoresPairs`)
    scorer_kind = "reranker"

    @property
    def default_threshold(self) -> float | None:
        """What the FAQ matcher uses without a threshold of its own: the calibrated one."""
        return self.threshold

    def check_scorer(self) -> None:
        """A reranker scores any pair."""

    def pair_scores(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """(len(pairs),) relevance of each (query, FAQ question) pair."""
        return self.score(pairs)

    def pair_features(self, pairs: list[tuple[str, str]]) -> list[dict]:
        """`pair_scores` in two steps, tokenizing apart from the model call: the features, ..."""
        return self.features(pairs)

    def feature_scores(self, features: list[dict]) -> np.ndarray:
        """... then (len(features),) their scores."""
        return self.score_features(features)

    def features(self, pairs: Sequence[tuple[str, str]], *, truncate: bool = True) -> list[dict]:
        """Unpadded features of (query, document) pairs (`truncate=False`: nothing cut, to count
        tokens; within max_length these equal the truncated ones)."""
        formatter = self.formatter if truncate else self._whole
        return [formatter.encode(q, d) for q, d in pairs]

    @functools.cached_property
    def _whole(self) -> PairFormatter:
        whole = copy.copy(self.formatter)
        whole.max_length = 10 ** 9
        return whole

    def forward(self, batch: dict) -> np.ndarray:
        """(rows,) float32 relevance scores of one collated batch: the batch function."""
        import torch

        return torch.sigmoid(forward_logits(self.loaded.model, batch, self.formatter.prompt)).cpu().numpy()

    def run_batch(self, features: list[dict]) -> np.ndarray:
        """(rows, 1) scores of the batch made of these unpadded features (the server's micro-batcher calls this)."""
        return self.loaded.infer_batch(features, self.forward)[:, None]

    def score_features(self, features: Sequence[dict], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        out = np.zeros(len(features), dtype=np.float32)
        return self.loaded.run_sorted(features, out, self.forward, batch_size=batch_size, desc="rerank",
                                      progress=progress)

    def score(self, pairs: Sequence[tuple[str, str]], *, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """(len(pairs),) float32 relevance scores in input order; batches are length-sorted."""
        return self.score_features(self.features(list(pairs)), batch_size=batch_size, progress=progress)

    def rerank(self, query: str, documents: Sequence[str], *, top_n: int | None = None,
               batch_size: int = 32) -> list[tuple[int, float]]:
        """(document index, score), best first; ties keep the input order."""
        scores = self.score([(query, d) for d in documents], batch_size=batch_size)
        order = np.argsort(-scores, kind="stable")[:top_n]
        return [(int(i), float(scores[i])) for i in order]
