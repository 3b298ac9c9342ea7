"""Guidance of a denoiser by a reference prediction (Karras et al. 2024, "Guiding a Diffusion Model with a Bad
Version of Itself", arXiv 2406.02507, Eq. 1, written for denoisers):

D_w(x; sigma, c) = D_ref(x; sigma, c) + w (D(x; sigma, c) - D_ref(x; sigma, c)).

w = 1 is the model as trained, w = 0 the reference, w > 1 extrapolates away from the reference. The reference is
either the model's own unconditional prediction (classifier-free guidance, Ho & Salimans 2022, Eq. 6: D_ref =
D(x; sigma, null), the null condition ``None``: no class label; for a text backbone the empty caption "", which
the network was trained on through condition dropout), or a second, weaker network (autoguidance: a smaller or
shorter-trained model of the same data, called with the same condition; EDM2's ``D_guide.lerp(D_main, w)``).
A guidance interval (Kynkaanniemi et al. 2024, arXiv 2404.07724) applies it only for sigma in (lo, hi].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Denoiser = Callable[..., Tensor]


def guide(denoised_uncond: Tensor, denoised_cond: Tensor, guidance: float) -> Tensor:
    """D_uncond + w (D_cond - D_uncond), elementwise."""
    return denoised_uncond + guidance * (denoised_cond - denoised_uncond)


def in_interval(sigma: Tensor, interval: tuple[float, float]) -> Tensor:
    """Whether each noise level lies in the guidance interval (lo, hi]: bool, sigma's shape."""
    lo, hi = interval
    return (sigma > lo) & (sigma <= hi)


def guided_denoiser(
    denoiser: Denoiser,
    guidance: float,
    uncond: Any = None,
    guiding: Denoiser | None = None,
    interval: tuple[float, float] | None = None,
) -> Denoiser:
    """A denoiser with the sampler signature ``(x, sigma, cond=None, aug_label=None)`` that applies guidance scale
    ``guidance`` towards ``denoiser(x, sigma, cond)`` from the reference: ``guiding(x, sigma, cond)`` when a guiding
    network is given, else ``denoiser(x, sigma, uncond)``. w = 1 calls ``denoiser`` once, exactly. With
    ``interval`` (lo, hi), samples whose sigma lies outside (lo, hi] get ``denoiser``'s output alone, and the
    reference is evaluated only when some sigma lies inside (one host read of the mask per call)."""

    def reference(x: Tensor, sigma: Tensor, cond: Any, aug_label: Tensor | None) -> Tensor:
        if guiding is not None:
            return guiding(x, sigma, cond, aug_label)
        return denoiser(x, sigma, uncond, aug_label)

    def denoise(x: Tensor, sigma: Tensor, cond: Any = None, aug_label: Tensor | None = None) -> Tensor:
        denoised = denoiser(x, sigma, cond, aug_label)
        if guidance == 1.0:
            return denoised
        if interval is None:
            return guide(reference(x, sigma, cond, aug_label), denoised, guidance)
        inside = in_interval(torch.as_tensor(sigma, device=x.device).expand(x.shape[0]), interval)  # [B]
        if not bool(inside.any()):
            return denoised
        guided = guide(reference(x, sigma, cond, aug_label), denoised, guidance)
        return torch.where(inside.view((-1,) + (1,) * (x.ndim - 1)), guided, denoised)

    return denoise
