"""Will a run's training batches fit in memory? Checked before the first step, so a default run
that the kernel would kill at its largest batch instead picks settings that fit or stops with the
flags to change. This module estimates a forward pass and the optimizer and reads the free memory;
each task plans its own batches from them (`plan_for_device`): GradCache for embeddings
(`qtune.tasks.embedding.memory`), gradient accumulation for rerankers (`qtune.tasks.reranker.memory`).

What a step holds at its peak follows from how qtune runs a batch:

- an embedding batch of G query groups is two forward passes, as sentence-transformers runs it:
  the G queries, padded to the longest query, and the G positives and the batch's hard
  negatives, padded to the longest passage (`qtune.tasks.embedding.encode.collate`). Both graphs
  are kept until the backward, so a batch costs the sum of the two passes, and short queries
  next to long passages cost little (64 queries of 20 tokens: 4% of what 64 passages of 256 do).
- a reranker batch is one pass over all its pairs.
- a decoder loaded for packing (`qtune.modeling.packing`) runs a pass whose padding would be a
  sizeable share (on a GPU in bf16: every pass) as one row of its real tokens.

A run is killed by its largest batch, not a typical one, and each epoch the longest text is in
some batch: so `width` is the longest text's tokens, capped at --max-length (`padded_width`), and
`tokens` is rows x width, or for a packed pass the real tokens of an epoch's largest batch
(`pass_size`). Per pass, beyond the weights already loaded:

    activations ≈ layers x (tokens x (K.hidden x hidden + K.intermediate x intermediate)
                            + K_SCORES x heads x rows x width²) x bytes per value
                  (x LORA_FACTOR with LoRA)
    optimizer   ≈ trainable parameters x 16 bytes (fp32 gradient, AdamW's two moments and the
                  temporary of its update)

K is ENCODER (LayerNorm, GELU MLP, dropout) or DECODER (RMSNorm, gated MLP, rotary positions,
query and key norms); their `intermediate` counts the MLP tensors the backward keeps (the GELU's
input and output; the gate, up and their product) and `hidden` was fitted. The attention-score
term is the softmax output, its dropout and the product the math attention keeps, over the
padded cells (a packed pass pads only within its length buckets: `score_area`); it is paid on
a CPU where attention dropout is on (an encoder's 0.1): without dropout torch's CPU flash kernel
keeps no scores (all-MiniLM-L6-v2's saved tensors at 256 tokens: 42.5 values per token, layer and
hidden unit with dropout, 18.5 without), and CUDA's fused kernels keep none. LoRA keeps the same
saved tensors as full fine-tuning (counted with `torch.autograd.graph.saved_tensors_hooks`), yet
its dropout copy and low-rank product per projection leave the CPU allocator holding more: peak
RSS 1.15-1.4x full fine-tuning's activations for MiniLM, 0.9-1.3x for the Qwen3 below (1.3
fitted). Full fine-tuning pays the optimizer's 16 bytes per parameter instead.

The constants were fitted to one real training step (qtune's loss, backward, clipping and AdamW
step; in-batch negatives, one case with a hard negative) of all-MiniLM-L6-v2 (6 layers, hidden
384, 12 heads, intermediate 1536) and a random Qwen3 (4 layers, hidden 256, 4 heads, 2 key-value
heads, intermediate 768, the real tokenizer; passes packed unless the lengths are all equal), in
fp32 on a 2-core CPU, each in a fresh process, measured as peak RSS growth over the step
(`python -m bench.memory_estimate`, bench/results/memory_estimate_cpu.json; `query pass` rows x
width, with the real tokens in brackets where the pass was packed; GB = 1e9 bytes):

    model   tuning  groups x texts  query pass     passage pass    measured GB  estimate GB  ratio
    minilm  full        64 x 2      64x20          64x255                8.00         7.87   0.98
    minilm  full        32 x 2      32x20          32x255                3.98         4.12   1.04
    minilm  full       128 x 2      128x32         128x128               6.59         6.82   1.04
    minilm  full        64 x 2      64x64          64x64                 2.56         2.63   1.03
    minilm  full       512 x 2      512x16         512x32                5.65         6.37   1.13
    minilm  full         8 x 2      8x32           8x506                 2.94         3.09   1.05
    minilm  full        16 x 2      16x32          16x506                5.76         5.82   1.01
    minilm  full        32 x 3      32x20          64x255                7.63         7.72   1.01
    minilm  lora        64 x 2      64x20          64x255                9.94         9.77   0.98
    minilm  lora       128 x 2      128x32         128x128               9.34         8.39   0.90
    minilm  lora        16 x 2      16x32          16x506                6.79         7.10   1.05
    qwen    full        64 x 2      64x40 (2245)   64x255 (14160)        2.45         2.71   1.10
    qwen    full       128 x 2      128x40 (4524)  128x128 (14137)       2.68         3.00   1.12
    qwen    full        32 x 2      32x40 (1122)   32x510 (14332)        2.33         2.76   1.18
    qwen    full        64 x 3      64x40 (2245)   128x256 (28391)       4.43         4.42   1.00
    qwen    full        64 x 2      64x64          64x64                 2.02         1.64   0.81
    qwen    full        32 x 2      32x256         32x256                2.30         2.62   1.14
    qwen    lora        64 x 2      64x40 (2245)   64x255 (14160)        2.95         2.65   0.90
    qwen    lora        32 x 2      32x40 (1122)   32x510 (14332)        2.79         2.72   0.98
    qwen    lora        64 x 2      64x64          64x64                 1.35         1.27   0.93

The estimate is 0.81-1.18x the measured peak there. The allocator makes the measurement itself
vary: the same case measured in separate runs differed by up to 13% for MiniLM and by up to 30%
for the small Qwen3's smallest steps (LoRA, 64 x 64: 1.04 and 1.35 GB). A step under ~0.5 GB
measures more than the formula says: fixed costs of ~0.1-0.15 GB dominate it.

On a GPU (bf16 autocast, fused attention: no score term) the same constants count 2 bytes per
value; that has not been measured against torch.cuda.max_memory_allocated yet
(`python -m bench.memory_estimate --device cuda` does).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence



@dataclass(frozen=True)
class LayerConstants:
    """Values kept per token and layer: `hidden` x the hidden size + `intermediate` x the MLP's."""

    hidden: float
    intermediate: float


ENCODER = LayerConstants(hidden=16, intermediate=2)  # GELU MLP: its input and output
DECODER = LayerConstants(hidden=20, intermediate=3)  # gated MLP: gate, up and their product
K_SCORES = 3
LORA_FACTOR = 1.3
OPTIMIZER_BYTES_PER_PARAMETER = 16  # fp32 gradient, AdamW's two moments, its step's temporary
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
    attention_scores: bool  # the attention keeps its scores for the backward (CPU with attention dropout)
    trainable_parameters: int = 0
    decoder: bool = False  # DECODER's constants instead of ENCODER's
    adapter: bool = False  # LoRA: LORA_FACTOR
    packing: float | None = None  # a pass is packed when padding would be at least this share; None: never


def model_shape(loaded) -> ModelShape | None:
    """The shape of a `LoadedModel`; None when its config does not name the sizes the formula needs."""
    config = loaded.model.config
    sizes = [getattr(config, name, None) for name in
             ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")]
    if not all(isinstance(s, int) and s > 0 for s in sizes):
        return None
    trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    cuda = loaded.device.type == "cuda"
    dropout = max(float(getattr(config, name, 0.0) or 0.0)
                  for name in ("attention_probs_dropout_prob", "attention_dropout"))
    packing = None
    if loaded.packed:  # as `LoadedModel.packs` decides
        from qtune.modeling import packing as packing_module

        flash = cuda and loaded.precision == "bf16" and packing_module.has_flash_kernel()
        packing = 0.0 if flash else packing_module.MIN_PADDING_WITHOUT_KERNEL
    return ModelShape(*sizes, bytes_per_value=2 if loaded.precision == "bf16" else 4,
                      attention_scores=not cuda and dropout > 0, trainable_parameters=trainable,
                      decoder=loaded.family.is_decoder, adapter=loaded.is_adapter, packing=packing)


def padded_width(lengths: Sequence[int], max_length: int) -> int:
    """The width of a run's widest padded pass: every text is in some batch each epoch, so the
    longest text, capped at --max-length, sets it, whatever the batch size."""
    return min(max(lengths), max_length) if lengths else 0


def pass_size(shape: ModelShape, lengths: Sequence[int], rows: int, max_length: int) -> tuple[int, int]:
    """(width, tokens) of a run's largest forward pass of `rows` rows drawn from texts of these
    `lengths`: padded to `padded_width`, or, for a model that packs a pass with that much padding,
    the real tokens of the largest of an epoch's batches: `rows` x the mean length plus 3 standard
    deviations of a `rows`-row sum (the largest of a few hundred batches)."""
    width = padded_width(lengths, max_length)
    padded = rows * width
    if shape.packing is None or not padded:
        return width, padded
    capped = [min(n, max_length) for n in lengths]
    mean = sum(capped) / len(capped)
    spread = math.sqrt(sum((n - mean) ** 2 for n in capped) / len(capped))
    real = min(math.ceil(rows * mean + 3 * spread * math.sqrt(rows)), padded)
    return width, real if 1 - real / padded >= shape.packing else padded


def score_area(shape: ModelShape, lengths: Sequence[int], rows: int, max_length: int) -> int:
    """Attention-score cells per head of the largest pass (`pass_size`'s): rows x width^2 padded; a
    packed pass on the CPU runs attention in length buckets (`qtune.modeling.packing.length_buckets`),
    within their slack of the sum of squared lengths: the longest text's plus `rows` - 1 drawn ones
    (their mean square plus 3 standard deviations of the sum)."""
    width, tokens = pass_size(shape, lengths, rows, max_length)
    padded = rows * width * width
    if tokens == rows * width or rows < 2:
        return padded
    from qtune.modeling.packing import BUCKET_SLACK

    squares = [min(n, max_length) ** 2 for n in lengths]
    mean = sum(squares) / len(squares)
    spread = math.sqrt(sum((n - mean) ** 2 for n in squares) / len(squares))
    drawn = (rows - 1) * mean + 3 * spread * math.sqrt(rows - 1)
    return min(math.ceil(BUCKET_SLACK * (width * width + drawn)), padded)


def activation_bytes(shape: ModelShape, rows: int, width: int, tokens: int | None = None,
                     area: int | None = None) -> int:
    """Activations one forward pass of `rows` rows padded to `width` keeps for its backward (module
    docstring); `tokens`: what the layers run on, rows x width unless the pass is packed; `area`:
    attention-score cells per head (`score_area`), rows x width^2 unless the pass is packed."""
    tokens = rows * width if tokens is None else tokens
    k = DECODER if shape.decoder else ENCODER
    values = tokens * (k.hidden * shape.hidden + k.intermediate * shape.intermediate)
    if shape.attention_scores:
        values += K_SCORES * shape.heads * (rows * width * width if area is None else area)
    return int(values * shape.layers * shape.bytes_per_value * (LORA_FACTOR if shape.adapter else 1))


def optimizer_bytes(shape: ModelShape) -> int:
    return shape.trainable_parameters * OPTIMIZER_BYTES_PER_PARAMETER


def step_bytes(shape: ModelShape, rows: int, width: int, tokens: int | None = None) -> int:
    """A one-pass training step's memory beyond the loaded weights: its activations and the optimizer's."""
    return activation_bytes(shape, rows, width, tokens) + optimizer_bytes(shape)


def pass_bytes(shape: ModelShape, lengths: Sequence[int], rows: int, max_length: int) -> int:
    if not rows:
        return 0
    return activation_bytes(shape, rows, *pass_size(shape, lengths, rows, max_length),
                            area=score_area(shape, lengths, rows, max_length))


def size_text(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 1e6:.0f} MB"


def fits(needed: int, free: int) -> bool:
    return needed <= USABLE_SHARE * free


class Plan(Protocol):
    """A task's plan for its training batches: `note` is the line to print when it differs from the flags."""

    note: str | None


def plan_for_device(loaded, plan: Callable[[ModelShape, int], Plan]) -> Plan | None:
    """`plan(shape, free bytes)` for the loaded model on its device, its note printed; None when the
    model's config does not name its sizes (the flags stay as they are)."""
    shape = model_shape(loaded)
    if shape is None:
        return None
    chosen = plan(shape, free_memory(loaded.device))
    if chosen.note:
        print(chosen.note)
    return chosen


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
