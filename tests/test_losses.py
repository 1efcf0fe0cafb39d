"""InfoNCE and the false-negative mask against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qtune.losses import false_negative_mask, info_nce, matryoshka_mean


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def test_info_nce_matches_a_hand_computed_value():
    q = _unit([1.0, 0.0], [0.0, 1.0])
    p = _unit([1.0, 0.0], [0.6, 0.8], [0.8, 0.6])  # two positives, then one hard negative
    # similarities: q0 -> [1.0, 0.6, 0.8], q1 -> [0.0, 0.8, 0.6]; temperature 0.5 doubles them
    loss0 = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(1.2) + math.exp(1.6)))
    loss1 = -math.log(math.exp(1.6) / (math.exp(0.0) + math.exp(1.6) + math.exp(1.2)))
    assert info_nce(q, p, temperature=0.5).item() == pytest.approx((loss0 + loss1) / 2, rel=1e-12)


def test_false_negative_mask_hides_candidates_above_the_positive_plus_offset():
    similarity = torch.tensor([[0.50, 0.65, 0.55, 0.70],
                               [0.20, 0.30, 0.45, 0.35]])
    mask = false_negative_mask(similarity, offset=0.1)
    # row 0: positive 0.50 -> threshold 0.60: 0.65 and 0.70 masked; row 1: positive 0.30 -> 0.40: 0.45 masked
    assert mask.tolist() == [[False, True, False, True], [False, False, True, False]]
    # the positive itself is never masked, even with a negative offset
    assert not false_negative_mask(similarity, offset=-1.0).diagonal().any()


def test_masked_candidates_leave_the_loss():
    q = _unit([1.0, 0.0], [0.0, 1.0])
    p = _unit([0.8, 0.6], [0.0, 1.0], [1.0, 0.0])  # the hard negative beats q0's own positive
    masked = info_nce(q, p, temperature=1.0, false_negative_offset=0.1)
    # q0: positive 0.8; candidates 0.0 (kept), 1.0 (> 0.9: masked); q1: positive 1.0, nothing above 1.1
    loss0 = -math.log(math.exp(0.8) / (math.exp(0.8) + math.exp(0.0)))
    loss1 = -math.log(math.exp(1.0) / (math.exp(0.6) + math.exp(1.0) + math.exp(0.0)))
    assert masked.item() == pytest.approx((loss0 + loss1) / 2, rel=1e-12)
    assert info_nce(q, p, temperature=1.0).item() > masked.item()


def test_matryoshka_averages_the_full_and_truncated_losses():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    full = info_nce(q, p)
    half = info_nce(F.normalize(q[:, :4], dim=-1), F.normalize(p[:, :4], dim=-1))
    assert matryoshka_mean(info_nce, q, p, [4]).item() == pytest.approx(((full + half) / 2).item(), rel=1e-12)
    assert matryoshka_mean(info_nce, q, p, None).item() == pytest.approx(full.item(), rel=1e-12)
