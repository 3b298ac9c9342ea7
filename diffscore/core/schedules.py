"""Noise-level schedules of Karras et al. (2022): the sampler's sigma grid and the training sigma law."""

from __future__ import annotations

import torch
from torch import Tensor


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Sampler time steps of Karras et al. (2022), Eq. 5, followed by a final 0.

    t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i < N, t_N = 0.
    Computed in float64 (as EDM does) and returned as float64 on the CPU: shape [num_steps + 1].
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    if num_steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    i = torch.arange(num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    t = (hi + i / (num_steps - 1) * (lo - hi)) ** rho  # [N]
    return torch.cat([t, t.new_zeros(1)])


class LogNormalSigma:
    """Training noise levels ln(sigma) ~ N(P_mean, P_std^2), EDM Table 1 ("Training" row)."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2) -> None:
        if P_std < 0:
            raise ValueError(f"P_std must be non-negative, got {P_std}")
        self.P_mean = P_mean
        self.P_std = P_std

    def __call__(
        self,
        batch: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        z = torch.randn(batch, device=device, generator=generator)  # [B]
        return (z * self.P_std + self.P_mean).exp()

    def __repr__(self) -> str:
        return f"LogNormalSigma(P_mean={self.P_mean}, P_std={self.P_std})"
