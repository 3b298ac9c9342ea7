"""Closed-form denoisers of Gaussian and Gaussian-mixture data (Wang & Vastola 2024, arXiv 2412.09726, Sec. 3).

EDM/VE convention: x_sigma = x0 + sigma n. For x0 ~ N(mu, Sigma) with Sigma = U diag(lambda) U^T,

    D(x; sigma)  = mu + U diag(lambda / (lambda + sigma^2)) U^T (x - mu)
    score(x)     = (D(x; sigma) - x) / sigma^2 = (Sigma + sigma^2 I)^{-1} (mu - x)
    x(sigma)     = mu + sum_k sqrt((sigma^2 + lambda_k) / (sigma_T^2 + lambda_k)) c_k u_k,  c_k = u_k^T (x_T - mu)

The last line is the exact solution of the probability-flow ODE started at (x_T, sigma_T). The denoisers
share the network's call signature, flatten internally (all math in float64) and return the input's shape
and dtype, so they can be handed to any sampler or loss as an oracle.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _flat_sigma(x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
    """x as [B, D] float64 and sigma as [B] float64."""
    xf = x.reshape(x.shape[0], -1).to(torch.float64)
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    s = s.expand(x.shape[0]) if s.ndim == 0 else s.reshape(x.shape[0])
    return xf, s


def _eigh_psd(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric PSD matrix, batched over leading dims."""
    if cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"covariance must be square, got shape {tuple(cov.shape)}")
    cov = cov.to(torch.float64)
    lam, U = torch.linalg.eigh((cov + cov.transpose(-1, -2)) / 2)
    if (lam < -1e-6 * lam.abs().max().clamp_min(1.0)).any():
        raise ValueError("covariance is not positive semi-definite")
    return lam.clamp_min(0.0), U


class GaussianDenoiser:
    """The exact denoiser, score and PF-ODE flow of N(mean, cov) data (mean [D], cov [D, D])."""

    def __init__(self, mean: Tensor, cov: Tensor) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        cov = torch.as_tensor(cov, dtype=torch.float64)
        if cov.shape != (mean.numel(), mean.numel()):
            raise ValueError(f"cov must be [D, D] with D={mean.numel()}, got {tuple(cov.shape)}")
        self.mean = mean  # [D]
        self.eigvals, self.eigvecs = _eigh_psd(cov)  # [D], [D, D] (columns are u_k)

    @classmethod
    def from_data(cls, x: Tensor) -> GaussianDenoiser:
        """Fit the mean and (biased) covariance of flattened data x [N, ...]."""
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        if xf.shape[0] < 2:
            raise ValueError("from_data needs at least 2 samples")
        mean = xf.mean(0)
        centered = xf - mean
        return cls(mean, centered.T @ centered / xf.shape[0])

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def to(self, device: torch.device | str) -> GaussianDenoiser:
        self.mean, self.eigvals, self.eigvecs = (t.to(device) for t in (self.mean, self.eigvals, self.eigvecs))
        return self

    def __call__(
        self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None, aug_label: Tensor | None = None
    ) -> Tensor:
        xf, s = _flat_sigma(x, sigma)
        coeff = (xf - self.mean) @ self.eigvecs  # [B, D]: c_k = u_k^T (x - mu)
        shrink = self.eigvals / (self.eigvals + s[:, None] ** 2)  # [B, D]
        denoised = self.mean + (shrink * coeff) @ self.eigvecs.T  # [B, D]
        return denoised.reshape(x.shape).to(x.dtype)

    def score(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """grad_x log p_sigma(x) = (D(x; sigma) - x) / sigma^2."""
        _, s = _flat_sigma(x, sigma)
        bshape = (-1,) + (1,) * (x.ndim - 1)
        return ((self(x, sigma).to(torch.float64) - x.to(torch.float64)) / s.view(bshape) ** 2).to(x.dtype)

    def pf_ode(self, x_T: Tensor, sigma_T: Tensor | float, sigma: Tensor | float) -> Tensor:
        """Closed-form PF-ODE solution x(sigma) from x(sigma_T) = x_T (Wang & Vastola 2024, Eq. 8)."""
        xf, s_T = _flat_sigma(x_T, sigma_T)
        _, s = _flat_sigma(x_T, sigma)
        coeff = (xf - self.mean) @ self.eigvecs  # [B, D]
        ratio = ((s[:, None] ** 2 + self.eigvals) / (s_T[:, None] ** 2 + self.eigvals)).sqrt()  # [B, D]
        x = self.mean + (ratio * coeff) @ self.eigvecs.T
        return x.reshape(x_T.shape).to(x_T.dtype)

    def sample(self, n: int, sigma: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """n draws of x0 + sigma n, shape [n, D]."""
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.mean + (z * self.eigvals.sqrt()) @ self.eigvecs.T
        return x + sigma * torch.randn(n, self.dim, dtype=torch.float64, generator=generator)


class GMMDenoiser:
    """The exact denoiser and score of a Gaussian mixture: weights [K], means [K, D], covs [K, D, D].

    D(x; sigma) = sum_k r_k(x) D_k(x; sigma), r_k the posterior of component k under N(mu_k, Sigma_k + sigma^2 I),
    computed with a log-sum-exp so that far-away points and tiny sigma stay finite.
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor) -> None:
        weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
        means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        K = weights.numel()
        if means.ndim != 2 or means.shape[0] != K:
            raise ValueError(f"means must be [K, D] with K={K}, got {tuple(means.shape)}")
        D = means.shape[1]
        if covs.shape != (K, D, D):
            raise ValueError(f"covs must be [K, D, D] = [{K}, {D}, {D}], got {tuple(covs.shape)}")
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("mixture weights must be non-negative with a positive sum")
        self.weights = weights / weights.sum()  # [K]
        self.means = means  # [K, D]
        self.eigvals, self.eigvecs = _eigh_psd(covs)  # [K, D], [K, D, D]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to(self, device: torch.device | str) -> GMMDenoiser:
        for name in ("weights", "means", "eigvals", "eigvecs"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def responsibilities(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Posterior p(k | x_sigma), shape [B, K]."""
        return self._posterior(*_flat_sigma(x, sigma))[0]

    def _posterior(self, xf: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        diff = xf[:, None, :] - self.means  # [B, K, D]
        coeff = torch.einsum("bkd,kdj->bkj", diff, self.eigvecs)  # [B, K, D]
        var = self.eigvals + s[:, None, None] ** 2  # [B, K, D]
        log_lik = -0.5 * ((coeff**2 / var) + var.log()).sum(-1)  # [B, K], constants dropped
        resp = torch.softmax(self.weights.log() + log_lik, dim=-1)  # [B, K]
        return resp, coeff, var

    def __call__(
        self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None, aug_label: Tensor | None = None
    ) -> Tensor:
        xf, s = _flat_sigma(x, sigma)
        resp, coeff, var = self._posterior(xf, s)
        shrunk = coeff * (self.eigvals / var)  # [B, K, D]
        per_comp = self.means + torch.einsum("bkj,kdj->bkd", shrunk, self.eigvecs)  # [B, K, D]
        denoised = (resp[..., None] * per_comp).sum(1)  # [B, D]
        return denoised.reshape(x.shape).to(x.dtype)

    def score(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """grad_x log p_sigma(x) = (D(x; sigma) - x) / sigma^2."""
        _, s = _flat_sigma(x, sigma)
        bshape = (-1,) + (1,) * (x.ndim - 1)
        return ((self(x, sigma).to(torch.float64) - x.to(torch.float64)) / s.view(bshape) ** 2).to(x.dtype)

    def sample(self, n: int, sigma: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """n draws of x0 + sigma n from the mixture, shape [n, D] (float64, CPU unless moved)."""
        device = self.means.device
        k = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator).to(device)  # [n]
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator).to(device)
        x0 = self.means[k] + torch.einsum("nj,ndj->nd", z * self.eigvals[k].sqrt(), self.eigvecs[k])
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator).to(device)
        return x0 + sigma * noise
