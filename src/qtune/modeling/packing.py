"""Padding-free ("packed") batches for decoders, and for BERT encoders where a task packs them.

A packed batch lays its B sequences end to end in ONE row of N = sum(lengths) tokens:

- `input_ids` (1, N), `position_ids` (1, N) restarting at 0 for every sequence (so rotary
  positions are exactly those of the padded batch);
- `cu_seq_lens_q` / `cu_seq_lens_k` (B + 1,) int32 sequence boundaries and `max_length_q` /
  `max_length_k`, the names transformers forwards to the attention function of every layer.

An encoder packs only for a task that declares `encoder_packing` (embeddings: one text per sequence,
pooled per sequence; cross-encoders: a (query, document) pair per sequence, scored from its first
token) and only where its position ids start at 0 for every sequence as they do in a padded batch
(`PACKED_ENCODERS`: BERT, so MiniLM, BGE, E5 and the ms-marco cross-encoders among others; XLM-R
counts positions from its padding id and is left padded). Token type ids are packed with the rows
that carry them (a pair's second segment is 1), and are 0 for rows without them.

No layer computes anything for padding. Attention must then keep the sequences apart: models
loaded for packing use the attention implementation registered here (`ATTENTION`):

- a packed call on a GPU in bf16/fp16 runs torch's variable-length flash attention
  (`torch.nn.attention.varlen.varlen_attn`): one kernel over the whole row, no mask tensor;
- elsewhere (CPU, fp32, dropout) attention alone runs padded: the rows are gathered into
  (sequences, longest) batches for masked `scaled_dot_product_attention` calls and gathered back,
  on a GPU one call, on the CPU one per length bucket (`length_buckets`);
- an ordinary padded call (generation, a batch not worth packing) takes transformers' own sdpa
  mask and attention functions, so it computes exactly what `attn_implementation="sdpa"` does.

Heads read their rows at the sequence boundaries: the last token of sequence i is
`cu[i + 1] - 1`, its first `cu[i]`.
"""

from __future__ import annotations

import inspect
import logging
from functools import lru_cache
from typing import Sequence

from qtune.errors import QtuneError

log = logging.getLogger(__name__)

ATTENTION = "qtune_varlen"
PACKED_ENCODERS = frozenset({"bert"})  # encoder model types whose packed positions equal the padded ones
PACKED_KEYS = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def register_attention() -> str:
    """Make `ATTENTION` known to transformers (idempotent); returns its name for `attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, varlen_attention)
    AttentionMaskInterface.register(ATTENTION, _mask)
    return ATTENTION


def _mask(**kwargs):
    """sdpa's mask for padded calls; none for calls without a padding mask (packed rows among
    them: never the (N, N) block mask a packed row would otherwise cost)."""
    from transformers.masking_utils import sdpa_mask

    return None if kwargs.get("attention_mask") is None else sdpa_mask(**kwargs)


# Without the flash kernel (CPU, fp32), packed attention gathers the rows into a padded copy and
# back, in the forward and the backward pass. On 2 CPU cores that costs about what 10% padding
# does (bench/pair_cls_train.py: length-grouped AFQMC pairs, 8% padding, ran ~10% slower packed;
# bench/embedding_speed.py and bench/rerank_speed.py, 13%+ padding, ran 7-27% faster packed),
# so there a batch is packed only when padding would be at least this share of it.
MIN_PADDING_WITHOUT_KERNEL = 0.10


def padding_share(lengths: Sequence[int]) -> float:
    """The share of a padded batch of these row lengths that would be padding."""
    return 1.0 - sum(lengths) / (max(lengths) * len(lengths)) if lengths else 0.0


def wants_packing(packed, rows: Sequence[dict]) -> bool:
    """`packed` is True/False, or a policy `rows -> bool` (`LoadedModel.packs`)."""
    return bool(packed(rows) if callable(packed) else packed)


def is_packed(batch: dict, prefix: str = "") -> bool:
    return f"{prefix}cu_seq_lens_q" in batch


def pack(features: Sequence[dict], labels_key: str | None = None, ignore_index: int = -100) -> dict:
    """Unpadded feature rows -> one packed row (see the module docstring).

    With `labels_key`, that key's per-token labels are packed too, and the first token of every
    sequence is set to `ignore_index`: a flattened next-token loss would otherwise have the end
    of one sequence predict the start of the next.
    """
    import torch

    lengths = [len(f["input_ids"]) for f in features]
    if not lengths or min(lengths) < 1:
        raise ValueError("cannot pack an empty batch or an empty sequence")
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    longest = max(lengths)
    batch = {
        "input_ids": torch.tensor([t for f in features for t in f["input_ids"]], dtype=torch.long).unsqueeze(0),
        "position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
    }
    if all("token_type_ids" in f for f in features):
        batch["token_type_ids"] = torch.tensor([t for f in features for t in f["token_type_ids"]],
                                               dtype=torch.long).unsqueeze(0)
    if labels_key is not None:
        labels = torch.tensor([t for f in features for t in f[labels_key]], dtype=torch.long)
        labels[cu[:-1].long()] = ignore_index
        batch[labels_key] = labels.unsqueeze(0)
    return batch


def pack_or_pad(tokenizer, rows: Sequence[dict], packed) -> dict:
    """One batch of unpadded rows: packed where `packed` says so (see `wants_packing`), else padded
    to its longest row by the tokenizer (on its padding side)."""
    if wants_packing(packed, rows):
        return pack(rows)
    return dict(tokenizer.pad(list(rows), padding=True, return_tensors="pt"))


def split_packed(batch: dict, size: int) -> list[dict]:
    """A packed batch cut into packed batches of at most `size` sequences each."""
    cu = batch["cu_seq_lens_q"]
    bounds = cu.tolist()
    parts = []
    for first in range(0, len(bounds) - 1, size):
        last = min(first + size, len(bounds) - 1)
        start, end = bounds[first], bounds[last]
        part_cu = cu[first:last + 1] - start
        longest = max(b - a for a, b in zip(bounds[first:last], bounds[first + 1:last + 1]))
        part = {"input_ids": batch["input_ids"][:, start:end], "position_ids": batch["position_ids"][:, start:end],
                "cu_seq_lens_q": part_cu, "cu_seq_lens_k": part_cu, "max_length_q": longest, "max_length_k": longest}
        if "token_type_ids" in batch:
            part["token_type_ids"] = batch["token_type_ids"][:, start:end]
        parts.append(part)
    return parts


def packed_inputs(batch: dict, prefix: str = "") -> dict:
    """The model inputs of one packed side of a batch (keys without `prefix`)."""
    return {k: batch[prefix + k] for k in PACKED_KEYS}


def count_tokens(batch: dict) -> int:
    """Real (non-padding) tokens of a padded or packed batch, read from host tensors."""
    total = 0
    for key, value in batch.items():
        if key.endswith("attention_mask"):
            total += int(value.sum())
        elif key.endswith("cu_seq_lens_q"):
            total += int(value[-1])
    return total


def head_model(model):
    """The transformers model with its task head (peft unwrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def transformer_body(model):
    """The bare transformer (e.g. Qwen3Model) under a task head and/or a peft wrapper."""
    hf = head_model(model)
    return getattr(hf, hf.base_model_prefix, hf)


def packed_hidden(model, batch: dict, prefix: str = ""):
    """Final hidden states of a packed batch: (N, hidden)."""
    body = transformer_body(model)
    if body.config._attn_implementation != ATTENTION:
        raise QtuneError(f"packed batches need attn_implementation={ATTENTION!r}, "
                         f"the model has {body.config._attn_implementation!r}")
    inputs = packed_inputs(batch, prefix)
    if getattr(body.config, "type_vocab_size", 0):  # an encoder: the packed segments, else segment 0
        import torch

        types = batch.get(prefix + "token_type_ids")
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"]) if types is None else types
        return body(**inputs).last_hidden_state[0]
    return body(**inputs, use_cache=False).last_hidden_state[0]


def last_positions(cu):
    return cu[1:].long() - 1


def pool_packed(hidden, cu, mode: str):
    """(N, dim) packed hidden states -> (B, dim), one vector per sequence."""
    import torch

    if mode == "last":
        return hidden[last_positions(cu)]
    if mode == "cls":
        return hidden[cu[:-1].long()]
    if mode == "mean":
        lengths = (cu[1:] - cu[:-1]).long()
        owner = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths,
                                        output_size=hidden.shape[0])  # known size: no device sync
        sums = torch.zeros(len(lengths), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        return sums.index_add(0, owner, hidden) / lengths.unsqueeze(1).to(hidden.dtype)
    raise ValueError(f"unknown pooling {mode!r}")


# ---- the attention function ----------------------------------------------------------------


@lru_cache(maxsize=1)
def _varlen_kernel():
    """(torch's varlen_attn, the names of its parameters), or None where torch has none.

    Its signature changed between releases (2.10: `is_causal`; later: `window_size`, `scale`,
    `enable_gqa`), so calls are made from the names it has."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


_kernel_failed: list[str] = []  # why the kernel failed on this machine, once it has


def _kernel():
    """`_varlen_kernel()`, unless it has already failed here."""
    return None if _kernel_failed else _varlen_kernel()


def has_flash_kernel() -> bool:
    """Whether this torch has the variable-length flash attention (2.10 and later; it runs on CUDA)."""
    import torch

    return _kernel() is not None and torch.cuda.is_available()


def _flash_dtype(query, dropout: float, scaling):
    """The half dtype the flash kernel would run in, or None where it cannot run.

    Under autocast, fp32 inputs (e.g. after Qwen3's fp32 q/k norms in full fine-tuning) are cast
    to the autocast dtype, as autocast would do for sdpa."""
    import torch

    kernel = _kernel()
    if not query.is_cuda or dropout or kernel is None:
        return None
    if scaling is not None and "scale" not in kernel[1] and abs(scaling - query.shape[-1] ** -0.5) > 1e-12:
        return None  # a kernel without `scale` uses 1/sqrt(head_dim)
    if query.dtype in (torch.bfloat16, torch.float16):
        return query.dtype
    if torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    return None


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0,
                     sliding_window=None, **kwargs):
    """transformers attention interface: q/k/v (batch, heads, seq, dim) -> ((batch, seq, heads, dim), None)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # a padded batch: exactly transformers' sdpa path
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if sliding_window is not None:
        raise QtuneError("packed batches do not support sliding-window attention; train with --no-packing")
    if query.shape[0] != 1:
        raise QtuneError(f"a packed batch is one row, got {query.shape[0]}")
    causal = getattr(module, "is_causal", True)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, heads, dim)
    half = _flash_dtype(q, dropout, scaling)
    if half is not None:
        try:
            out = _flash_varlen(*(t.to(half) for t in (q, k, v)), cu, int(kwargs["max_length_q"]), scaling, causal)
        except (RuntimeError, NotImplementedError) as e:  # e.g. a GPU the kernel was not built for
            log.warning("varlen flash attention failed (%s); packed batches fall back to padded sdpa", e)
            _kernel_failed.append(str(e))
            out = _repadded(q, k, v, cu, int(kwargs["max_length_q"]), scaling, causal, dropout)
    else:
        out = _repadded(q, k, v, cu, int(kwargs["max_length_q"]), scaling, causal, dropout)
    return out.unsqueeze(0), None


def _flash_varlen(q, k, v, cu, longest: int, scaling, causal: bool):
    kernel, params = _kernel()
    options = {}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:  # expand the shared key/value heads
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if "scale" in params:
        options["scale"] = scaling
    if "window_size" in params:
        options["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        options["is_causal"] = causal
    return kernel(q, k, v, cu, cu, longest, longest, **options)


# A bucket of sequences shares one padded attention call while its padded area (sequences x the
# longest's length squared) stays within this factor of its real area (the sum of squared lengths).
BUCKET_SLACK = 1.3
# Several calls replace the one padded call only when they cut the padded area by this factor (each
# call costs its own gathers and kernel launches).
BUCKETS_PAY = 1.5


def length_buckets(lengths: Sequence[int], slack: float = BUCKET_SLACK) -> list[list[int]]:
    """Sequence indices grouped for padded attention calls, longest first: a sequence joins the
    current bucket while the bucket's padded area stays within `slack` of its real area."""
    buckets: list[list[int]] = []
    area = longest = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if buckets and (len(buckets[-1]) + 1) * longest ** 2 <= slack * (area + lengths[i] ** 2):
            buckets[-1].append(i)
            area += lengths[i] ** 2
        else:
            buckets.append([i])
            longest = lengths[i]
            area = longest ** 2
    return buckets


def _repadded(q, k, v, cu, longest: int, scaling, causal: bool, dropout: float):
    """Attention only, on padded copies: (N, heads, dim) rows gathered into (B, heads, longest, dim)
    and the real rows gathered back. Everything else stayed unpadded.

    On a GPU: one masked sdpa call for the batch (its sizes need no device sync). On the CPU the
    sequences go in length buckets (`length_buckets`), one call each, so attention and its dropout
    (the math kernel, quadratic in the padded length) run on little more than the real tokens; a
    bucket of one length needs no mask (then sdpa's fused CPU kernel runs where dropout is off)."""
    import torch

    starts, sizes = cu[:-1].long(), (cu[1:] - cu[:-1]).long()
    if q.is_cuda:
        return _padded_call(q, k, v, starts, sizes, q.shape[0], longest, scaling, causal, dropout)
    bounds = cu.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    buckets = length_buckets(lengths)
    bucketed_area = sum(len(b) * lengths[b[0]] ** 2 for b in buckets)
    if len(buckets) == 1 or BUCKETS_PAY * bucketed_area > len(lengths) * longest ** 2:  # one call does as well
        return _padded_call(q, k, v, starts, sizes, q.shape[0], longest, scaling, causal, dropout,
                            same_length=min(lengths) == longest)
    outs, order = [], []
    for bucket in buckets:
        top = lengths[bucket[0]]
        outs.append(_padded_call(q, k, v, starts[bucket], sizes[bucket], sum(lengths[i] for i in bucket), top,
                                 scaling, causal, dropout, same_length=lengths[bucket[-1]] == top))
        order.extend(range(bounds[i], bounds[i + 1]) for i in bucket)
    rows = torch.tensor([r for span in order for r in span])
    out = torch.cat(outs)  # real rows, bucket by bucket
    return out[torch.argsort(rows)]  # back to packed order


def _padded_call(q, k, v, starts, lengths, tokens: int, longest: int, scaling, causal: bool, dropout: float,
                 same_length: bool = False):
    """One sdpa call over the sequences (starts, lengths) of the packed rows, `tokens` real rows in
    all, padded to `longest`; returns their real rows, sequence after sequence (tokens, heads, dim)."""
    import torch
    import torch.nn.functional as F

    steps = torch.arange(longest, device=q.device)
    index = (starts.unsqueeze(1) + steps).clamp(max=q.shape[0] - 1)  # (B, longest); padding reads any row
    qs, ks, vs = (t[index].transpose(1, 2) for t in (q, k, v))  # (B, heads, longest, dim)
    if same_length:  # nothing to mask but the future
        mask, is_causal = None, causal
    else:
        real = steps.unsqueeze(0) < lengths.unsqueeze(1)  # (B, longest)
        mask, is_causal = real[:, None, None, :], False  # keys: real tokens only
        if causal:
            mask = mask & (steps.unsqueeze(0) <= steps.unsqueeze(1))  # (B, 1, longest, longest)
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scaling, dropout_p=dropout,
                                         is_causal=is_causal, enable_gqa=qs.shape[1] != ks.shape[1])
    # the real rows by each token's (sequence, position): sizes known, so no device sync
    first = torch.cumsum(lengths, 0) - lengths  # where each sequence starts among the real rows
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths, output_size=tokens)
    flat = owner * longest + torch.arange(tokens, device=q.device) - first[owner]
    return out.transpose(1, 2).flatten(0, 1)[flat]  # (tokens, heads, dim)
