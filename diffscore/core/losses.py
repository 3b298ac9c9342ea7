"""Per-sample denoising losses, shape [B]; the LightningModule does the reduction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
    aug_label: Tensor | None = None,
) -> Tensor:
    """EDM's loss (Karras et al. 2022, Eq. 2 with Table 1's weighting), per sample.

    lambda(sigma) * mean_{C,H,W} (D(x0 + sigma n; sigma, cond, aug_label) - x0)^2 -> [B]. Randomness (sigma,
    noise) is drawn by the caller, so this function is deterministic. ``aug_label`` [B, A] describes a clean-data
    augmentation already applied to x0 (EDM's non-leaky augmentation).
    """
    _check_sigma(x0, sigma)
    x = x0 + _per_sample(sigma, x0) * noise  # [B, ...]
    return _weighted_error(denoiser(x, sigma, cond, aug_label), x0, sigma, sigma_data)


def scoreaug_loss(
    denoiser: Denoiser,
    x0: Tensor,
    sigma: Tensor,
    noise: Tensor,
    augment: Any,
    params: Any,
    cond: Tensor | None = None,
    sigma_data: float = 0.5,
    aug_label: Tensor | None = None,
) -> Tensor:
    """ScoreAug's loss (Hou et al. 2025): the transform acts on the *noisy* sample and the target is the same
    transform of the clean one, E || D(T(x0 + sigma n); sigma, label(T)) - T(x0) ||^2 with EDM's weighting -> [B].

    ``augment`` is a :class:`diffscore.core.augment.ScoreAugment` (apply/label), ``params`` its draw;
    ``aug_label`` overrides ``augment.label(params)`` (e.g. the label padded or joined with a clean-data one).
    """
    _check_sigma(x0, sigma)
    x = augment.apply(x0 + _per_sample(sigma, x0) * noise, params)  # [B, ...]
    target = augment.apply(x0, params)
    label = augment.label(params) if aug_label is None else aug_label  # [B, A]
    return _weighted_error(denoiser(x, sigma, cond, label), target, sigma, sigma_data)


def _check_sigma(x0: Tensor, sigma: Tensor) -> None:
    if sigma.shape != x0.shape[:1]:
        raise ValueError(f"sigma must have shape [B]={tuple(x0.shape[:1])}, got {tuple(sigma.shape)}")


def _per_sample(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.view((-1,) + (1,) * (x.ndim - 1))


def _weighted_error(denoised: Tensor, target: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    err = (denoised.float() - target.float()).square().flatten(1).mean(1)  # [B]
    return edm_loss_weight(sigma.float(), sigma_data) * err


def augmented_loss(
    denoiser: Denoiser,
    x0: Tensor,
    sigma: Tensor,
    noise: Tensor,
    pipeline: Any,
    cond: Tensor | None = None,
    sigma_data: float = 0.5,
) -> Tensor:
    """The loss of a training augmentation (``pipeline``: a diffscore.core.augment_pipeline.AugmentPipeline) -> [B]:
    EDM's loss on the clean-augmented x0 conditioned on the label (EDM's non-leaky augmentation), or ScoreAug's on
    the noisy sample when the pipeline has a ScoreAugment; EDM's plain loss without augmenters."""
    x0, noisy_params, label = pipeline.draw(x0)
    if noisy_params is not None:
        return scoreaug_loss(denoiser, x0, sigma, noise, pipeline.noisy, noisy_params, cond, sigma_data, label)
    return edm_loss(denoiser, x0, sigma, noise, cond, sigma_data, label)


def edm2_loss(
    denoiser: Denoiser,
    x0: Tensor,
    sigma: Tensor,
    noise: Tensor,
    cond: Tensor | None = None,
    sigma_data: float = 0.5,
    aug_label: Tensor | None = None,
) -> Tensor:
    """EDM2's uncertainty-weighted loss (Karras et al. 2024, arXiv 2312.02696, Eqs. 14-16 and 21), per sample:

    lambda(sigma) / exp(u(sigma)) * mean_{C,H,W} (D(x0 + sigma n; sigma) - x0)^2 + u(sigma) -> [B],

    with EDM's weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 and u the learned log-variance, which the
    denoiser returns when called with ``return_logvar=True`` (``diffscore.core.precond_edm2.EDM2Precond``).

    Reduction: EDM2 forms the loss per element (u broadcast to every pixel) and back-propagates its sum over all
    elements divided by the batch, i.e. C*H*W times this per-sample mean. The mean keeps diffscore's scale (that
    of :func:`edm_loss`, which it equals for u = 0) and the same minimiser: the optimal u is
    ln(lambda * mean error) either way, because u enters every pixel once. Only the gradient's overall scale
    differs, by the constant C*H*W, which Adam absorbs (up to its eps); multiply by C*H*W for EDM2's numbers.
    """
    _check_sigma(x0, sigma)
    x = x0 + _per_sample(sigma, x0) * noise  # [B, ...]
    denoised, logvar = denoiser(x, sigma, cond, aug_label, return_logvar=True)
    err = (denoised.float() - x0.float()).square().flatten(1).mean(1)  # [B]
    logvar = logvar.float().reshape(x0.shape[0])  # [B]
    return edm_loss_weight(sigma.float(), sigma_data) / logvar.exp() * err + logvar
