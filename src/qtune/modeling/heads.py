"""Sequence-classification heads (`*ForSequenceClassification`), padded or packed.

Shared by every task that puts a class head on a sequence (pair classification, text
classification): the batch with its labels, the class logits, and the probabilities.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def collate_labelled(tokenizer, features: Sequence[dict], packed=False) -> dict:
    """Pad a batch to its own longest row (on the tokenizer's padding side), or pack it (decoders;
    `packed`: True/False or a policy, see `qtune.modeling.packing.wants_packing`); integer labels
    become one (rows,) tensor."""
    import torch

    from qtune.modeling.packing import pack_or_pad

    labels = [f["labels"] for f in features if "labels" in f]
    inputs = [{k: v for k, v in f.items() if k != "labels"} for f in features]
    batch = pack_or_pad(tokenizer, inputs, packed)
    if labels:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch


def closing_tokens(tokenizer) -> list[int]:
    """What a decoder's sequence ends with, so `*ForSequenceClassification` pools the same summary
    position in every row: EOS, unless it is also the pad token (the head pools the last token that
    is not padding, so an EOS equal to pad would be skipped)."""
    eos = tokenizer.eos_token_id
    return [eos] if eos is not None and eos != tokenizer.pad_token_id else []


def class_logits(model, batch: dict):
    """(rows, num_labels) class logits of a padded or packed batch.

    Packed: the decoder body runs once over the packed row and the classification head reads
    each sequence's last token, the position `*ForSequenceClassification` pools in a padded batch.
    """
    from qtune.modeling.packing import head_model, is_packed, last_positions, packed_hidden

    if is_packed(batch):
        hidden = packed_hidden(model, batch)  # (tokens, hidden)
        return head_model(model).score(hidden[last_positions(batch["cu_seq_lens_q"])])
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def class_loss(model, batch: dict):
    """Cross-entropy over the classes; `batch` comes from `collate_labelled` with labels."""
    import torch.nn.functional as F

    return F.cross_entropy(class_logits(model, batch).float(), batch["labels"])


def class_probs(model, batch: dict):
    """(rows, num_labels) float32 numpy softmax probabilities of one batch."""
    import torch

    return torch.softmax(class_logits(model, batch).float(), dim=-1).cpu().numpy()


def label_head_kwargs(labels: Sequence[str], tokenizer) -> dict:
    """`from_pretrained` settings of a head with these labels, in class order."""
    return dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)}, pad_token_id=tokenizer.pad_token_id)


class LabelledClassifier:
    """What the inference wrappers over a sequence-classification head share: the labels, the batch
    function (used by the Python API and the server's micro-batcher alike) and length-sorted
    prediction of encoded rows. Subclasses add how their inputs are encoded."""

    def __init__(self, loaded):
        self.loaded = loaded

    @property
    def labels(self) -> list[str]:
        return list(self.loaded.meta.labels)

    def forward(self, batch: dict) -> np.ndarray:
        """(rows, num_labels) class probabilities of one collated batch: the batch function."""
        return class_probs(self.loaded.model, batch)

    def run_batch(self, features: list[dict]) -> np.ndarray:
        """`forward` of the batch made of these unpadded features (the server's micro-batcher calls this)."""
        return self.loaded.infer_batch(features, self.forward)

    def predict_features(self, features: list[dict], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """(rows, num_labels) probabilities of encoded rows, in input order; batches are length-sorted."""
        out = np.zeros((len(features), len(self.labels)), dtype=np.float32)
        if not features:
            return out
        unlabelled = [{k: v for k, v in f.items() if k != "labels"} for f in features]
        return self.loaded.run_sorted(unlabelled, out, self.forward, batch_size=batch_size, progress=progress)
