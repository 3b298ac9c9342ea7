"""diffscore.core.discrete_ddpm: the DDPM schedules against closed forms and diffusers' own scheduler arrays, the
sigma <-> timestep map, and DiscreteDDPMPrecond against the exact denoiser of Gaussian data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffscore.core.discrete_ddpm import (
    BETA_SCHEDULES,
    DiscreteDDPMPrecond,
    UniformTimesteps,
    ddim_sigmas,
    ddpm_alphas_cumprod,
    ddpm_betas,
    ddpm_loss,
    ddpm_sigmas,
    schedule_sigmas,
    sigma_to_timestep,
    timestep_to_sigma,
)

SD = {"beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
SCHEDULES = [("linear", 0.0001, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 0.0001, 0.02)]


def test_betas_follow_their_closed_forms():
    T = 50
    i = np.arange(T, dtype=np.float64)
    linear = 0.001 + i / (T - 1) * (0.3 - 0.001)
    np.testing.assert_allclose(ddpm_betas("linear", T, 0.001, 0.3).numpy(), linear, rtol=1e-6)
    scaled = (math.sqrt(0.001) + i / (T - 1) * (math.sqrt(0.3) - math.sqrt(0.001))) ** 2
    np.testing.assert_allclose(ddpm_betas("scaled_linear", T, 0.001, 0.3).numpy(), scaled, rtol=1e-6)

    def abar(t: float) -> float:  # Nichol & Dhariwal 2021, Eq. 17 with s = 0.008
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    cosine = [min(1 - abar((k + 1) / T) / abar(k / T), 0.999) for k in range(T)]
    got = ddpm_betas("squaredcos_cap_v2", T).numpy()
    np.testing.assert_allclose(got, cosine, rtol=1e-6)
    assert got[-1] == np.float32(0.999)  # abar(1) = cos(pi/2)^2 ~ 0: the last beta is capped


def test_sigmas_are_the_ddpm_noise_levels_in_edm_terms():
    """sigma_i = sqrt((1 - alphabar_i) / alphabar_i) with alphabar the running product of 1 - beta (float64 here):
    SD's schedule spans ~0.0292 .. ~14.61 (FACTS.md)."""
    betas = ddpm_betas(**SD).double()
    alphabar = np.cumprod([1 - float(b) for b in betas])
    reference = np.sqrt((1 - alphabar) / alphabar)
    sigmas = schedule_sigmas(**SD)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (1000,)
    np.testing.assert_allclose(sigmas.numpy(), reference, rtol=2e-5)  # float32 cumprod over 1000 factors
    assert 0.0291 < sigmas[0] < 0.0293 and 14.60 < sigmas[-1] < 14.62
    assert bool((sigmas[1:] > sigmas[:-1]).all())


@pytest.mark.parametrize("schedule, beta_start, beta_end", SCHEDULES)
def test_schedule_arrays_equal_diffusers(schedule, beta_start, beta_end):
    """Bit for bit: betas and alphas_cumprod of diffusers' schedulers; sigmas of EulerDiscreteScheduler (which holds
    them in decreasing order followed by 0)."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    kwargs = {"beta_schedule": schedule, "beta_start": beta_start, "beta_end": beta_end}
    reference = DDPMScheduler(**kwargs)
    betas = ddpm_betas(schedule, 1000, beta_start, beta_end)
    assert torch.equal(betas, reference.betas)
    assert torch.equal(ddpm_alphas_cumprod(betas), reference.alphas_cumprod)
    euler = EulerDiscreteScheduler(**kwargs)
    assert torch.equal(ddpm_sigmas(ddpm_alphas_cumprod(betas)), euler.sigmas[:-1].flip(0))


def test_timesteps_interpolate_linearly_in_log_sigma():
    sigmas = schedule_sigmas(**SD)
    levels = sigmas.double()
    assert torch.equal(sigma_to_timestep(levels, sigmas), torch.arange(1000, dtype=torch.float64))
    between = (levels[:-1] * levels[1:]).sqrt()  # geometric midpoints: halfway in ln(sigma)
    torch.testing.assert_close(
        sigma_to_timestep(between, sigmas), torch.arange(999.0, dtype=torch.float64) + 0.5, rtol=0, atol=1e-9
    )
    third = (levels[:-1].log() * 2 / 3 + levels[1:].log() / 3).exp()
    torch.testing.assert_close(
        sigma_to_timestep(third, sigmas), torch.arange(999.0, dtype=torch.float64) + 1 / 3, rtol=0, atol=1e-9
    )
    ends = torch.tensor([0.0, 1e-3, float(sigmas[0]) * 0.999, float(sigmas[-1]) * 1.001, 1e4], dtype=torch.float64)
    assert sigma_to_timestep(ends, sigmas).tolist() == [0.0, 0.0, 0.0, 999.0, 999.0]  # clamped at both ends
    t = torch.rand(100, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 999
    torch.testing.assert_close(sigma_to_timestep(timestep_to_sigma(t, sigmas), sigmas), t, rtol=0, atol=1e-9)
    assert sigma_to_timestep(torch.ones(2, 3), sigmas).shape == (2, 3)


@pytest.mark.parametrize("schedule, beta_start, beta_end", SCHEDULES)
def test_timesteps_match_diffusers_sigma_to_t(schedule, beta_start, beta_end):
    """diffusers interpolates between float32 logarithms of the levels; ours are float64. The difference is bounded
    by that rounding: |ln sigma_i| * 2^-24 over the smallest gap between adjacent ln sigma_i (about 3e-5 in t)."""
    from diffusers import EulerDiscreteScheduler

    reference = EulerDiscreteScheduler(beta_schedule=schedule, beta_start=beta_start, beta_end=beta_end)
    sigmas = schedule_sigmas(schedule, 1000, beta_start, beta_end)
    log_levels32 = np.log(sigmas.numpy())  # what diffusers' set_timesteps hands _sigma_to_t
    lo, hi = math.log(float(sigmas[0])), math.log(float(sigmas[-1]))
    gen = torch.Generator().manual_seed(1)
    query = (torch.rand(4000, dtype=torch.float64, generator=gen) * (hi - lo + 2) + lo - 1).exp()  # beyond both ends
    expected = reference._sigma_to_t(query.numpy(), log_levels32)
    got = sigma_to_timestep(query, sigmas).numpy()
    log64 = np.log(sigmas.double().numpy())
    bound = 2 * np.abs(log64).max() * 2.0**-24 / np.diff(log64).min()
    assert np.abs(got - expected).max() <= bound
    assert bound < 1e-3  # a thousandth of a timestep at most


class _GaussianOracle(torch.nn.Module):
    """The exact network output for data N(0, sd^2 I), read off its inputs as a trained network would: sigma from
    the timestep (the schedule's levels), x from x_in = x / sqrt(sigma^2 + 1). Predicts E[n | x] (epsilon) or
    E[v | x] = alpha E[n | x] - sigma_vp E[x0 | x] (v_prediction, alpha = 1 / sqrt(1 + sigma^2))."""

    def __init__(self, levels: torch.Tensor, prediction_type: str, sigma_data: float) -> None:
        super().__init__()
        self.levels, self.prediction_type, self.sd = levels, prediction_type, sigma_data

    def forward(self, x_in, c_noise, cond=None, aug_label=None):
        sigma = timestep_to_sigma(c_noise, self.levels).view(-1, 1, 1, 1)  # [B, 1, 1, 1] float64
        x = x_in.double() * (sigma**2 + 1).sqrt()
        eps = sigma * x / (self.sd**2 + sigma**2)
        if self.prediction_type == "epsilon":
            return eps.float()
        x0 = self.sd**2 * x / (self.sd**2 + sigma**2)
        alpha = (1 + sigma**2).rsqrt()
        return (alpha * eps - sigma * alpha * x0).float()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_precond_reproduces_the_exact_gaussian_denoiser(prediction_type):
    """D(x; sigma) = sd^2 / (sd^2 + sigma^2) x when F is the exact epsilon / v prediction: fails if c_skip, c_out,
    c_in or the timestep map is wrong."""
    sd = 0.5
    levels = schedule_sigmas(**SD)
    denoiser = DiscreteDDPMPrecond(_GaussianOracle(levels, prediction_type, sd), **SD, prediction_type=prediction_type)
    sigma = torch.tensor([0.03, 0.2, 1.0, 3.7, 14.0])
    x = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(2)) * (sd**2 + sigma**2).sqrt().view(
        -1, 1, 1, 1
    )
    expected = sd**2 / (sd**2 + sigma**2).view(-1, 1, 1, 1) * x
    # float32: epsilon's D = x - sigma F cancels two numbers of x's size, so the error scales with |x|, not |D|
    error = (denoiser(x, sigma) - expected).abs()
    assert bool((error <= 1e-5 * expected.abs() + 4 * 2.0**-24 * x.abs()).all()), error.max()


class _Recorder(torch.nn.Module):
    def forward(self, x_in, c_noise, cond=None, aug_label=None):
        self.seen = (x_in, c_noise)
        return torch.full_like(x_in, 0.25)


def test_precond_range_inputs_and_quantized_timesteps():
    levels = schedule_sigmas(**SD)
    net = DiscreteDDPMPrecond(_Recorder(), **SD)
    assert (net.sigma_min, net.sigma_max) == (float(levels[0]), float(levels[-1]))
    assert not any(k.startswith("sigmas") for k in net.state_dict())  # the levels follow the arguments
    x, sigma = torch.ones(2, 1, 2, 2), torch.tensor([0.5, 5.0])
    out = net(x, sigma)
    x_in, c_noise = net.backbone.seen
    torch.testing.assert_close(x_in, x / (sigma**2 + 1).sqrt().view(-1, 1, 1, 1))
    torch.testing.assert_close(c_noise, sigma_to_timestep(sigma, levels).float())
    torch.testing.assert_close(out, x - 0.25 * sigma.view(-1, 1, 1, 1))  # epsilon: D = x - sigma F
    quantized = DiscreteDDPMPrecond(_Recorder(), **SD, quantize=True)
    quantized(x, sigma)
    assert torch.equal(quantized.backbone.seen[1], sigma_to_timestep(sigma, levels).round().float())
    v = DiscreteDDPMPrecond(_Recorder(), **SD, prediction_type="v_prediction")
    expected = x / (sigma**2 + 1).view(-1, 1, 1, 1) - (sigma * 0.25 / (sigma**2 + 1).sqrt()).view(-1, 1, 1, 1)
    torch.testing.assert_close(v(x, sigma), expected)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="beta_schedule"):
        ddpm_betas("cosine")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        ddpm_betas("linear", 1)
    with pytest.raises(ValueError, match="prediction_type"):
        DiscreteDDPMPrecond(_Recorder(), prediction_type="sample")
    with pytest.raises(ValueError, match="increasing"):
        DiscreteDDPMPrecond(_Recorder(), beta_start=0.02, beta_end=0.0)
    assert set(BETA_SCHEDULES) == {s for s, _, _ in SCHEDULES}


@pytest.mark.parametrize("steps", [8, 50, 250])
def test_ddim_levels_are_those_of_diffusers_ddim_timesteps(steps):
    """DDIM's "leading" timesteps with steps_offset 1 (SD's scheduler config), on the trained levels, then 0."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=True)
    sched.set_timesteps(steps)
    levels = schedule_sigmas(**SD)
    got = ddim_sigmas(levels, steps)
    assert got.dtype == torch.float64 and got.shape == (steps + 1,) and got[-1] == 0
    torch.testing.assert_close(got[:-1], levels.double()[sched.timesteps], rtol=0, atol=0)
    if steps == 250:  # LDM's "uniform" DDIM discretisation: range(0, 1000, 4) + 1, reversed
        assert sched.timesteps[0] == 997 and sched.timesteps[-1] == 1
    with pytest.raises(ValueError, match="do not fit"):
        ddim_sigmas(levels, 1000)


def test_uniform_timesteps_draw_the_trained_levels_evenly():
    levels = schedule_sigmas(**SD)
    law = UniformTimesteps(levels)
    sigma = law(200_000, generator=torch.Generator().manual_seed(0))
    index = torch.searchsorted(levels, sigma)
    torch.testing.assert_close(levels[index], sigma, rtol=0, atol=0)  # every draw is a trained level
    counts = torch.bincount(index // 100, minlength=10).double()  # ten bins of 100 timesteps
    assert ((counts - 20_000).abs() < 5 * 20_000**0.5).all()


class _TimeNet(torch.nn.Module):
    """A backbone whose output depends on the input and the timestep: F = conv(x) (1 + t / 1000)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, c_noise, cond=None, aug_label=None):
        return self.conv(x) * (1 + c_noise.view(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_loss_is_the_mse_of_the_network_against_its_target(prediction_type):
    """An independent reference in the DDPM's own variables: x_t = sqrt(abar) x0 + sqrt(1 - abar) n, the network
    called at the integer timestep t, target n (epsilon) or v = sqrt(abar) n - sqrt(1 - abar) x0."""
    torch.manual_seed(0)
    net = _TimeNet()
    denoiser = DiscreteDDPMPrecond(net, **SD, prediction_type=prediction_type)
    abar = ddpm_alphas_cumprod(ddpm_betas(**{k: SD[k] for k in SD})).double()
    t = torch.tensor([0, 17, 500, 999])
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    a, s = abar[t].sqrt().float().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().float().view(-1, 1, 1, 1)
    with torch.no_grad():
        F = net(a * x0 + s * noise, t.float())
        target = noise if prediction_type == "epsilon" else a * noise - s * x0
        reference = (F - target).square().flatten(1).mean(1)
        got = ddpm_loss(denoiser, x0, denoiser.sigmas[t], noise)
    torch.testing.assert_close(got, reference, rtol=2e-4, atol=1e-6)
