"""One-step distillation by score distillation (Diff-Instruct / VSD; DisBack, Zhang et al. 2024, arXiv 2408.15991).

A one-step generator is a denoiser D_G evaluated once at a fixed noise level sigma_init:

    x = G(z) = D_G(sigma_init z; sigma_init),   z ~ N(0, I)

Its samples are trained to follow a target score by the gradient of KL(p_G || p_target) after noising both
with N(0, sigma^2 I) (Diff-Instruct's integral KL, ProlificDreamer's VSD). For one noise level,

    d KL / d theta = E[ (s_fake(x_sigma) - s_target(x_sigma))^T d x_sigma / d theta ],  x_sigma = G(z) + sigma n

where s_fake is the score of the generator's own (noised) distribution, learned by a second "fake score"
network with the ordinary denoising loss. With the EDM convention s = (D(x; sigma) - x) / sigma^2, the
score difference is (D_fake - D_target) / sigma^2: this module works with denoiser outputs throughout.
Randomness (z, sigma, n) is drawn by the caller, so every function here is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Denoiser = Callable[..., Tensor]  # denoiser(x, sigma, cond=None, aug_label=None) -> denoised

WEIGHTINGS = ("kl", "dmd")


def one_step_generate(generator: Denoiser, z: Tensor, sigma_init: float, cond: Tensor | None = None) -> Tensor:
    """x = D_G(sigma_init z; sigma_init): the one-step generator map. z: [B, ...] ~ N(0, I) -> x: [B, ...]."""
    sigma = torch.full((z.shape[0],), float(sigma_init), device=z.device)  # [B]
    return generator(z * sigma_init, sigma, cond)


def vsd_gradient(
    fake: Denoiser,
    target: Denoiser,
    x: Tensor,
    sigma: Tensor,
    noise: Tensor,
    cond: Tensor | None = None,
    weighting: str = "kl",
) -> Tensor:
    """The score-distillation gradient w.r.t. the generator's samples x [B, ...], one noise draw per sample.

    x_sigma = x + sigma n; grad = w(sigma, x) (D_fake(x_sigma) - D_target(x_sigma)). Weightings:

    - ``kl``: w = 1 / sigma^2, so grad = s_fake(x_sigma) - s_target(x_sigma), the exact per-sample gradient of
      KL(p_G,sigma || p_target,sigma) w.r.t. x_sigma (= w.r.t. x, since x_sigma = x + sigma n).
    - ``dmd``: w = 1 / mean_{C,H,W} |x - D_target(x_sigma)| (per sample; Yin et al. 2024's normaliser), which
      evens out the gradient's scale across sigma.

    No gradient flows into the two score networks (computed under ``torch.no_grad``).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if sigma.shape != x.shape[:1]:
        raise ValueError(f"sigma must have shape [B]={tuple(x.shape[:1])}, got {tuple(sigma.shape)}")
    bshape = (-1,) + (1,) * (x.ndim - 1)
    with torch.no_grad():
        dtype = torch.promote_types(x.dtype, torch.float32)  # at least float32 (float64 stays float64)
        x = x.detach()
        x_sigma = x + sigma.view(bshape) * noise  # [B, ...]
        d_fake = fake(x_sigma, sigma, cond).to(dtype)  # [B, ...]
        d_target = target(x_sigma, sigma, cond).to(dtype)  # [B, ...]
        if weighting == "kl":
            weight = 1.0 / sigma.to(dtype).square()  # [B]
        else:
            weight = 1.0 / (x.to(dtype) - d_target).abs().flatten(1).mean(1).clamp_min(1e-8)  # [B]
        return (weight.view(bshape) * (d_fake - d_target)).to(x.dtype)


def vsd_surrogate_loss(x: Tensor, grad: Tensor) -> Tensor:
    """Per-sample loss [B] whose gradient w.r.t. x is exactly ``grad``: 0.5 ||x - stopgrad(x - grad)||^2.

    Back-propagated through x = G(z), it applies the score-distillation gradient to the generator's weights
    (the mean over the batch then averages the per-sample gradients).
    """
    if grad.shape != x.shape:
        raise ValueError(f"grad must have x's shape {tuple(x.shape)}, got {tuple(grad.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    target = (x - grad).detach()
    return 0.5 * (x.to(dtype) - target.to(dtype)).square().flatten(1).sum(1)
