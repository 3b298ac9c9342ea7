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


@torch.no_grad()
def dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Tensor | None = None) -> Tensor:
    """Implements DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in the EDM convention, lambda = -ln sigma.

    One evaluation per step; the step to sigma = 0 returns the last denoised estimate.
    """
    grid = _sigma_list(sigmas)
    old_denoised, h_last = None, None
    for s_cur, s_next in zip(grid[:-1], grid[1:]):
        denoised = _denoise(denoiser, x, s_cur, cond)
        if s_next == 0:
            return denoised
        h = math.log(s_cur / s_next)
        if old_denoised is None:
            d = denoised
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (s_next / s_cur) * x - math.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def unipc(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Tensor | None = None) -> Tensor:
    """Implements UniPC-2 with B(h) = e^h - 1 ("bh2"; Zhao et al. 2023, Algorithms 1-3), data prediction,
    lambda = -ln sigma: a UniP-2 predictor (= DPM-Solver++(2M)) and a UniC corrector that reuses the
    evaluation at the predicted point, so N steps still cost N evaluations. The step to sigma = 0 returns the
    last denoised estimate.
    """
    grid = _sigma_list(sigmas)
    m = _denoise(denoiser, x, grid[0], cond)  # model output at (x, sigma_0)
    prev: tuple[float, Tensor] | None = None  # (lambda, model output) one step back
    for s_cur, s_next in zip(grid[:-1], grid[1:]):
        if s_next == 0:
            return m
        lam, lam_next = -math.log(s_cur), -math.log(s_next)
        h = lam_next - lam
        hh = -h  # data prediction runs the exponential integrator in -h
        h_phi_1 = math.expm1(hh)
        B_h = math.expm1(hh)
        x_base = (s_next / s_cur) * x - h_phi_1 * m
        if prev is not None:
            r1 = (prev[0] - lam) / h
            D1 = (prev[1] - m) / r1
            x_pred = x_base - B_h * 0.5 * D1  # UniP-2
        else:
            x_pred = x_base  # first step: first order
        m_next = _denoise(denoiser, x_pred, s_next, cond)
        if prev is not None:  # UniC-2: solve R rho = b for the two correction weights
            k1 = h_phi_1 / hh - 1
            k2 = k1 / hh - 0.5
            R = torch.tensor([[1.0, 1.0], [r1, 1.0]], dtype=torch.float64)
            b = torch.tensor([k1 / B_h, 2 * k2 / B_h], dtype=torch.float64)
            rho = torch.linalg.solve(R, b).tolist()
            x = x_base - B_h * (rho[0] * D1 + rho[1] * (m_next - m))
        else:
            x = x_base - B_h * 0.5 * (m_next - m)  # UniC-1
        prev, m = (lam, m), m_next
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m, "unipc": unipc}


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
    return {"euler": num_steps, "heun": 2 * num_steps - 1, "dpmpp_2m": num_steps, "unipc": num_steps}[sampler_name]
