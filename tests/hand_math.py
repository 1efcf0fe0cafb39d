"""Plain-math references for the loss tests: what a loss should give, computed without torch."""

from __future__ import annotations

import math


def softmax(values) -> list[float]:
    total = sum(math.exp(v) for v in values)
    return [math.exp(v) / total for v in values]


def kl(teacher_logits, student_logits) -> float:
    """KL(softmax(teacher) || softmax(student))."""
    pt, ps = softmax(teacher_logits), softmax(student_logits)
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
