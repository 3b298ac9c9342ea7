"""Guidance by a second network (autoguidance, Karras et al. 2024): D = D_guide + w (D_main - D_guide), optionally
only for sigma in a guidance interval (lo, hi] (Kynkaanniemi et al. 2024). Main and guide are the exact denoisers of
two different Gaussians; the expected samples are a hand-written Euler loop over the Gaussian denoiser's closed form
m + S (S + sigma^2 I)^-1 (x - m), computed with numpy in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from diffscore.core.gaussian import GaussianDenoiser
from diffscore.core.precond import Preconditioning
from diffscore.errors import DiffscoreError
from diffscore.sampling.diffusion import DiffusionSampler
from diffscore.sampling.options import SamplerDefaults, SamplingOptions
from diffscore.sampling.seeds import seed_generators, seeded_noise

DIM = 5


class Facts(nn.Module):
    def __init__(self, dim: int = DIM, label_dim: int = 0) -> None:
        super().__init__()
        self.data_shape, self.label_dim, self.augment_dim, self.text_encoder = (dim,), label_dim, 0, None
        self.anchor = nn.Parameter(torch.zeros(()))


class Exact(Preconditioning):
    """The exact denoiser of N(mean, cov) (class labels, if any, ignored)."""

    def __init__(self, mean, cov, label_dim: int = 0) -> None:
        super().__init__(Facts(mean.numel(), label_dim), 0.0, float("inf"))
        self.gaussian = GaussianDenoiser(mean, cov)

    def forward(self, x, sigma, cond=None, aug_label=None):
        return self.gaussian(x.double(), sigma.double()).to(x.dtype)


def gaussian_pair(seed: int = 0, dim: int = DIM):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        A = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        out.append((torch.randn(dim, generator=g, dtype=torch.float64), A @ A.T / dim + 0.1 * torch.eye(dim)))
    return out


def numpy_denoiser(mean, cov, x, sigma):
    m, S = mean.numpy(), cov.numpy()
    return m + (S @ np.linalg.solve(S + sigma**2 * np.eye(len(m)), (x - m).T)).T


def hand_euler(main, guide, seeds, sigmas, w, interval=None):
    x = seeded_noise(seed_generators(seeds, "cpu"), (DIM,), "cpu").double().numpy() * float(sigmas[0])
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = numpy_denoiser(*main, x, s)
        if interval is None or interval[0] < s <= interval[1]:
            g = numpy_denoiser(*guide, x, s)
            d = g + w * (d - g)
        x = x + (s_next - s) * (x - d) / s
    return torch.from_numpy(x)


def sampler(main, guide_net, **options):
    opts = SamplingOptions(sampler="euler", steps=4, **options)
    return DiffusionSampler(Exact(*main), SamplerDefaults(), opts, guide=guide_net)


@pytest.mark.parametrize("w", [1.0, 0.0, 1.7, 3.0])
def test_euler_with_a_guide_network_is_the_hand_written_lerp(w):
    main, guide = gaussian_pair()
    run = sampler(main, Exact(*guide), guidance=w, guide="guide.pkl")
    seeds = [0, 1, 2, 9]
    got = run.generate(seeds).double()
    expected = hand_euler(main, guide, seeds, run.sigmas.double(), w)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    if w == 0.0:  # the guide alone
        guide_only = sampler(guide, None).generate(seeds).double()
        torch.testing.assert_close(got, guide_only, atol=1e-4, rtol=1e-4)


def test_guidance_only_inside_the_interval():
    main, guide = gaussian_pair(1)
    seeds = [3, 4]
    levels = sampler(main, None).sigmas.double()  # 80, ~9.7, ~0.67, 0.002, 0
    interval = (0.5, 10.0)
    run = sampler(main, Exact(*guide), guidance=2.0, guide="g.pkl", guidance_interval=interval)
    expected = hand_euler(main, guide, seeds, levels, 2.0, interval)
    everywhere = hand_euler(main, guide, seeds, levels, 2.0)
    plain = hand_euler(main, guide, seeds, levels, 1.0)
    got = run.generate(seeds).double()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (expected - everywhere).abs().max() > 1e-2 and (expected - plain).abs().max() > 1e-2


def test_a_guide_of_other_data_is_refused_in_one_line():
    main, _ = gaussian_pair()
    (other_mean, other_cov), _ = gaussian_pair(dim=DIM + 1)
    with pytest.raises(DiffscoreError, match=r"--guide g.pkl makes \[6\] samples, the model \[5\]"):
        sampler(main, Exact(other_mean, other_cov), guidance=2.0, guide="g.pkl")
    m, c = main
    options = SamplingOptions(guidance=2.0, guide="g.pkl")
    with pytest.raises(DiffscoreError, match="5 classes, the model 10"):
        DiffusionSampler(Exact(m, c, 10), SamplerDefaults(), options, guide=Exact(m, c, 5))
    DiffusionSampler(Exact(m, c, 10), SamplerDefaults(), options, guide=Exact(m, c, 0))  # unconditional: fine
    for bad in ([1.0], [2.0, 1.0], "x", [float("nan"), 1.0]):
        with pytest.raises(DiffscoreError, match="--guidance_interval"):
            SamplingOptions(guidance=2.0, guidance_interval=bad)
