"""Sequence-classification heads (`*ForSequenceClassification`), padded or packed.

Shared by every task that puts a class head on a sequence (pair classification, text
classification): the batch with its labels, the class logits, and the probabilities.

Which vector the head classifies: a sentence-transformers encoder trained with mean pooling
(all-MiniLM-L6-v2 and most of its kind) never trained BERT's pooler (the [CLS] token through a
dense layer and tanh): its pooler weights are near their random start and its outputs tiny, so a
head reading them learns slowly or not at all (on 400 financial questions, full fine-tuning at lr
5e-5 predicted the majority class for 3 epochs). On such an encoder, where the architecture's head
is a Linear over the pooled vector (BERT, ERNIE), the head classifies the masked mean of the last
hidden state, the vector the encoder was trained to produce. qtune.json records it (`pooling:
"mean"`); every other classifier (`pooling: null`) uses its transformers head as it is. The loaded
model carries the choice in its config (`POOLING_ATTR`) so every path that only sees the model
(the training loss, the int8 export, serving) computes the same logits.

The head starts untrained while the encoder is pre-trained, so it gets its own learning rate
(`--head-lr`, see `head_param_groups`), as SetFit trains its head at 1e-2 over a body at 2e-5.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qtune.modeling.inference import InferenceModel


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


# Architectures whose `*ForSequenceClassification` head is `classifier(dropout(pooled vector))` over
# `base_model`'s output: they can classify the mean instead of the pooler output. Others (RoBERTa's
# dense + tanh head over [CLS], DistilBERT's pre-classifier, ...) keep their own head.
MEAN_HEAD_TYPES = frozenset({"bert", "ernie"})
# The model config attribute that says the head classifies the mean ("mean"; absent: its own pooling).
POOLING_ATTR = "qtune_pooling"


def classifier_pooling(source: str, family) -> str | None:
    """The pooling a new head on `source` classifies: "mean" for an encoder whose own
    sentence-transformers config pools the mean (`1_Pooling/config.json`) and whose head can take it
    (`MEAN_HEAD_TYPES`); None otherwise (the transformers head's own: BERT's pooler, a decoder's last
    token), also for a sentence-transformers pooling qtune does not compute (max, several at once):
    the head reads the pooler there, as it always did."""
    from qtune.errors import QtuneError
    from qtune.modeling.pooling import default_pooling

    if family.is_decoder or family.model_type not in MEAN_HEAD_TYPES:
        return None
    try:
        return "mean" if default_pooling(source, family) == "mean" else None
    except QtuneError:
        return None


def classifier_head_kwargs(meta, source: str, tokenizer, family) -> dict:
    """`Task.prepare` of sequence-classification tasks: a base model (no qtune.json) gets the pooling
    of `classifier_pooling` in `meta`; a qtune folder keeps the one it was trained with (null in
    folders from before mean heads: they read the pooler). Returns the `from_pretrained` settings:
    the labels, and for a mean head a config that carries `POOLING_ATTR`."""
    from pathlib import Path

    from qtune.errors import QtuneError

    if not Path(source, "qtune.json").is_file():  # a base model, not a qtune folder
        meta.settings.pooling = classifier_pooling(source, family)
    kwargs = label_head_kwargs(meta.settings.labels, tokenizer)
    if meta.settings.pooling is None:
        return kwargs
    if meta.settings.pooling != "mean" or family.is_decoder or family.model_type not in MEAN_HEAD_TYPES:
        raise QtuneError(f"'{source}': qtune.json says the classifier pools {meta.settings.pooling!r}, which a "
                         f"{family.model_type} classification head cannot take (mean on "
                         f"{', '.join(sorted(MEAN_HEAD_TYPES))} encoders, or null)")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(meta.base_model if meta.adapter else source, **kwargs)
    setattr(config, POOLING_ATTR, meta.settings.pooling)
    return {"config": config}


def mean_pooled(model) -> bool:
    """Whether `model` (plain, peft-wrapped or an int8 ONNX model) needs the mean computed here. An
    ONNX export is not a torch module: its graph already holds the pooling and returns the logits."""
    import torch

    from qtune.modeling.packing import head_model

    hf = head_model(model)
    return isinstance(hf, torch.nn.Module) and getattr(hf.config, POOLING_ATTR, None) == "mean"


def mean_logits(model, inputs: dict):
    """classifier(dropout(masked mean of the last hidden state)) of a padded batch: the head of a
    mean-pooled classifier (padding excluded from the mean, special tokens included, as
    sentence-transformers pools)."""
    import torch

    from qtune.modeling.packing import head_model
    from qtune.modeling.pooling import pool

    hf = head_model(model)
    hidden = hf.base_model(**inputs).last_hidden_state  # (rows, seq, hidden)
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    return hf.classifier(hf.dropout(pool(hidden, mask, "mean")))


def class_logits(model, batch: dict):
    """(rows, num_labels) class logits of a padded or packed batch.

    Packed: the decoder body runs once over the packed row and the classification head reads
    each sequence's last token, the position `*ForSequenceClassification` pools in a padded batch.
    A mean-pooled head (see the module docstring) classifies the mean of the last hidden state.
    """
    from qtune.modeling.packing import head_model, is_packed, last_positions, packed_hidden

    if is_packed(batch):
        hidden = packed_hidden(model, batch)  # (tokens, hidden)
        return head_model(model).score(hidden[last_positions(batch["cu_seq_lens_q"])])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if mean_pooled(model):
        return mean_logits(model, inputs)
    return model(**inputs).logits


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


def head_parameters(model) -> list:
    """The trainable parameters of the task head: every module of the transformers model outside
    its body (`base_model`), e.g. BERT's `classifier` (its pooler is part of the pre-trained body),
    RoBERTa's classification head, Qwen3's `score`; under LoRA, the head's trained copy."""
    from qtune.modeling.packing import head_model

    hf = head_model(model)
    body = hf.base_model
    if body is hf:
        return []
    seen = {id(p) for p in body.parameters()}
    return [p for p in hf.parameters() if p.requires_grad and id(p) not in seen]


def head_param_groups(model, groups: list[dict], head_lr: float | None) -> list[dict]:
    """AdamW parameter groups with the head's parameters moved out of `groups` into groups of their
    own at `head_lr` (each keeping its weight decay); the body's groups come first, so group 0 still
    has the run's --lr (what the trainer logs). `head_lr` None: `groups` as they are. Schedules scale
    every group's lr alike (warmup and decay apply to the head too)."""
    if head_lr is None:
        return groups
    head = {id(p) for p in head_parameters(model)}
    body_groups, head_groups = [], []
    for group in groups:
        params = list(group["params"])
        settings = {k: v for k, v in group.items() if k != "params"}
        body_groups.append({**settings, "params": [p for p in params if id(p) not in head]})
        moved = [p for p in params if id(p) in head]
        if moved:
            head_groups.append({**settings, "params": moved, "lr": head_lr})
    return body_groups + head_groups


class LabelledClassifier(InferenceModel):
    """What the inference wrappers over a sequence-classification head share: the labels, the batch
    function (used by the Python API and the server's micro-batcher alike) and length-sorted
    prediction of encoded rows. Subclasses add how their inputs are encoded (`encoder`)."""

    batch_calls = frozenset({"predict_proba", "predict"})


    @property
    def labels(self) -> list[str]:
        return list(self.loaded.meta.settings.labels)

    def forward(self, batch: dict) -> np.ndarray:
        """(rows, num_labels) class probabilities of one collated batch: the batch function."""
        return class_probs(self.loaded.model, batch)

    def predict_features(self, features: list[dict], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """(rows, num_labels) probabilities of encoded rows, in input order; batches are length-sorted."""
        out = np.zeros((len(features), len(self.labels)), dtype=np.float32)
        if not features:
            return out
        unlabelled = [{k: v for k, v in f.items() if k != "labels"} for f in features]
        return self.loaded.run_sorted(unlabelled, out, self.forward, batch_size=batch_size, progress=progress)
