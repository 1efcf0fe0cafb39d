"""Symmetric InfoNCE, GTE's improved contrastive loss and the distillation KL against values
computed by hand, with the false-negative mask where the loss has one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hand_math import kl

from qtune.losses import (distillation_kl, group_similarities, improved_contrastive, info_nce,
                          symmetric_info_nce)


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def _nll(target: float, *others: float) -> float:
    """-log(e^target / (e^target + sum e^others))."""
    return -math.log(math.exp(target) / (math.exp(target) + sum(math.exp(o) for o in others)))


Q = _unit([1.0, 0.0], [0.0, 1.0])
P = _unit([1.0, 0.0], [0.6, 0.8], [0.8, 0.6])  # two positives, then one hard negative (of query 0)


def test_symmetric_info_nce_averages_both_directions():
    # temperature 0.5 doubles the similarities
    forward = (_nll(2.0, 1.2, 1.6) + _nll(1.6, 0.0, 1.2)) / 2  # q0 -> [1, .6, .8], q1 -> [0, .8, .6]
    backward = (_nll(2.0, 0.0) + _nll(1.6, 1.2)) / 2  # d0 -> [q0 1, q1 0], d1 -> [q0 .6, q1 .8]; no negatives
    assert info_nce(Q, P, temperature=0.5).item() == pytest.approx(forward, rel=1e-12)
    assert symmetric_info_nce(Q, P, temperature=0.5).item() == pytest.approx((forward + backward) / 2, rel=1e-12)


def test_symmetric_info_nce_masks_false_negatives_in_both_directions():
    q = _unit([1.0, 0.0], [0.6, 0.8])
    p = _unit([0.8, 0.6], [0.0, 1.0])
    # q0 -> [d0 .8, d1 0]; q1 -> [d0 .96 (> .8 + .1: masked), d1 .8]
    # d0 -> [q0 .8, q1 .96 (> .9: masked)]; d1 -> [q0 0, q1 .8]
    forward = (_nll(0.8, 0.0) + 0.0) / 2
    backward = (0.0 + _nll(0.8, 0.0)) / 2
    masked = symmetric_info_nce(q, p, temperature=1.0, false_negative_offset=0.1)
    assert masked.item() == pytest.approx((forward + backward) / 2, rel=1e-12)
    unmasked = ((_nll(0.8, 0.0) + _nll(0.8, 0.96)) / 2 + (_nll(0.8, 0.96) + _nll(0.8, 0.0)) / 2) / 2
    assert symmetric_info_nce(q, p, temperature=1.0).item() == pytest.approx(unmasked, rel=1e-12)


# GTE, temperature 1, the hard negative n = (.8, .6) belongs to query 0:
# pair 0: q0->d [1, .6, .8]; q0->q1 0; d0->q [1 (the pair again), 0]; d0->d [d1 .6] (itself and its own n left out)
Z0 = [0.6, 0.8, 0.0, 1.0, 0.0, 0.6]
# pair 1: q1->d [0, .8, .6]; q1->q0 0; d1->q [.6, .8 (the pair again)]; d1->d [d0 .6, n .96]
Z1 = [0.0, 0.6, 0.0, 0.6, 0.8, 0.6, 0.96]


def test_improved_contrastive_matches_the_gte_denominator():
    owner = torch.tensor([0, 1, 0])
    expected = (_nll(1.0, *Z0) + _nll(0.8, *Z1)) / 2
    assert improved_contrastive(Q, P, temperature=1.0, candidate_owner=owner).item() == pytest.approx(expected,
                                                                                                       rel=1e-12)
    # without owners only d_i itself leaves its passage-passage sum: d0 now also meets n (.8)
    loose = (_nll(1.0, *Z0, 0.8) + _nll(0.8, *Z1)) / 2
    assert improved_contrastive(Q, P, temperature=1.0).item() == pytest.approx(loose, rel=1e-12)
    # temperature scales every term
    scaled = (_nll(2.0, *[2 * z for z in Z0]) + _nll(1.6, *[2 * z for z in Z1])) / 2
    assert improved_contrastive(Q, P, 0.5, candidate_owner=owner).item() == pytest.approx(scaled, rel=1e-12)


def test_improved_contrastive_masks_false_negatives_on_every_side():
    owner = torch.tensor([0, 1, 0])
    # pair 1's threshold is .8 + .1: d1 -> n (.96) goes; pair 0's is 1.1: nothing goes
    masked = improved_contrastive(Q, P, temperature=1.0, false_negative_offset=0.1, candidate_owner=owner)
    assert masked.item() == pytest.approx((_nll(1.0, *Z0) + _nll(0.8, *Z1[:-1])) / 2, rel=1e-12)
    # a negative offset would mask the pair's second appearance (d_i -> q_i) too; it never is
    strict = improved_contrastive(Q, P, temperature=1.0, false_negative_offset=-0.5, candidate_owner=owner)
    # pair 0 keeps terms <= .5: q0->q1 0, d0->q1 0, and the pair's own d0->q0 1; pair 1 keeps <= .3: 0, 0
    expected = (_nll(1.0, 0.0, 1.0, 0.0) + _nll(0.8, 0.0, 0.0, 0.8)) / 2
    assert strict.item() == pytest.approx(expected, rel=1e-12)


def test_group_similarities_pick_each_querys_own_candidates():
    index = torch.tensor([[0, 2], [1, 0]])
    expected = torch.tensor([[1.0, 0.8], [0.8, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(group_similarities(Q, P, index), expected)


def test_distillation_kl_matches_the_hand_computed_divergence():
    student = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.7, 5.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, -7.0]], dtype=torch.float64)
    padding = torch.tensor([[False, False, False], [False, False, True]])
    # student / 0.5, teacher / 2; row 1 has two candidates only
    row0 = kl([1.0, 0.5, 0.0], [1.8, 1.0, 0.2])
    row1 = kl([0.5, 0.0], [0.6, 1.4])
    value = distillation_kl(student, teacher, temperature=0.5, teacher_temperature=2.0, padding=padding)
    assert value.item() == pytest.approx((row0 + row1) / 2, rel=1e-12)
    value.backward()
    assert student.grad[1, 2].item() == 0.0  # the padding slot takes no part
    assert math.isfinite(student.grad.sum().item())
    # agreeing distributions: zero, whatever the scale
    same = distillation_kl(teacher / 4, teacher, temperature=0.25, teacher_temperature=1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-12)


def test_distillation_kl_has_the_gradient_of_flagembeddings_soft_cross_entropy():
    """FlagEmbedding minimises -sum p_teacher log p_student; KL differs from it by the teacher's
    entropy, a constant, so the gradients agree."""
    torch.manual_seed(0)
    student = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, dtype=torch.float64)
    distillation_kl(student, teacher, temperature=0.05).backward()
    ours = student.grad.clone()
    student.grad = None
    soft = -(F.softmax(teacher, dim=-1) * F.log_softmax(student / 0.05, dim=-1)).sum(-1).mean()
    soft.backward()
    torch.testing.assert_close(ours, student.grad)
