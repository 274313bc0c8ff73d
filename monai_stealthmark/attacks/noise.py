"""Weight-noise attack."""

from __future__ import annotations

import torch

from ._common import clone

__all__ = ["weight_noise"]


@torch.no_grad()
def weight_noise(model: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    """A copy with Gaussian noise added to every weight tensor: ``N(0, (scale * std(tensor))^2)``."""
    m = clone(model)
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        if p.ndim > 1:
            p.add_(torch.randn(p.shape, generator=g).to(p) * scale * p.std())
    return m
