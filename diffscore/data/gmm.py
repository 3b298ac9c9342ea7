"""Synthetic Gaussian mixtures whose exact score is known (the oracle for losses, samplers and probes)."""

from __future__ import annotations

import torch

from diffscore.core.gaussian import GMMDenoiser


def random_gmm(
    dim: int,
    num_components: int,
    seed: int = 0,
    mean_scale: float = 0.5,
    component_scale: float = 0.1,
) -> GMMDenoiser:
    """A random mixture: means ~ N(0, mean_scale^2 I), anisotropic covariances with std ~ component_scale.

    Each covariance is Q diag(s^2) Q^T with Q a random rotation and s in [0.5, 1.5] * component_scale;
    weights are Dirichlet(2) so components differ in mass. Fully determined by ``seed``.
    """
    if dim < 1 or num_components < 1:
        raise ValueError(f"dim and num_components must be positive, got {dim}, {num_components}")
    if mean_scale < 0 or component_scale <= 0:
        raise ValueError("mean_scale must be >= 0 and component_scale > 0")
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_components, dim, generator=g, dtype=torch.float64) * mean_scale  # [K, D]
    q, _ = torch.linalg.qr(torch.randn(num_components, dim, dim, generator=g, dtype=torch.float64))  # [K, D, D]
    stds = (0.5 + torch.rand(num_components, dim, generator=g, dtype=torch.float64)) * component_scale  # [K, D]
    covs = q @ torch.diag_embed(stds**2) @ q.transpose(-1, -2)  # [K, D, D]
    weights = -torch.log(torch.rand(num_components, 2, generator=g, dtype=torch.float64)).sum(1)  # Gamma(2)
    return GMMDenoiser(weights / weights.sum(), means, covs)
