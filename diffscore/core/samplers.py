"""Probability-flow ODE / SDE samplers in the EDM (variance-exploding, x = x0 + sigma n) convention.

A sampler owns its loop: ``fn(denoiser, x, sigmas, cond=None, ...) -> x0``. ``x`` is already scaled
(``x = noise * sigmas[0]``), ``sigmas`` ends with 0, and the input is never modified in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffscore.core.losses import Denoiser


def _sigma_list(sigmas: Tensor) -> list[float]:
    """The grid as host floats (one transfer, no per-step device sync); checks its shape."""
    values = [float(s) for s in torch.as_tensor(sigmas).detach().cpu().flatten()]
    if len(values) < 2:
        raise ValueError(f"sigmas needs at least 2 entries (a start and a final 0), got {len(values)}")
    if values[-1] != 0:
        raise ValueError(f"sigmas must end with 0, got {values[-1]}")
    if any(s < 0 for s in values):
        raise ValueError("sigmas must be non-negative")
    return values


def _denoise(denoiser: Denoiser, x: Tensor, sigma: float, cond: Tensor | None) -> Tensor:
    return denoiser(x, x.new_full((x.shape[0],), sigma, dtype=torch.float32), cond)


@torch.no_grad()
def euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Tensor | None = None) -> Tensor:
    """Implements Euler steps of the PF-ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, Eq. 3)."""
    grid = _sigma_list(sigmas)
    for s_cur, s_next in zip(grid[:-1], grid[1:]):
        d = (x - _denoise(denoiser, x, s_cur, cond)) / s_cur
        x = x + (s_next - s_cur) * d
    return x


@torch.no_grad()
def heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    cond: Tensor | None = None,
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = float("inf"),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Implements Algorithm 2 (Heun steps, optional churn) from Karras et al. (2022).

    No second-order correction on the step to sigma = 0, so N steps cost 2N - 1 evaluations.
    """
    grid = _sigma_list(sigmas)
    num_steps = len(grid) - 1
    gamma_max = min(s_churn / num_steps, math.sqrt(2) - 1) if s_churn > 0 else 0.0
    for s_cur, s_next in zip(grid[:-1], grid[1:]):
        gamma = gamma_max if s_min <= s_cur <= s_max else 0.0
        s_hat = s_cur * (1 + gamma)
        if gamma > 0:  # churn: add noise to climb from s_cur to s_hat
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + math.sqrt(s_hat**2 - s_cur**2) * s_noise * eps
        d = (x - _denoise(denoiser, x, s_hat, cond)) / s_hat
        x_next = x + (s_next - s_hat) * d
        if s_next > 0:  # second-order correction
            d_next = (x_next - _denoise(denoiser, x_next, s_next, cond)) / s_next
            x_next = x + (s_next - s_hat) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"euler": euler, "heun": heun}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler function registered under ``name``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def nfe(sampler_name: str, num_steps: int) -> int:
    """Denoiser evaluations of ``sampler_name`` over ``num_steps`` steps ending at sigma = 0 (heun, 18 -> 35)."""
    get_sampler(sampler_name)
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    return {"euler": num_steps, "heun": 2 * num_steps - 1}[sampler_name]
