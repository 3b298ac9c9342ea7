"""The noise-level rules against their closed forms on spectra chosen by hand, on Gaussian samples with a chosen
covariance, and under scaling of the data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import lambertw

from diffscore.core.gaussian import GaussianDenoiser
from diffscore.core.noise_levels import (
    data_scales,
    gaussian_mmse,
    kl_to_isotropic,
    lognormal_over_band,
    mmse_band,
    suggest_noise_levels,
    suggest_sigma_data,
    suggest_sigma_max,
    suggest_sigma_min,
    teleport_level,
)
from diffscore.core.precond import edm_coefficients

Q2 = (2 / 255) ** 2 / 12  # rms rounding error^2 of 8-bit images in [-1, 1]
Z95 = 1.6448536269514722


def r_of_kl(c: float) -> float:
    """The r > 0 with r - ln(1 + r) = c, in closed form: 1 + r = -W_{-1}(-exp(-(1 + c)))."""
    return float(-lambertw(-math.exp(-(1 + c)), k=-1).real) - 1


def random_rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def gaussian_with(lam: list[float], mean: torch.Tensor, seed: int = 0) -> GaussianDenoiser:
    u = random_rotation(len(lam), seed)
    return GaussianDenoiser.from_moments(mean, u @ torch.diag(torch.tensor(lam, dtype=torch.float64)) @ u.T)


def test_formulas_match_torch_kl_and_the_denoisers_monte_carlo_error():
    lam = [2.0, 0.5, 0.1, 1e-3]
    mean = torch.tensor([0.3, -1.0, 0.2, 0.5], dtype=torch.float64)
    g = gaussian_with(lam, mean)
    sigma = 0.7
    cov = g.eigvecs @ torch.diag(g.eigvals) @ g.eigvecs.T
    p = torch.distributions.MultivariateNormal(mean, cov + sigma**2 * torch.eye(4, dtype=torch.float64))
    q = torch.distributions.MultivariateNormal(
        torch.zeros(4, dtype=torch.float64), sigma**2 * torch.eye(4, dtype=torch.float64)
    )
    kl = float(kl_to_isotropic(torch.tensor(lam), sigma, float((mean**2).sum())))
    assert kl == pytest.approx(float(torch.distributions.kl_divergence(p, q)), rel=1e-10)
    gen = torch.Generator().manual_seed(1)
    x0 = g.sample(40000, generator=gen)
    x = x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    mc = float(((g(x, sigma) - x0) ** 2).sum(1).mean())  # the denoiser's expected squared error, sampled
    assert mc == pytest.approx(float(gaussian_mmse(torch.tensor(lam), sigma)), rel=0.02)


def test_sigma_max_closed_forms():
    tol = 0.01
    lam = 3.0  # one eigenvalue, start at mu: sigma^2 = lambda / r, r - ln(1 + r) = 2 tol
    assert suggest_sigma_max(torch.tensor([lam]), tol) == pytest.approx(math.sqrt(lam / r_of_kl(2 * tol)), rel=1e-10)
    d = 5  # d equal eigenvalues: r - ln(1 + r) = 2 tol / d
    expected = math.sqrt(lam / r_of_kl(2 * tol / d))
    assert suggest_sigma_max(torch.full((d,), lam), tol) == pytest.approx(expected, rel=1e-10)
    # no variance, only the start mean's offset: ||mu||^2 / (2 sigma^2) = tol
    assert suggest_sigma_max(torch.zeros(3), tol, mean_offset_sq=8.0) == pytest.approx(math.sqrt(8.0 / (2 * tol)))
    # the top eigenvalue dominates: large sigma, KL ~ sum lambda^2 / (4 sigma^4)
    spread = torch.tensor([100.0, 1e-2, 1e-3])
    assert suggest_sigma_max(spread, 1e-6) == pytest.approx((100.0**2 / (4e-6)) ** 0.25, rel=1e-3)


def test_sigma_min_closed_forms():
    lam = 0.04  # isotropic: lambda s^2 / (lambda + s^2) = q^2
    assert suggest_sigma_min(torch.full((10,), lam)) == pytest.approx(math.sqrt(lam * Q2 / (lam - Q2)), rel=1e-10)
    # 4 of 10 coordinates constant (the smallest eigenvalues 0): 0.6 lambda s^2 / (lambda + s^2) = q^2
    expected = math.sqrt(lam * Q2 / (0.6 * lam - Q2))
    assert suggest_sigma_min(torch.full((6,), lam), dim=10) == pytest.approx(expected, rel=1e-10)
    assert suggest_sigma_min(torch.tensor([lam] * 6 + [0.0] * 4)) == pytest.approx(expected, rel=1e-10)
    # EDM's sigma_min for broad-spectrum 8-bit data: ~ 2/255 / sqrt(12)
    assert suggest_sigma_min(torch.full((3,), 1e4)) == pytest.approx(math.sqrt(Q2), rel=1e-6)
    step = 0.1
    assert suggest_sigma_min(torch.full((2,), 1e4), quantization_step=step) == pytest.approx(step / 12**0.5, rel=1e-5)


def test_band_and_lognormal_closed_forms():
    lam = 0.25  # equal eigenvalues: mmse / tr = s^2 / (lambda + s^2) = p  ->  s^2 = lambda p / (1 - p)
    lo, hi = mmse_band(torch.full((7,), lam))
    assert lo == pytest.approx(math.sqrt(lam * 0.05 / 0.95), rel=1e-10)
    assert hi == pytest.approx(math.sqrt(lam * 0.95 / 0.05), rel=1e-10)
    p_mean, p_std = lognormal_over_band(lo, hi)
    assert p_mean == pytest.approx(math.log(math.sqrt(lam)), abs=1e-10)
    assert p_std == pytest.approx(math.log(19) / (2 * Z95), rel=1e-10)
    # the band is the lognormal's central 90%: P(sigma < lo) = P(sigma > hi) = 5%
    law = torch.distributions.Normal(torch.tensor(p_mean, dtype=torch.float64), p_std)
    assert float(law.cdf(torch.tensor(math.log(lo), dtype=torch.float64))) == pytest.approx(0.05, abs=1e-9)
    assert float(law.cdf(torch.tensor(math.log(hi), dtype=torch.float64))) == pytest.approx(0.95, abs=1e-9)
    two = torch.tensor([1.0, 1e-4], dtype=torch.float64)  # two scales: the band spans both
    lo2, hi2 = mmse_band(two)
    assert float(gaussian_mmse(two, lo2)) / float(two.sum()) == pytest.approx(0.05, rel=1e-9)
    assert float(gaussian_mmse(two, hi2)) / float(two.sum()) == pytest.approx(0.95, rel=1e-9)


def test_suggestions_from_moments_and_from_samples_equal_the_closed_forms():
    lam = [0.09] * 3  # three equal eigenvalues, a known mean, a random rotation
    mean = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)
    tol = 0.01
    m2 = float((mean**2).sum())
    r = r_of_kl(2 * tol / 3)

    def closed_form_sigma_max(lam_: float, mean_sq: float) -> float:  # KL = 3/2 (r - ln(1+r)) + m^2 / (2 s^2)
        from scipy.optimize import brentq

        def kl(s: float) -> float:
            r_ = lam_ / s**2
            return 1.5 * (r_ - math.log1p(r_)) + mean_sq / (2 * s**2) - tol

        return brentq(kl, 1e-3, 1e3, xtol=1e-14)

    exact = {
        "sigma_data": math.sqrt(0.09 + m2 / 3),  # RMS about zero: sqrt((tr Sigma + |mu|^2) / D) = 0.4
        "sigma_max_centered": math.sqrt(0.09 / r),
        "sigma_max": closed_form_sigma_max(0.09, m2),
        "sigma_min": math.sqrt(0.09 * Q2 / (0.09 - Q2)),
        "P_mean": math.log(0.3),
        "P_std": math.log(19) / (2 * Z95),
    }
    got = suggest_noise_levels(gaussian_with(lam, mean), kl_tolerance=tol).as_dict()
    for key, value in exact.items():
        assert got[key] == pytest.approx(value, rel=1e-8, abs=1e-10), key
    x = gaussian_with(lam, mean, seed=3).sample(200_000, generator=torch.Generator().manual_seed(0))
    sampled = suggest_noise_levels(GaussianDenoiser.from_data(x), kl_tolerance=tol).as_dict()
    for key, value in exact.items():
        assert sampled[key] == pytest.approx(value, rel=0.01, abs=0.01), key


@pytest.mark.parametrize("k", [0.1, 3.0])
def test_scaling_the_data_scales_sigma_data_and_sigma_max(k):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.gamma(2.0, 0.3, size=(500, 12)) @ rng.normal(size=(12, 12))) - 0.5
    base = suggest_noise_levels(GaussianDenoiser.from_data(x))
    scaled = suggest_noise_levels(GaussianDenoiser.from_data(k * x))
    for key in ("sigma_data", "sigma_max", "sigma_max_centered"):
        assert getattr(scaled, key) == pytest.approx(k * getattr(base, key), rel=1e-8), key
    assert scaled.band == pytest.approx((k * base.band[0], k * base.band[1]), rel=1e-8)
    assert scaled.P_mean == pytest.approx(base.P_mean + math.log(k), abs=1e-8)
    assert scaled.P_std == pytest.approx(base.P_std, rel=1e-8)


def test_sigma_data_is_the_rms_std_and_counts_a_low_rank_fit_as_zeros():
    assert suggest_sigma_data(torch.tensor([1.0, 3.0])) == pytest.approx(math.sqrt(2.0))
    assert suggest_sigma_data(torch.tensor([1.0, 3.0]), dim=4) == pytest.approx(1.0)
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + 7
    assert suggest_sigma_data(GaussianDenoiser.from_data(x).eigvals) == pytest.approx(
        float(x.var(0, False).mean().sqrt())
    )


def test_teleport_level():
    sigmas = [0.1, 0.5, 1.0, 5.0, 10.0]
    assert teleport_level(sigmas, [0.5, 0.9, 0.995, 0.999, 1.0]) == 1.0
    assert teleport_level(sigmas[::-1], [1.0, 0.999, 0.995, 0.9, 0.5]) == 1.0  # order of the grid does not matter
    assert teleport_level(sigmas, [0.5, 0.995, 0.999, 0.98, 1.0]) == 10.0  # a dip: only above it
    assert teleport_level(sigmas, [0.5, 0.9, 0.995, 0.999, 0.98]) is None
    assert teleport_level(sigmas, [0.5, 0.9, 0.995, 0.999, 1.0], threshold=0.9) == 0.5


def test_bad_spectra_raise():
    with pytest.raises(ValueError, match=">= 0"):
        suggest_sigma_max(torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="zero variance"):
        mmse_band(torch.zeros(3))
    with pytest.raises(ValueError, match="below q"):
        suggest_sigma_min(torch.full((3,), 1e-7))
    with pytest.raises(ValueError, match="as many"):
        teleport_level([1.0, 2.0], [0.5])


def test_the_three_data_scales_equal_their_sample_forms_exactly():
    """per_pixel^2 = mean_i Var(x_i), pooled^2 = the variance of all N D values about their one mean, rms^2 =
    mean of x^2: identities of the (biased) moments that GaussianDenoiser.from_data fits, so they hold to
    round-off; and rms^2 = pooled^2 + mean^2 >= pooled^2 >= per_pixel^2."""
    g = torch.Generator().manual_seed(0)
    x = (
        0.3
        * torch.randn(400, 24, generator=g, dtype=torch.float64)
        @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    )
    x = x / 4 + torch.linspace(-0.2, 0.9, 24, dtype=torch.float64)  # a mean that differs between coordinates
    fit = GaussianDenoiser.from_data(x)
    scales = data_scales(fit.mean, fit.eigvals, fit.dim)
    assert scales["per_pixel"] == pytest.approx(float(x.var(0, unbiased=False).mean().sqrt()), rel=1e-12)
    assert scales["pooled"] == pytest.approx(float(x.flatten().std(unbiased=False)), rel=1e-12)
    assert scales["rms"] == pytest.approx(float(x.square().mean().sqrt()), rel=1e-12)
    assert scales["rms"] ** 2 == pytest.approx(scales["pooled"] ** 2 + float(x.mean()) ** 2, rel=1e-12)
    assert suggest_sigma_data(fit.eigvals, fit.dim, float((fit.mean**2).sum())) == pytest.approx(
        scales["rms"], rel=1e-12
    )
    assert suggest_noise_levels(fit).sigma_data == pytest.approx(scales["rms"], rel=1e-12)
    centred = data_scales(torch.zeros(24), fit.eigvals, fit.dim)  # zero mean: the three agree
    assert centred["per_pixel"] == pytest.approx(centred["pooled"]) == pytest.approx(centred["rms"])


@pytest.mark.parametrize("sigma", [0.01, 0.5, 5.0, 80.0])
def test_with_the_rms_the_networks_input_and_target_have_unit_magnitude_for_data_far_from_zero(sigma):
    """EDM's derivation (App. B.6) with the mean the network sees: E||c_in (x0 + n)||^2 / D and
    E||(x0 - c_skip (x0 + n)) / c_out||^2 / D are 1 at every sigma with sigma_data = rms, not with the
    per-coordinate std (white pages: mean 0.7, per-pixel std 0.12)."""
    g = torch.Generator().manual_seed(1)
    d, n = 64, 20000
    x0 = 0.7 + 0.12 * torch.randn(n, d, generator=g, dtype=torch.float64)  # mostly white pages in [-1, 1]
    noise = sigma * torch.randn(n, d, generator=g, dtype=torch.float64)
    fit = GaussianDenoiser.from_data(x0)
    scales = data_scales(fit.mean, fit.eigvals, fit.dim)

    def magnitudes(sigma_data: float) -> tuple[float, float]:
        c_skip, c_out, c_in, _ = edm_coefficients(torch.tensor(sigma, dtype=torch.float64), sigma_data)
        net_input = c_in * (x0 + noise)
        target = (x0 - c_skip * (x0 + noise)) / c_out
        return float(net_input.square().mean()), float(target.square().mean())

    def closed_form(sigma_data: float) -> tuple[float, float]:  # m2 = E||x0||^2 / D = rms^2
        m2, s2, v = scales["rms"] ** 2, sigma_data**2, sigma**2
        c_skip, c_out2 = s2 / (s2 + v), v * s2 / (s2 + v)
        return (m2 + v) / (s2 + v), ((1 - c_skip) ** 2 * m2 + c_skip**2 * v) / c_out2

    for rule, unit in (("rms", True), ("per_pixel", False)):
        sampled, exact = magnitudes(scales[rule]), closed_form(scales[rule])
        assert sampled == pytest.approx(exact, rel=0.03)
        assert exact == pytest.approx((1.0, 1.0), rel=1e-12) if unit else max(exact) > 2
