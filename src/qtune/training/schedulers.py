"""Learning-rate schedules: linear warmup + decay, cosine, constant, reduce-on-plateau."""

from __future__ import annotations

import math


def make_scheduler(optimizer, name: str, total_steps: int, warmup_ratio: float, *, patience: int = 1,
                   factor: float = 0.5):
    """A torch scheduler. `plateau` is stepped with the eval metric (higher is better), the others per step."""
    from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

    if name == "plateau":
        return ReduceLROnPlateau(optimizer, mode="max", patience=patience, factor=factor)
    warmup = int(round(total_steps * warmup_ratio))

    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if name == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        raise ValueError(f"unknown scheduler {name!r}")

    return LambdaLR(optimizer, scale)
