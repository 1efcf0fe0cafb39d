"""Pooling: how a sequence of hidden states becomes one vector, and which pooling a model was trained with.

- "last": the last real token (decoders such as Qwen3-Embedding; whichever side the padding is on);
- "mean": the mean over real tokens (sentence-transformers' MiniLM);
- "cls": the first token (bge).
A BERT-family model's own sentence-transformers config (`1_Pooling/config.json`) says which.
"""

from __future__ import annotations

import json
from pathlib import Path

from qtune.modeling.family import Family

POOLING_MODES = ("last", "mean", "cls")


def default_pooling(name_or_path: str, family: Family) -> str:
    if family.is_decoder:
        return "last"
    config = _pooling_config(name_or_path)
    if config is not None:
        if config.get("pooling_mode_mean_tokens"):
            return "mean"
        if config.get("pooling_mode_cls_token"):
            return "cls"
        if config.get("pooling_mode_lasttoken"):
            return "last"
    return "cls"


def _pooling_config(name_or_path: str) -> dict | None:
    local = Path(name_or_path, "1_Pooling", "config.json")
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8"))
    if Path(name_or_path).exists():
        return None
    try:  # a hub id: sentence-transformers models publish their pooling next to the weights
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name_or_path, "1_Pooling/config.json")).read_text(encoding="utf-8"))
    except Exception:  # offline, or the model has no such file: fall back to [CLS]
        return None


def pool(hidden, attention_mask, mode: str):
    """(batch, seq, dim) hidden states and (batch, seq) mask -> (batch, dim)."""
    import torch

    if mode == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        # the last real token, whichever side the padding is on
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask * positions).argmax(dim=1)  # (batch,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {mode!r}; use one of {POOLING_MODES}")


def normalize(vectors):
    """L2-normalise in float32. (batch, dim) -> (batch, dim)."""
    import torch.nn.functional as F

    return F.normalize(vectors.float(), p=2, dim=-1)
