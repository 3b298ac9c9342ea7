"""Score distillation on Gaussian data, where every score is known in closed form.

A linear generator x = A z + b (z ~ N(0, I)) has the exact output law N(b, A A^T); the teacher is the exact
denoiser of N(mu, Sigma). The VSD gradient is then checked per sample against the analytic score difference
(computed with linear solves, independently of GaussianDenoiser's eigen-form), and in expectation against
autograd of the closed-form KL between the two noised Gaussians.
"""

import pytest
import torch
from torch import nn

from diffscore.core.distill import one_step_generate, vsd_gradient, vsd_surrogate_loss
from diffscore.core.gaussian import GaussianDenoiser

D = 3
SIGMA_INIT = 2.0


class LinearGenerator(nn.Module):
    """A 'denoiser' whose one-step map is x = A z + b: D_G(y; sigma) = A y / sigma + b."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(A.clone())
        self.b = nn.Parameter(b.clone())

    def forward(self, y, sigma, cond=None):
        return (y / sigma.view(-1, 1)) @ self.A.T + self.b


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(D, D, generator=g, dtype=torch.float64)
    Sigma = M @ M.T / D + 0.1 * torch.eye(D, dtype=torch.float64)
    mu = torch.randn(D, generator=g, dtype=torch.float64)
    A = torch.randn(D, D, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(D, generator=g, dtype=torch.float64)
    return mu, Sigma, A, b


def _analytic_score(mean, cov, x, sigma):
    """(cov + sigma^2 I)^{-1} (mean - x) per sample, by a linear solve. x: [B, D], sigma: [B]."""
    eye = torch.eye(D, dtype=torch.float64)
    covs = cov + sigma.view(-1, 1, 1) ** 2 * eye  # [B, D, D]
    return torch.linalg.solve(covs, (mean - x).unsqueeze(-1)).squeeze(-1)


def test_one_step_generate_is_the_denoiser_at_sigma_init():
    mu, Sigma, A, b = _problem()
    gen = LinearGenerator(A, b)
    z = torch.randn(7, D, dtype=torch.float64)
    torch.testing.assert_close(one_step_generate(gen, z, SIGMA_INIT), z @ A.T + b)
    teacher = GaussianDenoiser(mu, Sigma)
    sigma = torch.full((7,), SIGMA_INIT, dtype=torch.float64)
    torch.testing.assert_close(one_step_generate(teacher, z, SIGMA_INIT), teacher(SIGMA_INIT * z, sigma))


def test_vsd_gradient_is_the_analytic_score_difference_per_sample():
    mu, Sigma, A, b = _problem()
    gen = LinearGenerator(A, b)
    teacher, fake = GaussianDenoiser(mu, Sigma), GaussianDenoiser(b, A @ A.T)
    g = torch.Generator().manual_seed(1)
    n = 64
    z = torch.randn(n, D, generator=g, dtype=torch.float64)
    noise = torch.randn(n, D, generator=g, dtype=torch.float64)
    sigma = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 1.2 - 0.5)

    x = one_step_generate(gen, z, SIGMA_INIT)
    grad = vsd_gradient(fake, teacher, x, sigma, noise, weighting="kl")
    x_sigma = x.detach() + sigma.view(-1, 1) * noise
    expected = _analytic_score(b, A @ A.T, x_sigma, sigma) - _analytic_score(mu, Sigma, x_sigma, sigma)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-9)

    # the surrogate loss carries exactly this gradient into the generator's weights: dL/db, dL/dA
    vsd_surrogate_loss(x, grad).mean().backward()
    torch.testing.assert_close(gen.b.grad, expected.mean(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gen.A.grad, expected.T @ z / n, rtol=1e-9, atol=1e-12)


def test_surrogate_gradient_wrt_x_is_grad():
    x = torch.randn(4, 2, 3, 3, requires_grad=True)
    grad = torch.randn(4, 2, 3, 3)
    vsd_surrogate_loss(x, grad).sum().backward()
    torch.testing.assert_close(x.grad, grad)


def _kl(m1, S1, m2, S2):
    """KL(N(m1, S1) || N(m2, S2)) in closed form."""
    S2inv = torch.linalg.inv(S2)
    diff = m2 - m1
    return 0.5 * (torch.trace(S2inv @ S1) - D + diff @ S2inv @ diff + torch.logdet(S2) - torch.logdet(S1))


def test_expected_vsd_gradient_is_the_gradient_of_the_noised_kl():
    """E_z,n[surrogate gradient] = d/d(A, b) KL(N(b, AA^T + s^2 I) || N(mu, Sigma + s^2 I)) at one sigma."""
    mu, Sigma, A, b = _problem(3)
    s = 0.8
    eye = torch.eye(D, dtype=torch.float64)
    A_ = A.clone().requires_grad_(True)
    b_ = b.clone().requires_grad_(True)
    _kl(b_, A_ @ A_.T + s**2 * eye, mu, Sigma + s**2 * eye).backward()

    gen = LinearGenerator(A, b)
    teacher, fake = GaussianDenoiser(mu, Sigma), GaussianDenoiser(b, A @ A.T)
    g = torch.Generator().manual_seed(4)
    n = 200_000
    z = torch.randn(n, D, generator=g, dtype=torch.float64)
    noise = torch.randn(n, D, generator=g, dtype=torch.float64)
    sigma = torch.full((n,), s, dtype=torch.float64)
    x = one_step_generate(gen, z, SIGMA_INIT)
    grad = vsd_gradient(fake, teacher, x, sigma, noise, weighting="kl")
    vsd_surrogate_loss(x, grad).mean().backward()
    # Monte-Carlo tolerance: 5 standard errors of the per-sample gradients
    se_b = grad.std(0) / n**0.5
    per_sample_A = grad.unsqueeze(2) * z.unsqueeze(1)  # [n, D, D]
    se_A = per_sample_A.std(0) / n**0.5
    assert ((gen.b.grad - b_.grad).abs() < 5 * se_b).all(), (gen.b.grad, b_.grad)
    assert ((gen.A.grad - A_.grad).abs() < 5 * se_A).all(), (gen.A.grad, A_.grad)
    assert b_.grad.abs().max() > 20 * se_b.max()  # the check has power: the gradient is far from zero


def test_gradient_vanishes_when_the_generator_matches_the_target():
    mu, Sigma, _, _ = _problem(5)
    L = torch.linalg.cholesky(Sigma)
    gen = LinearGenerator(L, mu)  # x = L z + mu ~ N(mu, Sigma) exactly
    teacher, fake = GaussianDenoiser(mu, Sigma), GaussianDenoiser(mu, L @ L.T)
    z, noise = torch.randn(16, D, dtype=torch.float64), torch.randn(16, D, dtype=torch.float64)
    sigma = torch.rand(16, dtype=torch.float64) + 0.1
    for weighting in ("kl", "dmd"):
        grad = vsd_gradient(fake, teacher, one_step_generate(gen, z, SIGMA_INIT), sigma, noise, weighting=weighting)
        assert grad.abs().max() < 1e-9


def test_dmd_weighting_normalises_per_sample():
    mu, Sigma, A, b = _problem(6)
    teacher, fake = GaussianDenoiser(mu, Sigma), GaussianDenoiser(b, A @ A.T)
    x, noise = torch.randn(8, D, dtype=torch.float64), torch.randn(8, D, dtype=torch.float64)
    sigma = torch.rand(8, dtype=torch.float64) + 0.1
    grad = vsd_gradient(fake, teacher, x, sigma, noise, weighting="dmd")
    x_sigma = x + sigma.view(-1, 1) * noise
    d_t, d_f = teacher(x_sigma, sigma), fake(x_sigma, sigma)
    expected = (d_f - d_t) / (x - d_t).abs().mean(1, keepdim=True)
    torch.testing.assert_close(grad, expected)


def test_bad_inputs():
    f = GaussianDenoiser(torch.zeros(D), torch.eye(D))
    x = torch.zeros(4, D)
    with pytest.raises(ValueError, match="weighting"):
        vsd_gradient(f, f, x, torch.ones(4), x, weighting="sds")
    with pytest.raises(ValueError, match="sigma"):
        vsd_gradient(f, f, x, torch.ones(3), x)
    with pytest.raises(ValueError, match="shape"):
        vsd_surrogate_loss(x, torch.zeros(4, D + 1))
