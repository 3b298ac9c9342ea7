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


def test_pf_ode_matches_a_1000_step_heun_integration():
    from diffscore.core.samplers import heun
    from diffscore.core.schedules import karras_sigmas

    gauss = GaussianDenoiser(torch.zeros(4, dtype=torch.float64) + 0.2, random_cov(4, 11))
    x_T = 80 * torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # the grid ends at 0.5 and then 0: Heun's last step is the Euler step x -> D(x; 0.5)
    ref = gauss(gauss.pf_ode(x_T, 80.0, 0.5), 0.5)
    out = heun(gauss, x_T, karras_sigmas(1000, sigma_min=0.5))
    assert ((out - ref).norm() / ref.norm()).item() < 1e-3


def test_low_rank_gaussian_flow_and_denoiser_are_exact():
    D, r = 6, 2
    q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    gauss = GaussianDenoiser.low_rank(torch.ones(D, dtype=torch.float64), q[:, :r], torch.tensor([2.0, 0.5]))
    full = GaussianDenoiser(
        torch.ones(D, dtype=torch.float64),
        q[:, :r] @ torch.diag(torch.tensor([2.0, 0.5], dtype=torch.float64)) @ q[:, :r].T,
    )
    x = 3 * torch.randn(5, D, dtype=torch.float64)
    for s in (0.05, 1.0, 20.0):
        torch.testing.assert_close(gauss(x, s), full(x, s))
        torch.testing.assert_close(gauss.pf_ode(x, 20.0, s), full.pf_ode(x, 20.0, s))
    h = 1e-6
    xs = gauss.pf_ode(x, 20.0, 1.0)
    dx = (gauss.pf_ode(x, 20.0, 1.0 + h) - gauss.pf_ode(x, 20.0, 1.0 - h)) / (2 * h)
    torch.testing.assert_close(dx, (xs - gauss(xs, 1.0)) / 1.0, rtol=1e-5, atol=1e-5)


def test_from_data_rank_keeps_the_top_components_and_save_load_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 5, generator=g, dtype=torch.float64) * torch.tensor(
        [3.0, 2.0, 1.0, 0.1, 0.05], dtype=torch.float64
    )
    top2 = GaussianDenoiser.from_data(x, rank=2)
    assert top2.rank == 2 and sorted(top2.eigvals.tolist()) == pytest.approx([4.0, 9.0], rel=0.1)
    top2.save(tmp_path / "g.pt")
    back = GaussianDenoiser.load(tmp_path / "g.pt")
    torch.testing.assert_close(back(x[:3], 0.3), top2(x[:3], 0.3))


def test_kmeans_gmm_recovers_separated_components():
    truth = GMMDenoiser(
        torch.tensor([0.5, 0.5]), torch.tensor([[-3.0, 0.0], [3.0, 0.0]]), 0.1 * torch.eye(2).expand(2, 2, 2)
    )
    fit = GMMDenoiser.from_data(truth.sample(4000, generator=torch.Generator().manual_seed(0)), 2)
    means = fit.means[fit.means[:, 0].argsort()]
    torch.testing.assert_close(means, truth.means.double(), atol=0.05, rtol=0)
    assert fit.weights.tolist() == pytest.approx([0.5, 0.5], abs=0.05)


def test_delta_mixture_is_the_softmax_average_and_snaps_to_the_nearest_point():
    from diffscore.core.gaussian import DeltaMixtureDenoiser

    g = torch.Generator().manual_seed(0)
    pts = torch.randn(300, 4, generator=g, dtype=torch.float64)
    delta = DeltaMixtureDenoiser(pts, chunk=64)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    for s in (0.3, 1.0, 5.0):  # brute force, in one piece
        w = torch.softmax(-(torch.cdist(x, pts) ** 2) / (2 * s**2), dim=1)
        torch.testing.assert_close(delta(x, s), w @ pts)
    nearest = pts[torch.cdist(x, pts).argmin(1)]
    torch.testing.assert_close(delta(x, 1e-3), nearest)


def test_teleport_skip_zero_is_identity_and_skip_k_is_the_closed_form():
    from diffscore.core.gaussian import skip_for_sigma, teleport
    from diffscore.core.schedules import karras_sigmas

    gauss = GaussianDenoiser(torch.zeros(3, dtype=torch.float64), random_cov(3, 2))
    sigmas = karras_sigmas(18)
    x_T = 80 * torch.randn(4, 3, dtype=torch.float64)
    x0, s0 = teleport(gauss, x_T, sigmas, 0)
    assert x0 is x_T and s0 is sigmas
    x6, s6 = teleport(gauss, x_T, sigmas, 6)
    assert torch.equal(s6, sigmas[6:]) and s6[0].item() == pytest.approx(8.40, abs=0.01)
    torch.testing.assert_close(x6, gauss.pf_ode(x_T, 80.0, float(sigmas[6])))
    assert skip_for_sigma(sigmas, 8.5) == 6 and skip_for_sigma(sigmas, 100.0) == 0
    with pytest.raises(ValueError, match="skip"):
        teleport(gauss, x_T, sigmas, 18)
