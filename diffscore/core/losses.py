"""Per-sample denoising losses, shape [B]; the LightningModule does the reduction."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

Denoiser = Callable[..., Tensor]  # denoiser(x, sigma, cond=None, aug_label=None) -> denoised


def edm_loss_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, EDM Table 1: unit effective weight for F."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(
    denoiser: Denoiser,
    x0: Tensor,
    sigma: Tensor,
    noise: Tensor,
    cond: Tensor | None = None,
    sigma_data: float = 0.5,
) -> Tensor:
    """EDM's loss (Karras et al. 2022, Eq. 2 with Table 1's weighting), per sample.

    lambda(sigma) * mean_{C,H,W} (D(x0 + sigma n; sigma, cond) - x0)^2 -> [B]. Randomness (sigma, noise)
    is drawn by the caller, so this function is deterministic.
    """
    if sigma.shape != x0.shape[:1]:
        raise ValueError(f"sigma must have shape [B]={tuple(x0.shape[:1])}, got {tuple(sigma.shape)}")
    bshape = (-1,) + (1,) * (x0.ndim - 1)
    x = x0 + sigma.view(bshape) * noise  # [B, ...]
    denoised = denoiser(x, sigma, cond)
    err = (denoised.float() - x0.float()).square().flatten(1).mean(1)  # [B]
    return edm_loss_weight(sigma.float(), sigma_data) * err
