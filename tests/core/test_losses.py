import pytest
import torch

from diffscore.core.losses import edm_loss, edm_loss_weight
from diffscore.core.schedules import LogNormalSigma
from diffscore.data.gmm import random_gmm


def test_edm_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, 3, 3, generator=g)
    noise = torch.randn(5, 2, 3, 3, generator=g)
    sigma = torch.tensor([0.01, 0.1, 1.0, 3.0, 50.0])

    def half(x, s, cond=None, aug_label=None):
        return 0.5 * x

    loss = edm_loss(half, x0, sigma, noise)
    for i in range(5):
        x = x0[i] + sigma[i] * noise[i]
        w = (sigma[i] ** 2 + 0.25) / (sigma[i] * 0.5) ** 2
        assert loss[i].item() == pytest.approx((w * ((0.5 * x - x0[i]) ** 2).mean()).item(), rel=1e-5)


def test_weight_formula():
    s = torch.tensor([0.5])
    assert edm_loss_weight(s, 0.5).item() == pytest.approx((0.25 + 0.25) / 0.0625)


def test_edm_loss_rejects_bad_sigma_shape():
    with pytest.raises(ValueError, match="sigma"):
        edm_loss(lambda x, s, c=None, a=None: x, torch.zeros(4, 2), torch.ones(3), torch.zeros(4, 2))


def test_exact_gmm_denoiser_beats_every_perturbation():
    """The posterior mean minimises the expected squared error: any perturbation raises edm_loss."""
    gmm = random_gmm(dim=3, num_components=4, seed=1)
    g = torch.Generator().manual_seed(2)
    n = 40_000
    x0 = gmm.sample(n, generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sigma = LogNormalSigma()(n, generator=g).double()
    exact = edm_loss(gmm, x0, sigma, noise).mean()
    direction = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) / 2.3
    perturbed = {
        "shift": lambda x, s, c=None, a=None: gmm(x, s) + 0.05 * direction,
        "shrink": lambda x, s, c=None, a=None: 0.97 * gmm(x, s),
        "blend-with-input": lambda x, s, c=None, a=None: 0.97 * gmm(x, s) + 0.03 * x,
        "wrong-sigma": lambda x, s, c=None, a=None: gmm(x, s * 1.2),
        "other-mixture": lambda x, s, c=None, a=None: random_gmm(3, 4, seed=7)(x, s),
    }
    for name, fn in perturbed.items():
        worse = edm_loss(fn, x0, sigma, noise).mean()
        assert worse > exact, f"{name}: {worse.item():.5f} <= exact {exact.item():.5f}"
