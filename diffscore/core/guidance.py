"""Classifier-free guidance (Ho & Salimans 2022, Eq. 6, written for denoisers as in Karras et al. 2024).

D_w(x; sigma, c) = D(x; sigma, null) + w (D(x; sigma, c) - D(x; sigma, null)). w = 1 is the conditional
denoiser, w = 0 the unconditional one, w > 1 extrapolates away from the unconditional prediction. The null
condition is ``None`` (no class label; for a text backbone the empty caption ""), which the network was trained
on through condition dropout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

Denoiser = Callable[..., Tensor]


def guide(denoised_uncond: Tensor, denoised_cond: Tensor, guidance: float) -> Tensor:
    """D_uncond + w (D_cond - D_uncond), elementwise."""
    return denoised_uncond + guidance * (denoised_cond - denoised_uncond)


def guided_denoiser(denoiser: Denoiser, guidance: float, uncond: Any = None) -> Denoiser:
    """A denoiser with the sampler signature ``(x, sigma, cond=None, aug_label=None)`` that applies guidance
    scale ``guidance`` between ``cond`` and ``uncond``; w = 1 calls the conditional denoiser once, exactly."""

    def denoise(x: Tensor, sigma: Tensor, cond: Any = None, aug_label: Tensor | None = None) -> Tensor:
        denoised_cond = denoiser(x, sigma, cond, aug_label)
        if guidance == 1.0:
            return denoised_cond
        return guide(denoiser(x, sigma, uncond, aug_label), denoised_cond, guidance)

    return denoise
