"""Noise-level schedules of Karras et al. (2022): the sampler's sigma grid and the training sigma law."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def karras_sigmas(
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    round_sigma: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Sampler time steps of Karras et al. (2022), Eq. 5, followed by a final 0.

    t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i < N, t_N = 0.
    Computed in float64 (as EDM does) and returned as float64 on the CPU: shape [num_steps + 1].
    ``round_sigma`` (a denoiser's, e.g. ``iDDPMPrecond.round_sigma``) maps t_0 .. t_{N-1} to the noise levels
    the denoiser supports, as EDM's sampler does; t_N stays 0.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    if num_steps == 1:
        t = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        i = torch.arange(num_steps, dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        t = (hi + i / (num_steps - 1) * (lo - hi)) ** rho  # [N]
    if round_sigma is not None:
        t = torch.as_tensor(round_sigma(t)).to(device="cpu", dtype=torch.float64).reshape(num_steps)
    return torch.cat([t, t.new_zeros(1)])


def clip_sigma_range(
    sigma_min: float,
    sigma_max: float,
    supported_min: float = 0.0,
    supported_max: float = float("inf"),
) -> tuple[float, float]:
    """The requested sampler range (sigma_min, sigma_max) clipped to a denoiser's supported range, as EDM's
    sampler does: (max(sigma_min, supported_min), min(sigma_max, supported_max)). Raises when they do not meet.

    Pass the preconditioning's values, e.g. ``clip_sigma_range(0.002, 80.0, net.sigma_min, net.sigma_max)``.
    """
    if not 0 < sigma_min <= sigma_max or not 0 <= supported_min <= supported_max:
        raise ValueError(
            f"need 0 < sigma_min <= sigma_max and 0 <= supported_min <= supported_max, got "
            f"({sigma_min}, {sigma_max}) and ({supported_min}, {supported_max})"
        )
    lo, hi = max(sigma_min, supported_min), min(sigma_max, supported_max)
    if lo > hi:
        raise ValueError(
            f"sampler range [{sigma_min}, {sigma_max}] does not meet the denoiser's [{supported_min}, {supported_max}]"
        )
    return float(lo), float(hi)


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


def edm2_learning_rate(
    images_seen: float,
    ref_lr: float,
    ref_batches: float,
    batch_size: int,
    rampup_images: float = 10e6,
) -> float:
    """EDM2's learning rate (Karras et al. 2024, arXiv 2312.02696, config G's learning-rate decay; NVlabs/edm2
    ``training/training_loop.py``, ``learning_rate_schedule``):

    ref_lr / sqrt(max(t / t_ref, 1)) * min(images_seen / rampup_images, 1),

    with t = images_seen / batch_size the optimizer steps taken so far and t_ref = ref_batches: constant, then an
    inverse-square-root decay after ref_batches steps, times a linear warm-up over the first ``rampup_images``
    images (EDM2: 10M images, i.e. 10e6, not 10 Mi; on in every preset). ``ref_batches <= 0`` turns the decay
    off, ``rampup_images <= 0`` the warm-up. EDM2 evaluates it at the images seen *before* each step, so its first
    step runs at lr 0.
    """
    if images_seen < 0 or batch_size <= 0:
        raise ValueError(f"need images_seen >= 0 and batch_size > 0, got {images_seen} and {batch_size}")
    lr = ref_lr
    if ref_batches > 0:
        lr /= max(images_seen / (ref_batches * batch_size), 1) ** 0.5
    if rampup_images > 0:
        lr *= min(images_seen / rampup_images, 1)
    return lr
