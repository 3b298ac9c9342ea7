"""DiffusionSampler against the closed-form probability-flow ODE of a Gaussian (Wang & Vastola 2024, Eq. 8): the
exact Gaussian denoiser in place of a network, the sampler must land where the ODE's solution does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffscore.core.gaussian import GaussianDenoiser
from diffscore.core.precond import Preconditioning
from diffscore.errors import DiffscoreError
from diffscore.sampling.diffusion import DiffusionSampler
from diffscore.sampling.options import SamplerDefaults, SamplingOptions, TeleportOptions
from diffscore.sampling.seeds import seed_generators, seeded_noise

DIM = 6


class Facts(nn.Module):
    """The backbone facts a sampler reads (vector data, unconditional)."""

    data_shape, label_dim, augment_dim, text_encoder = (DIM,), 0, 0, None

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the sampler a device


class ExactDenoiser(Preconditioning):
    """The exact denoiser of N(mean, cov) as a preconditioned network (its backbone is never called)."""

    def __init__(self, gaussian: GaussianDenoiser) -> None:
        super().__init__(Facts(), 0.0, float("inf"))
        self.gaussian = gaussian

    def forward(self, x, sigma, cond=None, aug_label=None):
        return self.gaussian(x.double(), sigma.double()).to(x.dtype)


def gaussian() -> GaussianDenoiser:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
    return GaussianDenoiser(torch.linspace(-0.5, 0.5, DIM, dtype=torch.float64), 0.3 * A @ A.T / DIM)


def exact_samples(gauss: GaussianDenoiser, seeds, sigma_max: float, sigma_min: float = 0.002) -> torch.Tensor:
    """What an exact solver of the sampler's grid gives: the PF-ODE from x(sigma_max) = sigma_max * (seed's noise)
    down to sigma_min in closed form, then the grid's last step to 0, x0 = D(x; sigma_min)."""
    start = seeded_noise(seed_generators(seeds, "cpu"), (DIM,), "cpu").double() * sigma_max
    x_min = gauss.pf_ode(start, sigma_max, sigma_min)
    return gauss(x_min, torch.full((len(seeds),), sigma_min, dtype=torch.float64))


def _error(gauss, sampler: str, steps: int, seeds) -> float:
    run = DiffusionSampler(ExactDenoiser(gauss), SamplerDefaults(steps=steps), SamplingOptions(sampler=sampler))
    return float((run.generate(seeds).double() - exact_samples(gauss, seeds, 80.0)).abs().max())


@pytest.mark.parametrize("sampler, order", [("heun", 2), ("euler", 1)])
def test_the_samplers_converge_to_the_closed_form_pf_ode_solution_at_their_order(sampler, order):
    """Doubling the steps divides the error by 2^order (Heun 4x, Euler 2x): the grid, the noise scaling and the
    solver are right, or the error would stall at the mistake."""
    gauss, seeds = gaussian(), [3, 11, 12, 40]
    errors = [_error(gauss, sampler, n, seeds) for n in (64, 128)]
    assert 0.7 * 2**order < errors[0] / errors[1] < 1.3 * 2**order, errors
    assert errors[1] < (1e-3 if order == 2 else 3e-2), errors


def test_sample_s_depends_on_seed_s_only():
    sampler = DiffusionSampler(ExactDenoiser(gaussian()), SamplerDefaults(steps=8))
    together = sampler.generate([3, 11, 12])
    torch.testing.assert_close(sampler.generate([11])[0], together[1], atol=0, rtol=0)


def test_teleportation_with_the_exact_gaussian_skips_steps_without_changing_the_result():
    """With the data's own Gaussian, the closed-form flow to sigma_k is exact: skipping k steps costs nothing, and
    --teleport.sigma picks the first grid level at or below the one asked for."""
    gauss = gaussian()
    defaults = SamplerDefaults(steps=64)
    full = DiffusionSampler(ExactDenoiser(gauss), defaults).generate([0, 1])
    skipped = DiffusionSampler(
        ExactDenoiser(gauss), defaults, SamplingOptions(teleport=TeleportOptions(skip=20)), gaussian=gauss
    )
    assert skipped.nfe == 2 * (64 - 20) - 1 and skipped.full_nfe == 127
    torch.testing.assert_close(skipped.generate([0, 1]), full, atol=5e-4, rtol=0)
    by_sigma = DiffusionSampler(
        ExactDenoiser(gauss), defaults, SamplingOptions(teleport=TeleportOptions(sigma=8.5)), gaussian=gauss
    )
    level = float(by_sigma.sigmas[by_sigma.teleport_skip])
    assert level <= 8.5 < float(by_sigma.sigmas[by_sigma.teleport_skip - 1])


def test_choices_the_model_cannot_take_are_one_line():
    denoiser, defaults = ExactDenoiser(gaussian()), SamplerDefaults()
    with pytest.raises(DiffscoreError, match="--guidance without --guide needs a conditional model"):
        DiffusionSampler(denoiser, defaults, SamplingOptions(guidance=2.0))
    with pytest.raises(DiffscoreError, match="--class_label 0 is out of range for a model with 0 classes"):
        DiffusionSampler(denoiser, defaults, SamplingOptions(class_label=0))
    with pytest.raises(DiffscoreError, match="--prompt/--prompts need a text-conditioned model"):
        DiffusionSampler(denoiser, defaults, SamplingOptions(prompt="a cat"))
    with pytest.raises(DiffscoreError, match="not options of the euler sampler"):
        DiffusionSampler(denoiser, defaults, SamplingOptions(sampler="euler", sampler_kwargs={"s_churn": 1}))
    with pytest.raises(DiffscoreError, match="--teleport.skip must be in 0..17"):
        DiffusionSampler(denoiser, defaults, SamplingOptions(teleport=TeleportOptions(skip=18)), gaussian=gaussian())
    with pytest.raises(DiffscoreError, match="needs the Gaussian of the training data"):
        DiffusionSampler(denoiser, defaults, SamplingOptions(teleport=TeleportOptions(skip=2)))
    # the model's own sampler options belong to its own sampler: a chosen other sampler does not inherit them
    churned = SamplerDefaults(sampler_kwargs={"s_churn": 10})
    assert DiffusionSampler(denoiser, churned, SamplingOptions(sampler="euler")).sampler_kwargs == {}
    assert DiffusionSampler(denoiser, churned).sampler_kwargs == {"s_churn": 10}
