"""Will one training batch fit in memory? Checked before the first step, so a default run that
would be killed by the kernel halfway through its first batch instead picks settings that fit
(GradCache for embeddings, gradient accumulation for rerankers) or stops with the flags to change.

Training memory of a transformer step, beyond the weights already loaded:

    activations  ≈ rows x tokens x layers x (K_HIDDEN x hidden + K_INTERMEDIATE x intermediate
                                              + K_SCORES x heads x tokens) x bytes per value
    optimizer    ≈ trainable parameters x 12 bytes (fp32 gradient + AdamW's two moments)

`tokens` is the padded width of a forward pass. The attention-score term is the softmax output
and dropout mask kept per head for the backward; CUDA's fused kernels (flash, memory-efficient)
recompute them instead, so it is left out there.

The constants were fitted to the peak RSS (`ru_maxrss` of a fresh process, minus its RSS just
before the step) of one forward+backward of the real all-MiniLM-L6-v2 (6 layers, hidden 384, 12
heads, intermediate 1536; fp32, LoRA r=8 on the attention projections, sdpa attention, dropout on)
on a 2-core CPU, with K_INTERMEDIATE fixed at 2 (the GELU's input and output):

    rows x tokens   32x128  64x128  128x64  32x256  64x256  16x512  8x512
    measured GiB    1.85    3.65    3.27    4.34    8.82    6.22    3.25
    this formula    1.86    3.73    3.27    4.64    9.28    6.47    3.23

(a least-squares fit gives K_HIDDEN 30.9 and K_SCORES 3.06; they are rounded up to 32 and 3.25,
so the formula errs towards too much).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from qtune.errors import QtuneError

K_HIDDEN = 32
K_INTERMEDIATE = 2
K_SCORES = 3.25
OPTIMIZER_BYTES_PER_PARAMETER = 12
# Share of the free memory a step may plan to use: the estimate is approximate, and the data
# loader, the evaluation and other processes need some too.
USABLE_SHARE = 0.7
GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    """What sets a model's training memory per token."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    bytes_per_value: int  # 4 in fp32, 2 under bf16 autocast
    attention_scores: bool  # False where fused attention kernels keep no scores (CUDA)
    trainable_parameters: int = 0


def model_shape(loaded) -> ModelShape | None:
    """The shape of a `LoadedModel`; None when its config does not name the sizes the formula needs."""
    config = loaded.model.config
    sizes = [getattr(config, name, None) for name in
             ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")]
    if not all(isinstance(s, int) and s > 0 for s in sizes):
        return None
    trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    return ModelShape(*sizes, bytes_per_value=2 if loaded.precision == "bf16" else 4,
                      attention_scores=loaded.device.type != "cuda", trainable_parameters=trainable)


def padded_width(lengths: Sequence[int], rows: int, max_length: int) -> int:
    """The padded width of a forward pass of `rows` rows drawn from texts of these token `lengths`:
    the longest of `rows` random rows is about the rows / (rows + 1) quantile (the median for one
    row, p99.8 for 576), capped at --max-length."""
    if not lengths:
        return 0
    ordered = sorted(lengths)
    index = min(len(ordered) - 1, math.ceil(rows / (rows + 1) * len(ordered)) - 1)
    return min(ordered[max(index, 0)], max_length)


def activation_bytes(shape: ModelShape, rows: int, tokens: int) -> int:
    """Activations one forward pass of `rows` x `tokens` keeps for its backward (module docstring)."""
    per_token = (K_HIDDEN * shape.hidden + K_INTERMEDIATE * shape.intermediate
                 + (K_SCORES * shape.heads * tokens if shape.attention_scores else 0))
    return int(rows * tokens * shape.layers * per_token * shape.bytes_per_value)


def step_bytes(shape: ModelShape, rows: int, tokens: int) -> int:
    """A training step's memory beyond the loaded weights: one pass's activations and the optimizer state."""
    return activation_bytes(shape, rows, tokens) + shape.trainable_parameters * OPTIMIZER_BYTES_PER_PARAMETER


def _size(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 1e6:.0f} MB"


def fits(needed: int, free: int) -> bool:
    return needed <= USABLE_SHARE * free


@dataclass(frozen=True)
class EmbeddingPlan:
    """How an embedding batch is run: plainly, or with GradCache in `mini_batch_size`-row passes."""

    cached: bool
    mini_batch_size: int
    needed: int  # bytes the chosen way needs
    note: str | None = None  # the line to print when the plan differs from the flags


def plan_embedding(shape: ModelShape, lengths: Sequence[int], *, groups: int, texts_per_group: int,
                   max_length: int, free: int, cached: bool, mini_batch_size: int) -> EmbeddingPlan:
    """Keep the flags when the batch fits in `free` bytes; else, unless the user chose --cached,
    switch to GradCache with the largest power-of-two --mini-batch-size that fits (the same loss
    and gradients, `qtune.tasks.embedding.loss.cached_backward`). Raises when nothing fits.

    `lengths`: token counts of the training texts; a batch holds `groups` x `texts_per_group` texts."""
    rows = groups * texts_per_group
    what = f"a batch of {groups} query groups x {texts_per_group} texts"

    def needed(per_pass: int) -> int:
        passes = min(per_pass, rows)
        extra = rows * shape.hidden * 4 * 2 if per_pass < rows else 0  # GradCache's vectors and their gradients
        return step_bytes(shape, passes, padded_width(lengths, passes, max_length)) + extra

    if cached:
        need = needed(mini_batch_size)
        if fits(need, free):
            return EmbeddingPlan(True, mini_batch_size, need)
        smaller = _largest_power_of_two(lambda n: fits(needed(n), free), below=mini_batch_size)
        hint = f"--mini-batch-size {smaller}" if smaller else "a lower --max-length or --batch-size"
        raise QtuneError(f"{what} with --cached --mini-batch-size {mini_batch_size} needs ~{_size(need)}, "
                         f"{_size(free)} free: use {hint} (or --no-memory-check to try anyway)")
    need = needed(rows)
    if fits(need, free):
        return EmbeddingPlan(False, mini_batch_size, need)
    size = _largest_power_of_two(lambda n: fits(needed(n), free), below=rows)
    if not size:
        raise QtuneError(f"{what} needs ~{_size(need)}, {_size(free)} free, and even --cached --mini-batch-size 1 "
                         f"needs ~{_size(needed(1))}: lower --max-length, free memory, or pass --no-memory-check "
                         "to try anyway")
    return EmbeddingPlan(True, size, needed(size),
                         f"{what} needs ~{_size(need)}, {_size(free)} free: using --cached --mini-batch-size {size} "
                         "(same loss and gradients)")


@dataclass(frozen=True)
class AccumulationPlan:
    """How a group batch is run: `batch_size` groups per forward pass, `grad_accum` passes per step."""

    batch_size: int
    grad_accum: int
    needed: int
    note: str | None = None


def plan_groups(shape: ModelShape, lengths: Sequence[int], *, batch_size: int, group_size: int, grad_accum: int,
                max_length: int, free: int, data_groups: int | None = None) -> AccumulationPlan:
    """Keep the flags when `batch_size` groups of `group_size` rows fit in `free` bytes; else split
    each batch into the largest divisor of `batch_size` groups that fits, accumulating gradients
    over the parts (the same groups per optimizer step, the same mean loss). Raises when one group
    does not fit. `data_groups`: the training groups there are (no batch holds more)."""

    def needed(groups: int) -> int:
        rows = min(groups, data_groups or groups) * group_size
        return step_bytes(shape, rows, padded_width(lengths, rows, max_length))

    need = needed(batch_size)
    if fits(need, free):
        return AccumulationPlan(batch_size, grad_accum, need)
    what = f"a batch of {batch_size} groups x {group_size} pairs"
    part = next((d for d in range(batch_size - 1, 0, -1) if batch_size % d == 0 and fits(needed(d), free)), None)
    if part is None:
        raise QtuneError(f"{what} needs ~{_size(need)}, {_size(free)} free, and even one group needs "
                         f"~{_size(needed(1))}: lower --group-size or --max-length, free memory, or pass "
                         "--no-memory-check to try anyway")
    accum = grad_accum * batch_size // part
    return AccumulationPlan(part, accum, needed(part),
                            f"{what} needs ~{_size(need)}, {_size(free)} free: using --batch-size {part} "
                            f"--grad-accum {accum} (the same {batch_size * grad_accum} groups per optimizer step)")


def fit_embedding_batch(loaded, lengths: Sequence[int], *, groups: int, texts_per_group: int, max_length: int,
                        cached: bool, mini_batch_size: int) -> tuple[bool, int]:
    """`plan_embedding` against the free memory of the model's device: the (--cached,
    --mini-batch-size) to train with, said in one line when they differ from the flags. The flags
    unchanged when the model's config does not name its sizes."""
    shape = model_shape(loaded)
    if shape is None:
        return cached, mini_batch_size
    plan = plan_embedding(shape, lengths, groups=groups, texts_per_group=texts_per_group, max_length=max_length,
                          free=free_memory(loaded.device), cached=cached, mini_batch_size=mini_batch_size)
    if plan.note:
        print(plan.note)
    return plan.cached, plan.mini_batch_size


def fit_group_batch(loaded, lengths: Sequence[int], *, batch_size: int, group_size: int, grad_accum: int,
                    max_length: int, data_groups: int) -> tuple[int, int]:
    """`plan_groups` against the free memory of the model's device: the (--batch-size,
    --grad-accum) to train with, said in one line when they differ from the flags."""
    shape = model_shape(loaded)
    if shape is None:
        return batch_size, grad_accum
    plan = plan_groups(shape, lengths, batch_size=batch_size, group_size=group_size, grad_accum=grad_accum,
                       max_length=max_length, free=free_memory(loaded.device), data_groups=data_groups)
    if plan.note:
        print(plan.note)
    return plan.batch_size, plan.grad_accum


def _largest_power_of_two(ok, below: int) -> int | None:
    """The largest power of two under `below` for which `ok(n)`; None when not even 1."""
    n = 1
    while n * 2 < below:
        n *= 2
    while n >= 1 and n < below:
        if ok(n):
            return n
        n //= 2
    return None


def free_memory(device) -> int:
    """Bytes a step can still allocate on `device` (a torch.device): on a GPU what the driver has
    free plus what torch's caching allocator holds unused; on the CPU MemAvailable, or the
    container's memory limit minus its non-reclaimable use when that is lower, shared by the
    processes a launcher started on this machine (LOCAL_WORLD_SIZE)."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    candidates = [_meminfo_available(), _cgroup_room()]
    known = [c for c in candidates if c is not None]
    try:
        sharing = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        sharing = 1
    return min(known) // sharing if known else 0


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room(root: str = "/sys/fs/cgroup") -> int | None:
    """Limit minus use (less the reclaimable inactive page cache) of this container's memory
    cgroup, v2 (memory.max) or v1 (memory/memory.limit_in_bytes); None without a limit."""
    for limit, usage, stat, inactive in (("memory.max", "memory.current", "memory.stat", "inactive_file"),
                                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                          "memory/memory.stat", "total_inactive_file")):
        try:
            text = Path(root, limit).read_text().strip()
            used = int(Path(root, usage).read_text().strip())
        except (OSError, ValueError):
            continue
        if not text.isdigit() or int(text) >= 1 << 60:  # "max", or v1's huge "no limit" value
            return None
        reclaimable = 0
        try:
            for line in Path(root, stat).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == inactive:
                    reclaimable = int(value)
        except (OSError, ValueError):
            pass
        return max(int(text) - (used - reclaimable), 0)
    return None
