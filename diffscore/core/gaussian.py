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

from pathlib import Path

import torch
from torch import Tensor


def _flat_sigma(x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
    """x as [B, D] float64 and sigma as [B] float64."""
    xf = x.reshape(x.shape[0], -1).to(torch.float64)
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    s = s.expand(x.shape[0]) if s.ndim == 0 else s.reshape(x.shape[0])
    return xf, s


def _eigh_psd(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors of a symmetric PSD matrix, batched over leading dims. Eigenvalues below eigh's
    resolution (D * float64 eps * the largest) are round-off of a zero and are set to 0, so the directions of a
    rank-deficient covariance are removed exactly at small sigma."""
    if cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"covariance must be square, got shape {tuple(cov.shape)}")
    cov = cov.to(torch.float64)
    lam, U = torch.linalg.eigh((cov + cov.transpose(-1, -2)) / 2)
    if (lam < -1e-6 * lam.abs().max().clamp_min(1.0)).any():
        raise ValueError("covariance is not positive semi-definite")
    floor = cov.shape[-1] * torch.finfo(torch.float64).eps * lam.abs().amax(-1, keepdim=True)
    return torch.where(lam > floor, lam, torch.zeros_like(lam)), U


def score_from_denoiser(denoiser, x: Tensor, sigma: Tensor | float) -> Tensor:
    """Tweedie: grad_x log p_sigma(x) = (D(x; sigma) - x) / sigma^2, in float64, returned in x's dtype."""
    _, s = _flat_sigma(x, sigma)
    bshape = (-1,) + (1,) * (x.ndim - 1)
    return ((denoiser(x, sigma).to(torch.float64) - x.to(torch.float64)) / s.view(bshape) ** 2).to(x.dtype)


class GaussianDenoiser:
    """The exact denoiser, score and PF-ODE flow of N(mean, cov) data (mean [D], cov [D, D]).

    Stored as mean [D], eigenvectors U [D, r] and eigenvalues lambda [r]. With r < D (``low_rank``, or
    ``from_data(..., rank=r)``) the data have zero variance orthogonal to U: that component x_perp of
    x - mu is shrunk to 0 by the denoiser and scaled by sigma / sigma_T by the flow, exactly.
    """

    def __init__(self, mean: Tensor, cov: Tensor) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        cov = torch.as_tensor(cov, dtype=torch.float64)
        if cov.shape != (mean.numel(), mean.numel()):
            raise ValueError(f"cov must be [D, D] with D={mean.numel()}, got {tuple(cov.shape)}")
        self.mean = mean  # [D]
        self.eigvals, self.eigvecs = _eigh_psd(cov)  # [D], [D, D] (columns are u_k)

    @classmethod
    def low_rank(cls, mean: Tensor, eigvecs: Tensor, eigvals: Tensor) -> GaussianDenoiser:
        """From the top-r principal directions: eigvecs [D, r] (orthonormal columns), eigvals [r] >= 0."""
        self = cls.__new__(cls)
        self.mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        self.eigvecs = torch.as_tensor(eigvecs, dtype=torch.float64)
        self.eigvals = torch.as_tensor(eigvals, dtype=torch.float64).clamp_min(0)
        D, r = self.eigvecs.shape
        if D != self.mean.numel() or self.eigvals.shape != (r,):
            raise ValueError(f"eigvecs must be [D, r] with D={self.mean.numel()} and eigvals [r]")
        return self

    @classmethod
    def from_data(cls, x: Tensor, rank: int | None = None) -> GaussianDenoiser:
        """Fit the mean and (biased) covariance of flattened data x [N, ...]; keep the top ``rank`` components."""
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        if xf.shape[0] < 2:
            raise ValueError("from_data needs at least 2 samples")
        mean = xf.mean(0)
        centered = xf - mean
        return cls.from_moments(mean, centered.T @ centered / xf.shape[0], rank)

    @classmethod
    def from_moments(cls, mean: Tensor, cov: Tensor, rank: int | None = None) -> GaussianDenoiser:
        full = cls(mean, cov)
        if rank is None or rank >= full.dim:
            return full
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        top = full.eigvals.argsort(descending=True)[:rank]
        return cls.low_rank(full.mean, full.eigvecs[:, top], full.eigvals[top])

    def save(self, path: str | Path) -> None:
        """Write mean/eigvecs/eigvals (float64) so a large data set is read once."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"mean": self.mean.cpu(), "eigvecs": self.eigvecs.cpu(), "eigvals": self.eigvals.cpu()}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> GaussianDenoiser:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls.low_rank(state["mean"], state["eigvecs"], state["eigvals"])

    @property
    def dim(self) -> int:
        return self.mean.numel()

    @property
    def rank(self) -> int:
        return self.eigvals.numel()

    def to(self, device: torch.device | str) -> GaussianDenoiser:
        self.mean, self.eigvals, self.eigvecs = (t.to(device) for t in (self.mean, self.eigvals, self.eigvecs))
        return self

    def __call__(
        self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None, aug_label: Tensor | None = None
    ) -> Tensor:
        xf, s = _flat_sigma(x, sigma)
        coeff = (xf - self.mean) @ self.eigvecs  # [B, r]: c_k = u_k^T (x - mu)
        shrink = self.eigvals / (self.eigvals + s[:, None] ** 2)  # [B, r]; the orthogonal part goes to 0
        denoised = self.mean + (shrink * coeff) @ self.eigvecs.T  # [B, D]
        return denoised.reshape(x.shape).to(x.dtype)

    def score(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """grad_x log p_sigma(x) = (D(x; sigma) - x) / sigma^2."""
        return score_from_denoiser(self, x, sigma)

    def pf_ode(self, x_T: Tensor, sigma_T: Tensor | float, sigma: Tensor | float) -> Tensor:
        """Closed-form PF-ODE solution x(sigma) from x(sigma_T) = x_T (Wang & Vastola 2024, Eq. 8)."""
        xf, s_T = _flat_sigma(x_T, sigma_T)
        _, s = _flat_sigma(x_T, sigma)
        centered = xf - self.mean
        coeff = centered @ self.eigvecs  # [B, r]
        perp = centered - coeff @ self.eigvecs.T  # [B, D]: the part orthogonal to U (0 at full rank)
        ratio = ((s[:, None] ** 2 + self.eigvals) / (s_T[:, None] ** 2 + self.eigvals)).sqrt()  # [B, r]
        x = self.mean + (ratio * coeff) @ self.eigvecs.T + (s / s_T)[:, None] * perp
        return x.reshape(x_T.shape).to(x_T.dtype)

    def sample(self, n: int, sigma: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """n draws of x0 + sigma n, shape [n, D]."""
        z = torch.randn(n, self.rank, dtype=torch.float64, generator=generator)
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

    @classmethod
    def from_data(cls, x: Tensor, num_components: int, seed: int = 0, eps: float = 1e-5) -> GMMDenoiser:
        """Components from k-means (scikit-learn) on flattened data: cluster shares, means and covariances
        (+ eps I, as Wang & Vastola fit their GMM references)."""
        from sklearn.cluster import KMeans

        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        if not 1 <= num_components <= len(xf):
            raise ValueError(f"num_components must be in 1..{len(xf)}, got {num_components}")
        labels = torch.as_tensor(KMeans(num_components, n_init=4, random_state=seed).fit_predict(xf.numpy()))
        weights, means, covs = [], [], []
        eye = torch.eye(xf.shape[1], dtype=torch.float64)
        for k in range(num_components):
            pts = xf[labels == k]
            centered = pts - pts.mean(0)
            weights.append(len(pts))
            means.append(pts.mean(0))
            covs.append(centered.T @ centered / max(len(pts), 1) + eps * eye)
        return cls(torch.tensor(weights, dtype=torch.float64), torch.stack(means), torch.stack(covs))

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
        return score_from_denoiser(self, x, sigma)

    def sample(self, n: int, sigma: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """n draws of x0 + sigma n from the mixture, shape [n, D] (float64, CPU unless moved)."""
        device = self.means.device
        k = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator).to(device)  # [n]
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator).to(device)
        x0 = self.means[k] + torch.einsum("nj,ndj->nd", z * self.eigvals[k].sqrt(), self.eigvecs[k])
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator).to(device)
        return x0 + sigma * noise


class DeltaMixtureDenoiser:
    """The exact denoiser of the empirical distribution of ``points`` [N, ...] (the training set itself):

    D(x; sigma) = sum_i softmax_i(-||x - x_i||^2 / (2 sigma^2)) x_i,

    accumulated over chunks of points with a running log-sum-exp, so 50k images never form an [B, N, D] tensor.
    A network that reproduced it exactly would only ever emit training images.
    """

    def __init__(self, points: Tensor, chunk: int = 4096) -> None:
        self.points = torch.as_tensor(points).reshape(len(points), -1).to(torch.float64)  # [N, D]
        if len(self.points) < 1:
            raise ValueError("need at least one point")
        self.sq_norms = (self.points**2).sum(1)  # [N]
        self.chunk = chunk

    def to(self, device: torch.device | str) -> DeltaMixtureDenoiser:
        self.points, self.sq_norms = self.points.to(device), self.sq_norms.to(device)
        return self

    def __call__(
        self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None, aug_label: Tensor | None = None
    ) -> Tensor:
        xf, s = _flat_sigma(x, sigma)
        inv2s2 = 1 / (2 * s[:, None] ** 2)  # [B, 1]
        x_sq = (xf**2).sum(1, keepdim=True)  # [B, 1]
        run_max = torch.full((len(xf), 1), -float("inf"), dtype=torch.float64, device=xf.device)
        run_sum = torch.zeros((len(xf), 1), dtype=torch.float64, device=xf.device)
        run_num = torch.zeros_like(xf)
        for start in range(0, len(self.points), self.chunk):
            pts, nrm = self.points[start : start + self.chunk], self.sq_norms[start : start + self.chunk]
            logits = -(x_sq - 2 * xf @ pts.T + nrm) * inv2s2  # [B, chunk]
            new_max = torch.maximum(run_max, logits.max(1, keepdim=True).values)
            scale = (run_max - new_max).exp()
            w = (logits - new_max).exp()  # [B, chunk]
            run_sum = run_sum * scale + w.sum(1, keepdim=True)
            run_num = run_num * scale + w @ pts
            run_max = new_max
        return (run_num / run_sum).reshape(x.shape).to(x.dtype)

    def score(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        return score_from_denoiser(self, x, sigma)


def teleport(gaussian: GaussianDenoiser, x_T: Tensor, sigmas: Tensor, skip: int) -> tuple[Tensor, Tensor]:
    """Analytical teleportation (Wang & Vastola 2024, Sec. 5): replace the first ``skip`` sampler steps by the
    Gaussian model's closed-form PF-ODE flow from sigmas[0] to sigmas[skip].

    Returns (x at sigmas[skip], sigmas[skip:]); skip = 0 returns (x_T, sigmas) unchanged.
    """
    if not 0 <= skip < len(sigmas) - 1:
        raise ValueError(f"skip must be in 0..{len(sigmas) - 2} for {len(sigmas) - 1} steps, got {skip}")
    if skip == 0:
        return x_T, sigmas
    x = gaussian.pf_ode(x_T, float(sigmas[0]), float(sigmas[skip]))
    return x.to(x_T.dtype), sigmas[skip:]


def skip_for_sigma(sigmas: Tensor, sigma: float) -> int:
    """The number of leading steps whose start lies above ``sigma`` (teleport to the first grid point <= sigma)."""
    grid = torch.as_tensor(sigmas)
    above = int((grid[:-1] > sigma).sum())
    return min(above, len(grid) - 2)


def score_explained_variance(denoised_net: Tensor, denoised_ref: Tensor, x: Tensor) -> Tensor:
    """EV = 1 - ||s_net - s_ref||^2 / ||s_net||^2 per sample [B] (Wang & Vastola 2024, Sec. 4).

    With s = (D(x) - x) / sigma^2 the sigma^2 cancels, so it is computed from denoiser outputs.
    """
    dn, dr, xf = (t.reshape(len(t), -1).to(torch.float64) for t in (denoised_net, denoised_ref, x))
    return 1 - ((dn - dr) ** 2).sum(1) / ((dn - xf) ** 2).sum(1).clamp_min(1e-30)
