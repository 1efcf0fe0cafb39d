"""Texts to vectors, exactly as each model family was trained to do it.

- Qwen3-Embedding (decoders): `<|endoftext|>` appended to every text, padding on the LEFT, the
  last token's hidden state; queries read `Instruct: {task}\\nQuery:{query}` (no space after
  `Query:`), documents carry no instruction.
- BERT-family encoders: right padding, pooling from the model's own sentence-transformers config
  (`1_Pooling/config.json`: mean for MiniLM) or the [CLS] token (bge) when there is none.
- Always L2-normalised; Matryoshka `dimensions` truncate first, then normalise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from qtune.modeling.family import Family

QWEN3_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
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


def default_query_instruction(family: Family) -> str | None:
    return QWEN3_QUERY_INSTRUCTION if family.is_decoder else None


def format_text(text: str, *, is_query: bool, instruction: str | None, is_decoder: bool) -> str:
    if not is_query or not instruction:
        return text
    if is_decoder:
        return f"Instruct: {instruction}\nQuery:{text}"
    return f"{instruction}{text}"


def end_token_id(tokenizer) -> int | None:
    """The token a decoder embedder reads its vector from: `<|endoftext|>` for Qwen, else EOS."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return vocab["<|endoftext|>"]
    return tokenizer.eos_token_id


def tokenize_texts(tokenizer, texts: Sequence[str], *, max_length: int, is_decoder: bool) -> list[dict]:
    """Unpadded features; decoders get the end token appended after truncation, so it is never cut."""
    if not texts:
        return []
    if not is_decoder:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        return [{k: enc[k][i] for k in enc} for i in range(len(texts))]
    end = end_token_id(tokenizer)
    enc = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length - 1)
    return [{"input_ids": ids + [end], "attention_mask": [1] * (len(ids) + 1)} for ids in enc["input_ids"]]


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


def normalize(vectors, dimensions: int | None = None):
    """Matryoshka: truncate to `dimensions`, THEN L2-normalise. (batch, dim) -> (batch, dimensions)."""
    import torch.nn.functional as F

    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    return F.normalize(vectors.float(), p=2, dim=-1)


def forward_embeddings(model, batch: dict, pooling: str, prefix: str = "", dimensions: int | None = None):
    """Embed one padded or packed batch; `prefix` selects keys such as `q_input_ids`. -> (batch, dim) float32."""
    from qtune.modeling.packing import is_packed, packed_hidden, pool_packed

    if is_packed(batch, prefix):
        hidden = packed_hidden(model, batch, prefix)  # (tokens, hidden)
        return normalize(pool_packed(hidden, batch[f"{prefix}cu_seq_lens_q"], pooling), dimensions)
    inputs = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)} if prefix else dict(batch)
    mask = inputs["attention_mask"]
    hidden = model(**inputs).last_hidden_state  # (batch, seq, hidden)
    return normalize(pool(hidden, mask, pooling), dimensions)


class Embedder:
    """A loaded embedding model: `embed(texts, is_query=...)` -> normalised float32 array."""

    def __init__(self, loaded):
        self.loaded = loaded

    @property
    def dimension(self) -> int:
        config = getattr(self.loaded.model, "config", None)
        return int(config.hidden_size)

    def features(self, texts: Sequence[str], is_query: bool) -> list[dict]:
        meta, family = self.loaded.meta, self.loaded.family
        formatted = [format_text(t, is_query=is_query, instruction=meta.query_instruction,
                                 is_decoder=family.is_decoder) for t in texts]
        return tokenize_texts(self.loaded.tokenizer, formatted, max_length=meta.max_length,
                              is_decoder=family.is_decoder)

    def embed(self, texts: Sequence[str], *, is_query: bool = False, batch_size: int = 64,
              max_tokens: int | None = None, dimensions: int | None = None, progress: bool = False) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalised, in input order; batches are length-sorted,
        of at most `batch_size` texts and (with `max_tokens`) that many padded tokens."""
        texts = list(texts)
        if dimensions is not None and not 0 < dimensions <= self.dimension:
            raise ValueError(f"dimensions must be between 1 and {self.dimension}, got {dimensions}")
        width = dimensions or self.dimension
        out = np.zeros((len(texts), width), dtype=np.float32)
        if not texts:
            return out
        features = self.features(texts, is_query)
        loaded = self.loaded

        def forward(batch):
            return forward_embeddings(loaded.model, batch, loaded.meta.pooling, dimensions=dimensions).cpu().numpy()

        loaded.run_sorted(features, out, forward, batch_size=batch_size, max_tokens=max_tokens, desc="embed",
                          progress=progress)
        return out
