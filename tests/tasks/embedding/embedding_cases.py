"""What the embedding tests share."""

from __future__ import annotations

import pytest
import torch


def assert_gradcache_matches_plain(model, batch, settings) -> None:
    """GradCache (`cached_backward`) gives the plain loss of `batch` and the same gradients, and
    those gradients are not trivially zero (so the comparison can fail)."""
    from qtune.tasks.embedding import loss as contrastive

    params = [p for p in model.parameters() if p.requires_grad]
    plain_loss = contrastive.loss(model, batch, settings)
    plain_loss.backward()
    plain = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    cached_loss = contrastive.cached_backward(model, batch, settings)
    cached = [p.grad.clone() for p in params]

    assert cached_loss.item() == pytest.approx(plain_loss.item(), abs=1e-5)
    assert max(g.abs().max().item() for g in plain) > 1e-4
    for a, b in zip(plain, cached):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)
