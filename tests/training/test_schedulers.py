"""Learning-rate schedules, checked against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from qtune.training.schedulers import make_scheduler


def _lrs(name: str, total: int, warmup_ratio: float, base: float = 1.0) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = make_scheduler(optimizer, name, total, warmup_ratio)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_linear_warms_up_then_decays_to_zero():
    lrs = _lrs("linear", total=10, warmup_ratio=0.2)  # 2 warmup steps
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    # after warmup: 1 - (step - 2) / 8
    assert lrs[3:] == pytest.approx([1 - k / 8 for k in range(1, 8)])


def test_cosine_follows_half_a_cosine_after_warmup():
    lrs = _lrs("cosine", total=12, warmup_ratio=0.0)
    assert lrs == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 12)) for k in range(12)])


def test_constant_after_warmup():
    assert _lrs("constant", total=6, warmup_ratio=0.5) == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])


def test_plateau_cuts_the_rate_when_the_metric_stops_rising():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, "plateau", 100, 0.1, patience=1, factor=0.5)
    seen = []
    for metric in [0.5, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7]:
        scheduler.step(metric)
        seen.append(optimizer.param_groups[0]["lr"])
    # two evaluations without improvement (patience 1) halve the rate; improving resets the count
    assert seen == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def test_unknown_schedule_is_refused():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler(optimizer, "exponential", 10, 0.0).step()
