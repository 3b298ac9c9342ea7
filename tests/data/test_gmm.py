import torch

from diffscore.data.gmm import random_gmm


def test_random_gmm_is_seeded_and_samples_match_its_moments():
    a, b, c = random_gmm(4, 3, seed=5), random_gmm(4, 3, seed=5), random_gmm(4, 3, seed=6)
    assert torch.equal(a.means, b.means) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.means, c.means)
    x = a.sample(200_000, generator=torch.Generator().manual_seed(0))
    mean = (a.weights[:, None] * a.means).sum(0)
    covs = a.eigvecs @ torch.diag_embed(a.eigvals) @ a.eigvecs.transpose(-1, -2)
    second = (a.weights[:, None, None] * (covs + a.means[:, :, None] * a.means[:, None, :])).sum(0)
    cov = second - mean[:, None] * mean[None, :]
    assert (x.mean(0) - mean).abs().max().item() < 0.01
    assert (torch.cov(x.T) - cov).abs().max().item() < 0.01
    assert torch.isclose(a.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
