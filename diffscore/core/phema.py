"""Power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", EDM2, Sec. 3 and Appendix C).

Time is measured in training images throughout (EDM2's ``nimg``): ``t`` is the number of images seen after the
optimizer step that produced an iterate. A power-function EMA with exponent ``gamma`` ending at time ``t`` is the
average of past iterates with the profile

    p_t(tau) = (gamma + 1) / t * (tau / t) ** gamma,   0 < tau <= t        (integrates to 1)

tracked with the per-step decay beta = (1 - dt / t) ** (gamma + 1) (EDM2 Eq. 127; ``dt`` images in the step,
so in steps of a constant batch this is beta(n) = (1 - 1/n) ** (gamma + 1)). The recursion is exact, not an
approximation: the weight it gives the iterate of the step (t_prev, t] is the integral of p_t over that step,
(t ** (gamma + 1) - t_prev ** (gamma + 1)) / t_end ** (gamma + 1) (``discrete_weights``).
The relative width is sigma_rel = sqrt(gamma + 1) / ((gamma + 2) sqrt(gamma + 3)) (EDM2 Eq. 123), the standard
deviation of p_t divided by t; it is largest, 0.30028, at gamma = (sqrt(5) - 3) / 2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffscore.errors import DiffscoreError

GAMMA_AT_MAX = (math.sqrt(5.0) - 3.0) / 2.0  # d sigma_rel / d gamma = 0 <=> gamma^2 + 3 gamma + 1 = 0
SIGMA_REL_MAX = math.sqrt(GAMMA_AT_MAX + 1) / ((GAMMA_AT_MAX + 2) * math.sqrt(GAMMA_AT_MAX + 3))  # 0.300283


def _f64(x: float | Tensor) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def gamma_to_sigma_rel(gamma: float | Tensor) -> Tensor:
    """sigma_rel = sqrt(gamma + 1) / ((gamma + 2) sqrt(gamma + 3)) (EDM2 Eq. 123), float64, same shape."""
    g = _f64(gamma)
    if bool((g <= -1).any()):
        raise DiffscoreError(f"the power-function exponent gamma must be > -1, got {gamma}")
    return torch.sqrt(g + 1) / ((g + 2) * torch.sqrt(g + 3))


def sigma_rel_to_gamma(sigma_rel: float | Tensor) -> Tensor:
    """The exponent gamma of relative width ``sigma_rel`` (EDM2 Eq. 126 and Algorithm 2), float64, same shape.

    gamma is the largest real root of gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s), s = sigma_rel^-2. On
    gamma >= GAMMA_AT_MAX, 1 / sigma_rel^2 = (gamma + 2)^2 (gamma + 3) / (gamma + 1) increases with gamma, so the
    root is found by bisection there (to float64 precision; no polynomial root solver's branch choice).
    """
    s = _f64(sigma_rel)
    if bool(((s <= 0) | (s > SIGMA_REL_MAX) | ~torch.isfinite(s)).any()):
        raise DiffscoreError(
            f"sigma_rel must be in (0, {SIGMA_REL_MAX:.5f}] (the widest power-function EMA), got {sigma_rel}"
        )
    target = s.reciprocal().square()  # 1 / sigma_rel^2
    lo = torch.full_like(s, GAMMA_AT_MAX)
    hi = target.sqrt() + 1.0  # (g + 2)^2 (g + 3) / (g + 1) > g^2: the root lies below sqrt(target)
    for _ in range(200):  # the bracket halves each time: far past float64's 52 bits
        mid = (lo + hi) / 2
        above = (mid + 2).square() * (mid + 3) / (mid + 1) > target  # mid is past the root
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
    return (lo + hi) / 2


def power_beta(gamma: float, images: float, images_per_step: float) -> float:
    """The decay of the step that ends at ``images`` seen: (1 - images_per_step / images) ** (gamma + 1)
    (EDM2 Eq. 127). A host float (no device work); 0 on the first step, which takes the weights as they are."""
    if images_per_step <= 0 or images < images_per_step:
        raise DiffscoreError(f"power_beta needs 0 < images_per_step <= images, got {images_per_step}, {images}")
    return (1.0 - images_per_step / images) ** (gamma + 1.0)


def power_profile(gamma: float | Tensor, t: float | Tensor, tau: Tensor) -> Tensor:
    """The profile p_t(tau) = (gamma + 1) / t (tau / t)^gamma on 0 < tau <= t, 0 elsewhere (EDM2 Eq. 121);
    gamma and t broadcast against ``tau``; float64."""
    g, t, tau = _f64(gamma), _f64(t), _f64(tau)
    inside = (tau > 0) & (tau <= t)
    ratio = torch.where(inside, tau / t, torch.ones_like(tau))  # keep 0 ** negative gamma out of the graph
    return torch.where(inside, (g + 1) / t * ratio**g, torch.zeros_like(ratio))


def discrete_weights(gamma: float, images: Tensor) -> Tensor:
    """The weight the tracked EMA gives each iterate: ``images`` [n] are the (increasing) images seen after
    steps 1..n; iterate k gets (t_k^(gamma+1) - t_(k-1)^(gamma+1)) / t_n^(gamma+1), with t_0 = 0: exactly the
    integral of p_(t_n) over its step. Shape [n], float64, sums to 1."""
    t = _f64(images)
    u = (t / t[-1]) ** (gamma + 1)  # [n]
    return u - torch.cat([u.new_zeros(1), u[:-1]])


def profile_inner(gamma_a: Tensor, t_a: Tensor, gamma_b: Tensor, t_b: Tensor) -> Tensor:
    """<p_a, p_b> = integral of p_a(tau) p_b(tau) over tau, in closed form (EDM2 Eq. 151 and Algorithm 3).

    With t_a <= t_b: (g_a + 1)(g_b + 1) / ((g_a + g_b + 1) t_b) (t_a / t_b)^g_b, and symmetrically. Inputs
    broadcast; float64. Needs g_a + g_b > -1, which every gamma of ``sigma_rel_to_gamma`` (>= -0.382) meets.
    """
    ga, ta, gb, tb = _f64(gamma_a), _f64(t_a), _f64(gamma_b), _f64(t_b)
    if bool((ga + gb <= -1).any()):
        raise DiffscoreError("profile_inner: gamma_a + gamma_b must be > -1 (the product is not integrable)")
    a_first = ta <= tb
    exponent = torch.where(a_first, gb, -ga)  # (t_a / t_b)^g_b, or (t_b / t_a)^g_a = (t_a / t_b)^-g_a
    return (ga + 1) * (gb + 1) * (ta / tb) ** exponent / ((ga + gb + 1) * torch.maximum(ta, tb))


def reconstruction_weights(gammas: Tensor, times: Tensor, target_gamma: Tensor, target_time: Tensor) -> Tensor:
    """Least-squares weights x [N, M] such that sum_i x_im p_(gamma_i, t_i) approximates the target profile m
    (EDM2 Sec. 3.2 and Appendix C.3): the normal equations A x = b with A_ij = <p_i, p_j> and
    b_im = <p_i, p_target_m>, solved with lstsq (rank-revealing SVD driver) in float64, then each column scaled
    to sum to 1 (as EDM2's reference does), so that a parameter that never changed stays as it was.

    gammas, times: [N] snapshots (any mix of tracked profiles); target_gamma, target_time: [M] (or scalars).
    """
    g, t = _f64(gammas).reshape(-1), _f64(times).reshape(-1)  # [N]
    tg, tt = torch.broadcast_tensors(_f64(target_gamma).reshape(-1), _f64(target_time).reshape(-1))  # [M]
    if len(g) != len(t) or len(g) == 0:
        raise DiffscoreError(f"reconstruction_weights needs as many gammas as times (>= 1), got {len(g)}, {len(t)}")
    if bool((t <= 0).any()) or bool((tt <= 0).any()):
        raise DiffscoreError("reconstruction_weights: snapshot and target times must be positive (images seen)")
    gram = profile_inner(g[:, None], t[:, None], g[None, :], t[None, :])  # [N, N]
    rhs = profile_inner(g[:, None], t[:, None], tg[None, :], tt[None, :])  # [N, M]
    x = torch.linalg.lstsq(gram, rhs, driver="gelsd").solution  # [N, M]
    return x / x.sum(dim=0, keepdim=True)


def reconstruction_error(
    gammas: Tensor, times: Tensor, weights: Tensor, target_gamma: Tensor, target_time: Tensor
) -> Tensor:
    """The relative L2 error ||sum_i x_i p_i - p_target|| / ||p_target|| of weights [N, M], from the closed-form
    inner products (no grid): sqrt(x'Ax - 2 x'b + c) / sqrt(c). Shape [M], float64."""
    g, t = _f64(gammas).reshape(-1), _f64(times).reshape(-1)
    tg, tt = torch.broadcast_tensors(_f64(target_gamma).reshape(-1), _f64(target_time).reshape(-1))
    x = _f64(weights).reshape(len(g), -1)  # [N, M]
    gram = profile_inner(g[:, None], t[:, None], g[None, :], t[None, :])  # [N, N]
    rhs = profile_inner(g[:, None], t[:, None], tg[None, :], tt[None, :])  # [N, M]
    own = profile_inner(tg, tt, tg, tt)  # [M]
    sq = (x * (gram @ x)).sum(0) - 2 * (x * rhs).sum(0) + own
    return sq.clamp_min(0).sqrt() / own.sqrt()
