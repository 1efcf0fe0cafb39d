"""How a reranker's group batch fits in memory (`qtune.training.memory` estimates a pass): one
forward pass over all its pairs; when that does not fit, the batch is split into parts whose
gradients accumulate (--grad-accum), the same groups per optimizer step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from qtune.errors import QtuneError
from qtune.training.memory import ModelShape, fits, optimizer_bytes, pass_bytes, plan_for_device, size_text


@dataclass(frozen=True)
class AccumulationPlan:
    """How a group batch is run: `batch_size` groups per forward pass, `grad_accum` passes per step."""

    batch_size: int
    grad_accum: int
    needed: int
    note: str | None = None


def plan_groups(shape: ModelShape, lengths: Sequence[int], *, batch_size: int, group_size: int, grad_accum: int,
                max_length: int, free: int, data_groups: int | None = None) -> AccumulationPlan:
    """Keep the flags when `batch_size` groups of `group_size` rows (one forward pass) fit in
    `free` bytes; else split each batch into the largest divisor of `batch_size` groups that fits,
    accumulating gradients over the parts (the same groups per optimizer step, the same mean loss).
    Raises when one group does not fit. `data_groups`: the training groups there are (no batch
    holds more)."""

    def needed(groups: int) -> int:
        rows = min(groups, data_groups or groups) * group_size
        return optimizer_bytes(shape) + pass_bytes(shape, lengths, rows, max_length)

    need = needed(batch_size)
    if fits(need, free):
        return AccumulationPlan(batch_size, grad_accum, need)
    what = f"a batch of {batch_size} groups x {group_size} pairs"
    part = next((d for d in range(batch_size - 1, 0, -1) if batch_size % d == 0 and fits(needed(d), free)), None)
    if part is None:
        raise QtuneError(f"{what} needs ~{size_text(need)}, {size_text(free)} free, and even one group needs "
                         f"~{size_text(needed(1))}: lower --group-size or --max-length, free memory, or pass "
                         "--no-memory-check to try anyway")
    accum = grad_accum * batch_size // part
    return AccumulationPlan(part, accum, needed(part),
                            f"{what} needs ~{size_text(need)}, {size_text(free)} free: using --batch-size {part} "
                            f"--grad-accum {accum} (the same {batch_size * grad_accum} groups per optimizer step)")


def plan_run(config, loaded, lengths: Sequence[int], groups: Sequence) -> None:
    """The reranker task's memory planner (`Task.memory_planner`): `plan_groups` against the free
    memory of the model's device. `lengths` are the tokens of every (query, document) pair trained
    on; sets the run's --batch-size and --grad-accum, said in one line when they change."""
    plan = plan_for_device(loaded, lambda shape, free: plan_groups(
        shape, lengths, batch_size=config.batch_size, group_size=config.group_size, grad_accum=config.grad_accum,
        max_length=config.max_length, free=free, data_groups=len(groups)))
    if plan is not None:
        config.batch_size, config.grad_accum = plan.batch_size, plan.grad_accum
