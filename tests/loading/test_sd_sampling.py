"""diffscore's own samplers on a Stable Diffusion folder equal diffusers' StableDiffusionPipeline.

diffscore: DiscreteDDPMPrecond + StableDiffusionUNet (read by diffscore.loading), Karras' grid (rho 7) over the
schedule's own [sigma_min, sigma_max], classifier-free guidance from diffscore.core.guidance, the initial latent
x = noise * sigma_max with noise from torch.Generator().manual_seed(seed). diffusers: the same modules in a
StableDiffusionPipeline (output_type="latent"), ``latents=`` the same x divided by what the pipeline multiplies in
(``init_noise_sigma``) and, for the schedulers that keep the variance-preserving state x / sqrt(sigma^2 + 1)
(DPM-Solver, DDIM), by sqrt(sigma_max^2 + 1).

The settings that make diffusers step on diffscore's grid:
- Euler / Heun: ``use_karras_sigmas=True`` and ``timestep_spacing="linspace"``. SD's shipped scheduler config says
  "leading", whose Karras grid spans the levels of the leading timesteps (for 8 steps t = 1 .. 876), not the
  schedule's ends (test_leading_spacing_shrinks_the_karras_range).
- DPM-Solver++(2M): DPMSolverMultistepScheduler(use_karras_sigmas=True, timestep_spacing="linspace") with its
  defaults solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", final_sigmas_type="zero" (the
  last step returns the denoised estimate, as diffscore's dpmpp_2m does; with solver_order 2, lower_order_final only
  touches that last step, which is first order anyway). diffusers rounds the Karras timesteps to integers, so the
  matching denoiser is DiscreteDDPMPrecond(quantize=True); with fractional timesteps the results differ by ~1e-3 of
  the latent's size (test_dpm_solver_feeds_integer_timesteps), a genuine modelling difference, not round-off.
- DDIM (eta 0, its own "leading" timesteps with steps_offset 1) is diffscore's Euler on the levels of those
  timesteps, provided the last step goes to sigma 0: ``set_alpha_to_one=True``. SD's config says False, which ends
  DDIM at alphabar_0 (sigma ~0.029, still scaled by sqrt(alphabar_0)); diffscore's samplers always end at 0.
  ``clip_sample=False`` (the pipeline also turns it off, but only for the scheduler it is built with).

Tolerance: max |diffscore - diffusers| <= 1e-5 max |latent|, float32 round-off. The two differ in summation order
(diffusers runs the unconditional and conditional U-Net in one batch and guides the noise prediction; diffscore
calls the denoiser twice and guides D, the same linear combination), in x / sqrt(.) vs x * rsqrt(.), and in
t(sigma): diffusers interpolates between float32 logarithms of the levels (up to ~3e-5 in t), diffscore in float64.
Measured: 2e-7 .. 1.7e-6 of the latent's size; the integer-vs-fractional timestep difference above is 1.3e-3 .. 1.8e-3.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffscore.core.guidance import guided_denoiser
from diffscore.core.samplers import dpmpp_2m, euler, heun
from diffscore.core.schedules import karras_sigmas
from diffscore.loading.stable_diffusion import read_stable_diffusion, stable_diffusion_denoiser
from tests.sd_files import LATENT_SIZE, VAE_SCALE, write_sd_folder

PROMPT = "a music score for violin, key is A major"
STEPS, SEED = 8, 7
TOLERANCE = 1e-5  # of max |latent|
SAMPLERS = {"euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m}


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def model(request, tmp_path_factory):
    """(parts, pipeline, scheduler config) of a tiny folder: the pipeline holds the very modules diffscore read."""
    from diffusers import StableDiffusionPipeline

    folder = write_sd_folder(tmp_path_factory.mktemp("sd") / request.param, prediction_type=request.param, seed=11)
    parts = read_stable_diffusion(folder)
    bb = parts.backbone
    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=bb.text_encoder,
        tokenizer=bb.tokenizer,
        unet=bb.unet,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return parts, pipe, config


def scheduler(name: str, config: dict):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

    karras = {"use_karras_sigmas": True, "timestep_spacing": "linspace"}
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config, **karras)
    if name == "heun":
        return HeunDiscreteScheduler.from_config(config, **karras)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config, **karras)
    return DDIMScheduler.from_config(config, set_alpha_to_one=True, clip_sample=False)


def diffusers_latents(pipe, sched, x: torch.Tensor, sigma_max: float, guidance: float) -> torch.Tensor:
    """The pipeline's final latents from diffscore's initial x (EDM scale), for scheduler ``sched``."""
    pipe.scheduler = sched
    sched.set_timesteps(STEPS)  # init_noise_sigma follows the timesteps; the pipeline sets the same ones again
    vp_state = type(sched).__name__ in ("DPMSolverMultistepScheduler", "DDIMScheduler")
    latents = x / (math.sqrt(sigma_max**2 + 1) if vp_state else 1.0) / float(sched.init_noise_sigma)
    size = LATENT_SIZE * VAE_SCALE
    out = pipe(
        PROMPT,
        height=size,
        width=size,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        latents=latents,
        output_type="latent",
    )
    return out.images if not isinstance(out, tuple) else out[0]


def diffscore_latents(parts, sampler: str, guidance: float, quantize: bool = False) -> tuple[torch.Tensor, ...]:
    """(final latents, initial x, sigma_max) of diffscore's sampler on Karras' grid over the schedule's range."""
    denoiser = stable_diffusion_denoiser(parts, quantize=quantize)
    sigmas = karras_sigmas(STEPS, denoiser.sigma_min, denoiser.sigma_max, 7.0)
    noise = torch.randn(parts.latent_shape, generator=torch.Generator().manual_seed(SEED))[None]  # [1, 4, h, w]
    x = noise * float(sigmas[0])
    with torch.no_grad():
        return SAMPLERS[sampler](guided_denoiser(denoiser, guidance), x, sigmas, [PROMPT]), x, float(sigmas[0])


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("sampler, guidance", [("euler", 1.0), ("euler", 4.0), ("heun", 4.0), ("dpmpp_2m", 4.0)])
def test_samplers_equal_the_diffusers_pipeline(model, sampler, guidance):
    parts, pipe, config = model
    ours, x, sigma_max = diffscore_latents(parts, sampler, guidance, quantize=sampler == "dpmpp_2m")
    reference = diffusers_latents(pipe, scheduler(sampler, config), x, sigma_max, guidance)
    assert ours.shape == reference.shape == (1, *parts.latent_shape)
    assert relative_error(ours, reference) <= TOLERANCE


def test_dpm_solver_feeds_integer_timesteps(model):
    """With the fractional timestep t(sigma) the U-Net is called elsewhere than diffusers' DPM-Solver calls it
    (round(t)): a difference two orders of magnitude above the tolerance, which the tolerance does catch."""
    parts, pipe, config = model
    ours, x, sigma_max = diffscore_latents(parts, "dpmpp_2m", 4.0, quantize=False)
    reference = diffusers_latents(pipe, scheduler("dpmpp_2m", config), x, sigma_max, 4.0)
    assert relative_error(ours, reference) > 100 * TOLERANCE
    sched = scheduler("dpmpp_2m", config)
    sched.set_timesteps(STEPS)
    assert sched.timesteps.dtype == torch.int64


def test_ddim_is_euler_on_its_own_timesteps(model):
    """DDIM with eta 0 is the Euler step of the PF-ODE in x = x0 + sigma n (Song et al. 2021; Karras et al. 2022,
    Sec. 4): diffscore's euler on the levels of DDIM's timesteps, then 0, equals DDIMScheduler's result."""
    parts, pipe, config = model
    sched = scheduler("ddim", config)
    sched.set_timesteps(STEPS)
    denoiser = stable_diffusion_denoiser(parts)
    levels = denoiser.sigmas.double()
    sigmas = torch.cat([levels[sched.timesteps], levels.new_zeros(1)])  # [STEPS + 1]
    assert sched.timesteps.tolist() == [876, 751, 626, 501, 376, 251, 126, 1]  # "leading", steps_offset 1
    noise = torch.randn(parts.latent_shape, generator=torch.Generator().manual_seed(SEED))[None]
    x = noise * float(sigmas[0])
    with torch.no_grad():
        ours = euler(guided_denoiser(denoiser, 4.0), x, sigmas, [PROMPT])
    reference = diffusers_latents(pipe, sched, x, float(sigmas[0]), 4.0)
    assert relative_error(ours, reference) <= TOLERANCE


def test_leading_spacing_shrinks_the_karras_range(model):
    """Why the equality needs timestep_spacing="linspace": with SD's shipped "leading", diffusers' Karras grid does
    not reach the schedule's ends (diffscore's grid does)."""
    from diffusers import EulerDiscreteScheduler

    parts, _, config = model
    denoiser = stable_diffusion_denoiser(parts)
    leading = EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True)
    leading.set_timesteps(STEPS)
    assert config["timestep_spacing"] == "leading"
    assert float(leading.sigmas[0]) < 0.9 * denoiser.sigma_max and float(leading.sigmas[-2]) > denoiser.sigma_min
    linspace = scheduler("euler", config)
    linspace.set_timesteps(STEPS)
    ours = karras_sigmas(STEPS, denoiser.sigma_min, denoiser.sigma_max, 7.0)
    torch.testing.assert_close(linspace.sigmas, ours.float(), rtol=1e-7, atol=0)
