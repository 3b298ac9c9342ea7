import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from diffscore.core.gaussian import GaussianDenoiser, GMMDenoiser
from diffscore.data.gmm import random_gmm


def random_cov(dim, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(dim, rank or dim, generator=g, dtype=torch.float64)
    return 0.2 * A @ A.T + (0 if rank else 0.01) * torch.eye(dim, dtype=torch.float64)


def autograd_score(log_prob, x):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_prob(x).sum(), x)
    return grad


@pytest.mark.parametrize("sigma", [0.01, 0.3, 2.0, 30.0])
def test_gaussian_score_matches_autograd_of_the_noised_density(sigma):
    dim = 5
    mean = torch.linspace(-1, 1, dim, dtype=torch.float64)
    cov = random_cov(dim, 0)
    gauss = GaussianDenoiser(mean, cov)
    x = torch.randn(7, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * (1 + sigma)
    noised = MultivariateNormal(mean, cov + sigma**2 * torch.eye(dim, dtype=torch.float64))
    torch.testing.assert_close(gauss.score(x, sigma), autograd_score(noised.log_prob, x), rtol=1e-8, atol=1e-8)
    # Tweedie: D = x + sigma^2 score
    torch.testing.assert_close(gauss(x, sigma), x + sigma**2 * gauss.score(x, sigma))


def test_gmm_score_matches_autograd_of_the_noised_mixture():
    gmm = random_gmm(dim=3, num_components=5, seed=4)
    x = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    covs = gmm.eigvecs @ torch.diag_embed(gmm.eigvals) @ gmm.eigvecs.transpose(-1, -2)
    for sigma in (0.02, 0.2, 1.5):
        mix = MixtureSameFamily(
            Categorical(probs=gmm.weights),
            MultivariateNormal(gmm.means, covs + sigma**2 * torch.eye(3, dtype=torch.float64)),
        )
        torch.testing.assert_close(gmm.score(x, sigma), autograd_score(mix.log_prob, x), rtol=1e-7, atol=1e-7)


def test_one_component_gmm_equals_gaussian_and_low_rank_is_handled():
    cov = random_cov(4, 3, rank=2)  # rank-deficient: data on a plane
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64)
    gauss = GaussianDenoiser(mean, cov)
    gmm = GMMDenoiser(torch.ones(1), mean[None], cov[None])
    x = torch.randn(6, 4, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 50.0], dtype=torch.float64)
    torch.testing.assert_close(gauss(x, sigma), gmm(x, sigma))
    # at tiny sigma the denoised point lies on the data plane: orthogonal part removed
    d = gauss(x, 1e-6)
    null = gauss.eigvecs[:, gauss.eigvals < 1e-9]
    assert ((d - mean) @ null).abs().max().item() < 1e-8


def test_pf_ode_solves_the_ode_and_starts_at_x_T():
    gauss = GaussianDenoiser(torch.zeros(3, dtype=torch.float64), random_cov(3, 5))
    x_T = 10 * torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(gauss.pf_ode(x_T, 10.0, 10.0), x_T)
    for s in (0.1, 1.0, 5.0):
        h = 1e-5 * s
        dx = (gauss.pf_ode(x_T, 10.0, s + h) - gauss.pf_ode(x_T, 10.0, s - h)) / (2 * h)
        x = gauss.pf_ode(x_T, 10.0, s)
        torch.testing.assert_close(dx, (x - gauss(x, s)) / s, rtol=1e-6, atol=1e-6)  # dx/dsigma = -sigma score


def test_gmm_is_stable_far_away_and_at_tiny_sigma():
    gmm = random_gmm(dim=2, num_components=3, seed=0)
    x = torch.tensor([[1e3, -1e3], [0.0, 0.0]], dtype=torch.float64)
    for s in (1e-4, 1e-2, 80.0):
        out = gmm(x, s)
        assert torch.isfinite(out).all()
    r = gmm.responsibilities(x, 1e-4)
    torch.testing.assert_close(r.sum(1), torch.ones(2, dtype=torch.float64))


def test_from_data_recovers_moments_and_input_shape_is_kept():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, 1, 2, 2, generator=g) * 0.5 + 0.25
    gauss = GaussianDenoiser.from_data(x)
    assert gauss.mean.sub(0.25).abs().max().item() < 0.02
    assert gauss.eigvals.sub(0.25).abs().max().item() < 0.02
    out = gauss(x[:3].float(), torch.full((3,), 0.7))
    assert out.shape == (3, 1, 2, 2) and out.dtype == torch.float32


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="cov must be"):
        GaussianDenoiser(torch.zeros(3), torch.eye(2))
    with pytest.raises(ValueError, match="semi-definite"):
        GaussianDenoiser(torch.zeros(2), torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    with pytest.raises(ValueError, match="means"):
        GMMDenoiser(torch.ones(2), torch.zeros(3, 2), torch.eye(2).expand(2, 2, 2))
