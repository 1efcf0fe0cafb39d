"""Domain embeddings: contrastive fine-tuning (InfoNCE over in-batch and mined hard negatives).

A batch holds B query groups. Its tensors: `q_*` for the B queries, `p_*` for their B positives
followed by every hard negative of the batch. The sampler never puts the same text twice in one
batch, so no in-batch "negative" is secretly a positive. `--cached` (GradCache) computes the same
loss and gradients in mini-batches, so a batch of thousands fits in little memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from qtune.losses import matryoshka_info_nce
from qtune.modeling.packing import is_packed, split_packed
from qtune.tasks.embedding.model import forward_embeddings


@dataclass(frozen=True)
class ContrastiveSettings:
    pooling: str
    temperature: float = 0.05
    false_negative_offset: float | None = None
    matryoshka_dims: tuple[int, ...] | None = None
    mini_batch_size: int = 32  # GradCache chunk size


def _loss_from_vectors(q, p, settings: ContrastiveSettings):
    return matryoshka_info_nce(q, p, list(settings.matryoshka_dims or ()), settings.temperature,
                               settings.false_negative_offset)


def loss(model, batch: dict, settings: ContrastiveSettings):
    q = forward_embeddings(model, batch, settings.pooling, "q_")  # (B, dim)
    p = forward_embeddings(model, batch, settings.pooling, "p_")  # (B + negatives, dim)
    return _loss_from_vectors(q, p, settings)


def _chunks(batch: dict, prefix: str, size: int) -> list[dict]:
    """Row slices of one side of the batch, each cut down to its own padded width (or re-packed)."""
    side = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
    if is_packed(side):
        return split_packed(side, size)
    rows = side["attention_mask"].shape[0]
    chunks = []
    for start in range(0, rows, size):
        part = {k: v[start:start + size] for k, v in side.items()}
        keep = part["attention_mask"].any(dim=0)  # columns some row of this chunk uses
        chunks.append({k: v[:, keep] for k, v in part.items()})
    return chunks


def _rng_state(device):
    import torch

    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device) -> None:
    import torch

    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_backward(model, batch: dict, settings: ContrastiveSettings, scale: float = 1.0):
    """GradCache: the full-batch loss's gradients, computed `mini_batch_size` rows at a time.

    1. embed every chunk without a graph (remembering the RNG state, so dropout repeats);
    2. the loss over all vectors, backpropagated to the vectors only;
    3. re-embed each chunk with a graph and push the cached vector gradients through it.
    Returns the (detached) loss.
    """
    import torch

    device = next(model.parameters()).device
    sides = {prefix: _chunks(batch, prefix, settings.mini_batch_size) for prefix in ("q_", "p_")}
    states, vectors = {}, {}
    with torch.no_grad():
        for prefix, chunks in sides.items():
            states[prefix], parts = [], []
            for chunk in chunks:
                states[prefix].append(_rng_state(device))
                parts.append(forward_embeddings(model, chunk, settings.pooling))
            vectors[prefix] = torch.cat(parts).requires_grad_(True)  # (rows, dim)
    value = _loss_from_vectors(vectors["q_"], vectors["p_"], settings)
    (value * scale).backward()
    after = _rng_state(device)
    for prefix, chunks in sides.items():
        grads = vectors[prefix].grad.split(settings.mini_batch_size)
        for chunk, state, grad in zip(chunks, states[prefix], grads):
            _set_rng_state(state, device)
            forward_embeddings(model, chunk, settings.pooling).backward(grad)
    _set_rng_state(after, device)
    return value.detach()
