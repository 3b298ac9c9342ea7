"""Memorization: how close generated samples are to their nearest training images.

For each sample, d1 and d2 are the L2 distances (flattened pixels) to its nearest and second-nearest
training images; a sample with d1 / d2 < 1/3 counts as a copy (the criterion of Yoon et al. 2023,
"Diffusion probabilistic models generalize when they fail to memorize").
"""

from __future__ import annotations

import torch
from torch import Tensor

COPY_RATIO = 1 / 3


@torch.no_grad()
def nearest_neighbours(samples: Tensor, train: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """(d1, d2) [N]: distances of each sample to its nearest and second-nearest training image."""
    x = samples.reshape(len(samples), -1).float()
    t = train.reshape(len(train), -1).to(x)
    if len(t) < 2:
        raise ValueError("need at least 2 training images")
    best = torch.full((len(x), 2), float("inf"), device=x.device)
    for start in range(0, len(t), chunk):
        d = torch.cdist(x, t[start : start + chunk])  # [N, chunk]
        best = torch.cat([best, d], dim=1).topk(2, dim=1, largest=False).values  # [N, 2], ascending
    return best[:, 0], best[:, 1]


def copy_ratio(samples: Tensor, train: Tensor) -> Tensor:
    """d1 / d2 per sample [N]: 0 for an exact copy, near 1 when no training image stands out."""
    d1, d2 = nearest_neighbours(samples, train)
    return d1 / d2.clamp_min(1e-12)


def memorized_fraction(ratio: Tensor, threshold: float = COPY_RATIO) -> float:
    """Share of samples whose ratio is below ``threshold``."""
    return float((ratio < threshold).float().mean())
