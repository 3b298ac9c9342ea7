"""Noise settings from the data's Gaussian model: sigma_data, sigma_max, sigma_min, P_mean and P_std.

Under the Gaussian model x0 ~ N(mu, Sigma), Sigma = U diag(lambda) U^T, everything EDM (Karras et al. 2022) asks
the user to choose has a closed form in the spectrum lambda_1..lambda_D (Wang & Vastola 2024, arXiv 2412.09726,
Sec. 3: the ideal denoiser shrinks coordinate k of x - mu by lambda_k / (lambda_k + sigma^2)). The rules, each in
its own function below and all in float64:

    sigma_data   sqrt((tr(Sigma) + ||mu||^2) / D): the RMS about zero, the magnitude EDM's preconditioning makes unit
                 (suggest_sigma_data; = the per-coordinate std for zero-mean data, ~0.5 for CIFAR-10)
    sigma_max    the smallest sigma at which KL(N(mu, Sigma + sigma^2 I) || N(m, sigma^2 I)) <= tol, with m the
                 sampler's start mean (0 in diffscore: x_T = sigma_max n), or m = mu for the "centered" level
    sigma_min    the sigma at which the Gaussian posterior's rms error per coordinate, sqrt(mmse(sigma) / D),
                 equals the rms rounding error of 8-bit images, q = step / sqrt(12), step = 2/255 in [-1, 1]
    P_mean/P_std ln(sigma) ~ N(P_mean, P_std^2) with 90% of its mass on the band where mmse(sigma) rises from 5%
                 to 95% of its range [0, tr(Sigma)]: the band's ends are the lognormal's 5% and 95% quantiles

with mmse(sigma) = sum_k lambda_k sigma^2 / (lambda_k + sigma^2), the Gaussian denoiser's expected squared error
E||D(x0 + sigma n; sigma) - x0||^2 (Wang & Vastola 2024, Sec. 3). Levels are found by bisection in ln(sigma) on
monotone functions, to float64 precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from statistics import NormalDist

import torch
from torch import Tensor

from diffscore.core.gaussian import GaussianDenoiser

QUANTIZATION_STEP = 2 / 255  # the 8-bit step of images mapped to [-1, 1]
KL_TOLERANCE = 0.01  # nats; Pinsker: total variation <= sqrt(tol / 2) = 0.071
MMSE_BAND = (0.05, 0.95)  # fractions of mmse's range that bound the training band
BAND_MASS = 0.90  # share of the training lognormal inside the band
EV_THRESHOLD = 0.99  # explained variance above which the Gaussian score stands in for the network's


def spectrum(eigvals: Tensor, dim: int | None = None) -> Tensor:
    """The eigenvalues as float64 [D], padded with zeros to ``dim`` (a low-rank fit has zero variance elsewhere)."""
    lam = torch.as_tensor(eigvals, dtype=torch.float64).flatten()
    if (lam < 0).any() or not torch.isfinite(lam).all():
        raise ValueError("eigenvalues must be finite and >= 0")
    dim = lam.numel() if dim is None else dim
    if dim < lam.numel():
        raise ValueError(f"dim {dim} is smaller than the number of eigenvalues {lam.numel()}")
    return torch.cat([lam, lam.new_zeros(dim - lam.numel())])


def gaussian_mmse(eigvals: Tensor, sigma: Tensor | float) -> Tensor:
    """mmse(sigma) = sum_k lambda_k sigma^2 / (lambda_k + sigma^2): the Gaussian denoiser's expected squared error,
    summed over coordinates, for each sigma [S] (Wang & Vastola 2024, Sec. 3). Rises from 0 to tr(Sigma)."""
    lam = spectrum(eigvals)
    s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2  # [S, 1]
    return (lam * s2 / (lam + s2)).sum(1)  # [S]


def kl_to_isotropic(eigvals: Tensor, sigma: Tensor | float, mean_offset_sq: float = 0.0) -> Tensor:
    """KL(N(mu, Sigma + sigma^2 I) || N(m, sigma^2 I)) in nats for each sigma [S], ||mu - m||^2 = mean_offset_sq:

        1/2 sum_k [lambda_k / sigma^2 - ln(1 + lambda_k / sigma^2)] + ||mu - m||^2 / (2 sigma^2),

    ~ sum_k lambda_k^2 / (4 sigma^4) + ||mu - m||^2 / (2 sigma^2) for large sigma, so the top eigenvalues dominate.
    """
    lam = spectrum(eigvals)
    s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2  # [S, 1]
    r = lam / s2  # [S, D]
    return 0.5 * (r - torch.log1p(r)).sum(1) + mean_offset_sq / (2 * s2[:, 0])  # [S]


def solve_log_sigma(f: Callable[[float], float], target: float, lo: float, hi: float) -> float:
    """The sigma in [lo, hi] with f(sigma) = target for f monotone on [lo, hi] (bisection in ln sigma, 200 halvings).
    Raises ValueError when target is not between f(lo) and f(hi)."""
    f_lo, f_hi = f(lo) - target, f(hi) - target
    if f_lo * f_hi > 0:
        raise ValueError(f"no sigma in [{lo:.3g}, {hi:.3g}] reaches {target:.6g}")
    a, b = math.log(lo), math.log(hi)
    for _ in range(200):
        mid = (a + b) / 2
        if (f(math.exp(mid)) - target) * f_lo > 0:
            a = mid
        else:
            b = mid
    return math.exp((a + b) / 2)


def _bracket(lam: Tensor, extra_sq: float = 0.0) -> tuple[float, float]:
    """A sigma bracket 1e-8 below the smallest and 1e8 above the largest scale of the spectrum (and ``extra_sq``)."""
    positive = lam[lam > 0]
    top = max(float(lam.max()), extra_sq)
    bottom = float(positive.min()) if positive.numel() else top
    return 1e-8 * math.sqrt(min(bottom, top)), 1e8 * math.sqrt(top)


def data_scales(mean: Tensor, eigvals: Tensor, dim: int | None = None) -> dict[str, float]:
    """Three scales of data x0 [D] with mean mu and covariance eigenvalues lambda (candidates for sigma_data):

        per_pixel  sqrt(tr(Sigma) / D)                             each coordinate's std about its own mean
        pooled     sqrt(tr(Sigma) / D + mean_i (mu_i - mu_bar)^2)  the std of all values about their one mean mu_bar
        rms        sqrt((tr(Sigma) + ||mu||^2) / D)                sqrt(E||x0||^2 / D), about zero

    rms^2 = pooled^2 + mu_bar^2 >= pooled^2 >= per_pixel^2; all three agree for zero-mean data."""
    lam = spectrum(eigvals, dim)
    mu = torch.as_tensor(mean, dtype=torch.float64).flatten()
    if mu.numel() != lam.numel():
        raise ValueError(f"mean has {mu.numel()} coordinates but the spectrum {lam.numel()}")
    var = float(lam.mean())
    return {
        "per_pixel": math.sqrt(var),
        "pooled": math.sqrt(var + float(((mu - mu.mean()) ** 2).mean())),
        "rms": math.sqrt(var + float((mu**2).mean())),
    }


def suggest_sigma_data(eigvals: Tensor, dim: int | None = None, mean_sq: float = 0.0) -> float:
    """sqrt((tr(Sigma) + ||mu||^2) / D) with ||mu||^2 = ``mean_sq``: the RMS of the data about zero (data_scales).

    EDM (Karras et al. 2022, App. B.6) asks that the network's input c_in (x0 + n) and its training target
    (x0 - c_skip (x0 + n)) / c_out have unit magnitude, which gives c_in = 1 / sqrt(sigma^2 + s^2),
    c_skip = s^2 / (sigma^2 + s^2), c_out = sigma s / sqrt(sigma^2 + s^2) with s^2 the data's per-coordinate
    second moment; EDM writes it as the variance, assuming zero-mean data. The network sees x0 itself, mean
    included: E||c_in (x0 + n)||^2 / D = c_in^2 (E||x0||^2 / D + sigma^2) and E||target||^2 / D =
    ((1 - c_skip)^2 E||x0||^2 / D + c_skip^2 sigma^2) / c_out^2, both 1 at every sigma exactly when
    s^2 = E||x0||^2 / D = (tr(Sigma) + ||mu||^2) / D. With the centred per-coordinate std instead, the target at
    large sigma is x0 / s, of magnitude rms / per_pixel (6 for mostly white score pages)."""
    if mean_sq < 0:
        raise ValueError(f"mean_sq must be >= 0, got {mean_sq}")
    lam = spectrum(eigvals, dim)
    return math.sqrt(float(lam.mean()) + mean_sq / lam.numel())


def suggest_sigma_max(eigvals: Tensor, kl_tolerance: float = KL_TOLERANCE, mean_offset_sq: float = 0.0) -> float:
    """The smallest sigma at which KL(N(mu, Sigma + sigma^2 I) || N(m, sigma^2 I)) <= ``kl_tolerance`` (nats),
    with ||mu - m||^2 = ``mean_offset_sq`` (see kl_to_isotropic; the KL falls monotonically in sigma).

    The PF-ODE is a bijection, so the KL of the start distribution is also the KL between what an exact sampler of
    the Gaussian model generates from N(m, sigma_max^2 I) and the model itself: the tolerance is an error budget.
    One eigenvalue lambda, m = mu: sigma_max^2 = lambda / r with r - ln(1 + r) = 2 tol.
    """
    if kl_tolerance <= 0 or mean_offset_sq < 0:
        raise ValueError(f"need kl_tolerance > 0 and mean_offset_sq >= 0, got {kl_tolerance}, {mean_offset_sq}")
    lam = spectrum(eigvals)
    if float(lam.max()) == 0 and mean_offset_sq == 0:
        raise ValueError("the data have zero variance: nothing to diffuse")
    lo, hi = _bracket(lam, mean_offset_sq)
    return solve_log_sigma(lambda s: float(kl_to_isotropic(lam, s, mean_offset_sq)), kl_tolerance, lo, hi)


def suggest_sigma_min(eigvals: Tensor, dim: int | None = None, quantization_step: float = QUANTIZATION_STEP) -> float:
    """The sigma at which sqrt(mmse(sigma) / D) = q = quantization_step / sqrt(12), the rms rounding error of the
    quantised data (2/255 / sqrt(12) = 0.00226 for 8-bit images in [-1, 1], EDM's sigma_min 0.002).

    Below it the Gaussian posterior is narrower than what rounding the sample to 8 bits loses. When every
    lambda_k >> q^2, sigma_min ~ q; coordinates with lambda_k << q^2 (constant pixels: the smallest eigenvalues)
    have nothing to denoise and raise it, to ~ q sqrt(D / D') with D' the number of larger eigenvalues.
    """
    if quantization_step <= 0:
        raise ValueError(f"quantization_step must be > 0, got {quantization_step}")
    lam = spectrum(eigvals, dim)
    q2 = quantization_step**2 / 12
    if float(lam.mean()) <= q2:
        raise ValueError(f"the data's variance per coordinate {float(lam.mean()):.3g} is below q^2 = {q2:.3g}")
    lo, hi = _bracket(lam)
    per_coordinate = lambda s: float(gaussian_mmse(lam, s)) / lam.numel()  # noqa: E731 - rises with sigma
    return solve_log_sigma(per_coordinate, q2, min(lo, 1e-3 * math.sqrt(q2)), hi)


def mmse_band(eigvals: Tensor, low: float = MMSE_BAND[0], high: float = MMSE_BAND[1]) -> tuple[float, float]:
    """(sigma_lo, sigma_hi) with mmse(sigma_lo) = low tr(Sigma) and mmse(sigma_hi) = high tr(Sigma): the noise levels
    over which the ideal denoiser's error goes from 5% to 95% of its range. One eigenvalue lambda:
    sigma^2 = lambda p / (1 - p) at p = low, high."""
    if not 0 < low < high < 1:
        raise ValueError(f"need 0 < low < high < 1, got {low}, {high}")
    lam = spectrum(eigvals)
    total = float(lam.sum())
    if total == 0:
        raise ValueError("the data have zero variance: the denoiser's error is 0 at every sigma")
    lo, hi = _bracket(lam)
    frac = lambda s: float(gaussian_mmse(lam, s)) / total  # noqa: E731 - monotone in sigma
    return solve_log_sigma(frac, low, lo, hi), solve_log_sigma(frac, high, lo, hi)


def lognormal_over_band(sigma_lo: float, sigma_hi: float, mass: float = BAND_MASS) -> tuple[float, float]:
    """(P_mean, P_std) of ln(sigma) ~ N(P_mean, P_std^2) whose central ``mass`` lies on [sigma_lo, sigma_hi]:
    P_mean = (ln sigma_lo + ln sigma_hi) / 2, P_std = (ln sigma_hi - ln sigma_lo) / (2 z), z = Phi^-1((1 + mass)/2)
    (1.645 for 90%)."""
    if not 0 < sigma_lo < sigma_hi or not 0 < mass < 1:
        raise ValueError(f"need 0 < sigma_lo < sigma_hi and 0 < mass < 1, got {sigma_lo}, {sigma_hi}, {mass}")
    z = NormalDist().inv_cdf((1 + mass) / 2)
    a, b = math.log(sigma_lo), math.log(sigma_hi)
    return (a + b) / 2, (b - a) / (2 * z)


def teleport_level(sigmas: Tensor, ev: Tensor, threshold: float = EV_THRESHOLD) -> float | None:
    """The smallest grid sigma from which up, at every grid point, the network's score has explained variance
    >= ``threshold`` against the Gaussian score (Wang & Vastola 2024, Sec. 4-5): the level to teleport to with the
    closed-form PF-ODE. None when the EV at the largest sigma is already below the threshold."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    v = torch.as_tensor(ev, dtype=torch.float64).flatten()
    if s.numel() != v.numel() or s.numel() == 0:
        raise ValueError(f"need as many EV values as sigmas, got {v.numel()} and {s.numel()}")
    order = s.argsort(descending=True)
    level = None
    for i in order.tolist():  # walk down from the largest sigma while the Gaussian stays good
        if float(v[i]) < threshold:
            break
        level = float(s[i])
    return level


@dataclass
class NoiseSuggestion:
    """The suggested settings (the DiffusionModule's argument names) and the quantities they come from."""

    sigma_data: float
    sigma_max: float  # start N(0, sigma_max^2 I), diffscore's sampler
    sigma_min: float
    P_mean: float
    P_std: float
    sigma_max_centered: float  # start N(mu, sigma_max^2 I): the covariance alone
    data_scales: dict[str, float]  # per_pixel, pooled and rms scales of the data (sigma_data is rms)
    band: tuple[float, float]  # (sigma_lo, sigma_hi) of the 5%-95% mmse band
    kl_tolerance: float
    quantization_step: float
    dim: int
    mean_sq: float  # ||mu||^2

    def as_dict(self) -> dict:
        return asdict(self)


def suggest_noise_levels(
    gaussian: GaussianDenoiser,
    kl_tolerance: float = KL_TOLERANCE,
    quantization_step: float = QUANTIZATION_STEP,
    band: tuple[float, float] = MMSE_BAND,
    band_mass: float = BAND_MASS,
) -> NoiseSuggestion:
    """Every rule of this module applied to one fitted Gaussian (GaussianDenoiser.from_data of the training set)."""
    lam = spectrum(gaussian.eigvals, gaussian.dim)  # [D]
    mean_sq = float((gaussian.mean**2).sum())
    scales = data_scales(gaussian.mean, lam)
    lo, hi = mmse_band(lam, *band)
    p_mean, p_std = lognormal_over_band(lo, hi, band_mass)
    return NoiseSuggestion(
        sigma_data=suggest_sigma_data(lam, mean_sq=mean_sq),
        sigma_max=suggest_sigma_max(lam, kl_tolerance, mean_sq),
        sigma_min=suggest_sigma_min(lam, quantization_step=quantization_step),
        P_mean=p_mean,
        P_std=p_std,
        sigma_max_centered=suggest_sigma_max(lam, kl_tolerance),
        data_scales=scales,
        band=(lo, hi),
        kl_tolerance=kl_tolerance,
        quantization_step=quantization_step,
        dim=gaussian.dim,
        mean_sq=mean_sq,
    )
