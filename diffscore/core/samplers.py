"""Probability-flow ODE / SDE samplers in the EDM (variance-exploding, x = x0 + sigma n) convention.

A sampler owns its loop: ``fn(denoiser, x, sigmas, cond=None, ...) -> x0``. ``x`` is already scaled
(``x = noise * sigmas[0]``), ``sigmas`` ends with 0, and the input is never modified in place.

A denoiser defined only on discrete noise levels (iDDPM) passes its ``round_sigma``: the grid must already lie
on those levels (``karras_sigmas(..., round_sigma=...)``) and Heun's churned levels are rounded to them, as in
EDM's sampler (Karras et al. 2022, Algorithm 2; NVlabs/edm's edm_sampler).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from diffscore.core.losses import Denoiser

RoundSigma = Callable[[Tensor], Tensor]  # noise levels [N] -> the nearest levels the denoiser supports, [N]
Generators = torch.Generator | Sequence[torch.Generator] | None  # one stream, or one per row of x


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


def _rounded(levels: list[float], round_sigma: RoundSigma) -> list[float]:
    """round_sigma of host floats, as host floats (one call, one transfer)."""
    out = round_sigma(torch.tensor(levels, dtype=torch.float64))
    return [float(s) for s in torch.as_tensor(out).detach().cpu().flatten()]


def _grid(sigmas: Tensor, round_sigma: RoundSigma | None) -> list[float]:
    """The checked grid; with ``round_sigma``, its nonzero levels must already be rounded (never fixed silently:
    x was scaled by sigmas[0])."""
    grid = _sigma_list(sigmas)
    if round_sigma is not None and _rounded(grid[:-1], round_sigma) != grid[:-1]:
        raise ValueError(
            "sigmas are not on the denoiser's noise levels; build them with karras_sigmas(..., round_sigma=)"
        )
    return grid


def _denoise(denoiser: Denoiser, x: Tensor, sigma: float, cond: Tensor | None) -> Tensor:
    return denoiser(x, x.new_full((x.shape[0],), sigma, dtype=torch.float32), cond)


def _noise_source(x: Tensor, generator: Generators) -> Callable[[], Tensor]:
    """Draws N(0, I) noise of x's shape: from one generator (or the global RNG), or row i from generator i as
    ``torch.randn(x.shape[1:], generator=g_i, dtype=float64)``, stacked and cast to x's dtype: NVlabs/edm
    generate.py's per-seed streams, which its float64 sampler draws in float64 (other dtypes give other numbers)."""
    if generator is None or isinstance(generator, torch.Generator):
        return lambda: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    gens = list(generator)
    if len(gens) != x.shape[0] or not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError(f"generator: need one torch.Generator per row of x ({x.shape[0]}), got {len(gens)} items")
    if any(g.device.type != x.device.type or g.device.index not in (None, x.device.index) for g in gens):
        raise ValueError(f"generator: the per-sample generators must live on x's device {x.device}")
    row = tuple(x.shape[1:])
    f64 = torch.float64
    return lambda: torch.stack([torch.randn(row, generator=g, device=x.device, dtype=f64) for g in gens]).to(x.dtype)


@torch.no_grad()
def euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    cond: Tensor | None = None,
    *,
    round_sigma: RoundSigma | None = None,
) -> Tensor:
    """Implements Euler steps of the PF-ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, Eq. 3)."""
    grid = _grid(sigmas, round_sigma)
    for s_cur, s_next in zip(grid[:-1], grid[1:]):
        d = (x - _denoise(denoiser, x, s_cur, cond)) / s_cur
        x = x + (s_next - s_cur) * d
    return x


def _churned_levels(
    levels: list[float], s_churn: float, s_min: float, s_max: float, round_sigma: RoundSigma | None
) -> list[float]:
    """hat t_i = t_i + gamma_i t_i, gamma_i = min(S_churn / N, sqrt(2) - 1) on [S_min, S_max], else 0
    (Algorithm 2, lines 4-5), rounded to the denoiser's levels where it has some."""
    gamma = min(s_churn / len(levels), math.sqrt(2) - 1) if s_churn > 0 else 0.0
    hats = [s + (gamma if s_min <= s <= s_max else 0.0) * s for s in levels]
    if round_sigma is None:
        return hats
    hats = _rounded(hats, round_sigma)
    if any(h < s for h, s in zip(hats, levels)):
        raise ValueError("round_sigma rounded a churned level below the level it started from")
    return hats


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
    generator: Generators = None,
    *,
    round_sigma: RoundSigma | None = None,
) -> Tensor:
    """Implements Algorithm 2 (Heun steps, optional churn) from Karras et al. (2022).

    No second-order correction on the step to sigma = 0, so N steps cost 2N - 1 evaluations. ``generator``:
    one generator (or None: the global RNG) for the whole batch, or one generator per row of x, so that a
    sample depends on its own seed only. With ``s_churn > 0`` noise is drawn at every step, also where
    gamma = 0 (as EDM's sampler does: each stream advances the same way); with ``s_churn = 0`` nothing is drawn.
    """
    grid = _grid(sigmas, round_sigma)
    hats = _churned_levels(grid[:-1], s_churn, s_min, s_max, round_sigma)
    draw = _noise_source(x, generator) if s_churn > 0 else None
    for s_cur, s_hat, s_next in zip(grid[:-1], hats, grid[1:]):
        if draw is not None:
            eps = draw()  # [B, ...]
            if s_hat > s_cur:  # churn: add noise to climb from s_cur to s_hat
                x = x + math.sqrt(s_hat**2 - s_cur**2) * s_noise * eps
        d = (x - _denoise(denoiser, x, s_hat, cond)) / s_hat
        x_next = x + (s_next - s_hat) * d
        if s_next > 0:  # second-order correction
            d_next = (x_next - _denoise(denoiser, x_next, s_next, cond)) / s_next
            x_next = x + (s_next - s_hat) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


@torch.no_grad()
def dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    cond: Tensor | None = None,
    *,
    round_sigma: RoundSigma | None = None,
) -> Tensor:
    """Implements DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in the EDM convention, lambda = -ln sigma.

    One evaluation per step; the step to sigma = 0 returns the last denoised estimate.
    """
    grid = _grid(sigmas, round_sigma)
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
def unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    cond: Tensor | None = None,
    *,
    round_sigma: RoundSigma | None = None,
) -> Tensor:
    """Implements UniPC-2 with B(h) = e^h - 1 ("bh2"; Zhao et al. 2023, Algorithms 1-3), data prediction,
    lambda = -ln sigma: a UniP-2 predictor (= DPM-Solver++(2M)) and a UniC corrector that reuses the
    evaluation at the predicted point, so N steps still cost N evaluations. The step to sigma = 0 returns the
    last denoised estimate.
    """
    grid = _grid(sigmas, round_sigma)
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
