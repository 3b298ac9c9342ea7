"""EDM2's power-function EMA maths against answers computed independently: quadrature on fine grids, numpy's
polynomial roots, a plain-Python recursion."""

import math

import numpy as np
import pytest
import torch

from diffscore.core.phema import (
    SIGMA_REL_MAX,
    discrete_weights,
    gamma_to_sigma_rel,
    power_beta,
    power_profile,
    profile_inner,
    reconstruction_error,
    reconstruction_weights,
    sigma_rel_to_gamma,
)
from diffscore.errors import DiffscoreError


def quad(f, t: float, n: int = 400_000) -> float:
    """Midpoint rule on (0, t] in float64 (the integrands here are smooth away from 0)."""
    tau = (torch.arange(n, dtype=torch.float64) + 0.5) * (t / n)
    return float(f(tau).sum() * (t / n))


@pytest.mark.parametrize("gamma", [0.0, 1.0, 6.94, 16.97, 50.0])
def test_sigma_rel_is_the_profiles_relative_std(gamma):
    t = 3.0
    p = lambda tau: power_profile(gamma, t, tau)  # noqa: E731
    mass = quad(p, t)
    mean = quad(lambda tau: tau * p(tau), t)
    var = quad(lambda tau: (tau - mean) ** 2 * p(tau), t)
    assert mass == pytest.approx(1.0, abs=1e-6)
    assert math.sqrt(var) / t == pytest.approx(float(gamma_to_sigma_rel(gamma)), rel=1e-5)


def test_gamma_from_sigma_rel_is_the_largest_root_of_edm2s_cubic():
    for s in [0.005, 0.01, 0.05, 0.1, 0.2, 0.25, 0.3]:
        roots = np.roots([1, 7, 16 - s**-2, 12 - s**-2])
        expected = roots[np.abs(roots.imag) < 1e-9].real.max()
        assert float(sigma_rel_to_gamma(s)) == pytest.approx(expected, rel=1e-10, abs=1e-10)
    grid = torch.linspace(0.002, 0.29, 200, dtype=torch.float64)
    torch.testing.assert_close(gamma_to_sigma_rel(sigma_rel_to_gamma(grid)), grid, rtol=1e-12, atol=0)
    assert float(sigma_rel_to_gamma(0.3)) == pytest.approx(-1 / 3, abs=1e-12)  # sigma_rel(-1/3) = 0.3 exactly
    assert float(gamma_to_sigma_rel((math.sqrt(5) - 3) / 2)) == pytest.approx(SIGMA_REL_MAX, rel=1e-15)
    assert float(gamma_to_sigma_rel(-0.3)) < SIGMA_REL_MAX and float(gamma_to_sigma_rel(-0.45)) < SIGMA_REL_MAX


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.31, float("nan")])
def test_sigma_rel_out_of_range_is_refused(bad):
    with pytest.raises(DiffscoreError, match="sigma_rel must be in"):
        sigma_rel_to_gamma(bad)


def test_recursion_with_power_beta_gives_the_integrated_profile():
    # a plain-Python EMA over a trajectory, steps of uneven size (images per step), against the profile integral
    gamma = float(sigma_rel_to_gamma(0.1))
    sizes = [64, 64, 32, 64, 48] * 40  # images per step
    times = np.cumsum(sizes).astype(float)
    rng = np.random.default_rng(0)
    theta = rng.normal(size=len(sizes))
    ema = 0.0
    for t, dt, th in zip(times, sizes, theta, strict=True):
        beta = power_beta(gamma, t, dt)
        ema = beta * ema + (1 - beta) * th
    w = discrete_weights(gamma, torch.tensor(times))
    t_prev = np.concatenate([[0.0], times[:-1]])
    bins = [quad(lambda tau, a=a: power_profile(gamma, times[-1], tau + a), b - a, 2000) for a, b in zip(t_prev, times)]
    np.testing.assert_allclose(w.numpy(), bins, rtol=1e-6, atol=1e-12)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    assert ema == pytest.approx(float((w * torch.tensor(theta)).sum()), abs=1e-12)
    assert power_beta(gamma, 64, 64) == 0.0  # the first step takes the weights as they are


def test_linear_trajectory_averages_to_the_closed_form_mean():
    # theta(t) = t: the power-function average is t (g + 1) / (g + 2); one iterate per image gives it to O(1/t)
    gamma, n = float(sigma_rel_to_gamma(0.05)), 20_000
    times = torch.arange(1, n + 1, dtype=torch.float64)
    avg = float((discrete_weights(gamma, times) * times).sum())
    assert avg / n == pytest.approx((gamma + 1) / (gamma + 2), abs=2 / n)


@pytest.mark.parametrize(
    ("ga", "ta", "gb", "tb"), [(6.94, 1.0, 16.97, 1.0), (16.97, 0.6, 6.94, 1.0), (2.0, 2.0, 0.5, 1.3)]
)
def test_inner_products_match_quadrature(ga, ta, gb, tb):
    expected = quad(lambda tau: power_profile(ga, ta, tau) * power_profile(gb, tb, tau), max(ta, tb))
    assert float(profile_inner(ga, ta, gb, tb)) == pytest.approx(expected, rel=1e-4)
    assert float(profile_inner(gb, tb, ga, ta)) == pytest.approx(expected, rel=1e-4)  # symmetric


def snapshots(n: int = 30, sigmas=(0.05, 0.10)):
    ts = torch.arange(1, n + 1, dtype=torch.float64) * 1000.0
    gammas = torch.cat([sigma_rel_to_gamma(torch.full((n,), s, dtype=torch.float64)) for s in sigmas])
    return gammas, ts.repeat(len(sigmas))


def test_reconstructing_a_tracked_profile_returns_it():
    gammas, times = snapshots()
    k = len(times) - 1  # the last 0.10 snapshot
    x = reconstruction_weights(gammas, times, gammas[k], times[k])[:, 0]
    expected = torch.zeros_like(x)
    expected[k] = 1.0
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    assert float(reconstruction_error(gammas, times, x, gammas[k], times[k])) < 1e-6


def test_reconstruction_of_an_intermediate_profile_on_a_grid():
    gammas, times = snapshots()
    target = sigma_rel_to_gamma(torch.tensor([0.03, 0.08, 0.15]))
    x = reconstruction_weights(gammas, times, target, times.max())  # [60, 3]
    torch.testing.assert_close(x.sum(0), torch.ones(3, dtype=torch.float64))
    err = reconstruction_error(gammas, times, x, target, times.max())
    # the same error on a fine grid, independently of the closed form
    tau = torch.linspace(0, float(times.max()), 40_001, dtype=torch.float64)[1:]
    for m in range(3):
        recon = sum(x[i, m] * power_profile(gammas[i], times[i], tau) for i in range(len(times)))
        want = power_profile(target[m], times.max(), tau)
        grid_err = float(((recon - want).square().sum() / want.square().sum()).sqrt())
        assert float(err[m]) == pytest.approx(grid_err, rel=0.02, abs=1e-4)
    assert float(err[1]) < 1e-3 and float(err[0]) < 0.02 and float(err[2]) < 0.01  # 30 snapshots of each


def test_bad_reconstruction_inputs_are_refused():
    with pytest.raises(DiffscoreError, match="as many gammas as times"):
        reconstruction_weights(torch.tensor([1.0, 2.0]), torch.tensor([1.0]), 3.0, 1.0)
    with pytest.raises(DiffscoreError, match="positive"):
        reconstruction_weights(torch.tensor([1.0]), torch.tensor([0.0]), 3.0, 1.0)
    with pytest.raises(DiffscoreError, match="images_per_step"):
        power_beta(1.0, 10, 20)
