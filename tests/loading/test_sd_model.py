"""A Stable Diffusion folder through `diffscore sample`: the command's .npz (decoded images, latents, initial
noise) equals diffusers' StableDiffusionPipeline end to end for the same tiny random model, prompt, seed and
guidance (the scheduler settings of tests/loading/test_sd_sampling.py's docstring), and the folder's own sampler
settings are Karras' grid over the schedule's range."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffscore.loading.open import open_model
from diffscore.sampling.seeds import seed_generators, seeded_noise
from tests.conftest import run_cli
from tests.loading.test_sd_sampling import PROMPT, relative_error, scheduler
from tests.sd_files import LATENT_SIZE, VAE_SCALE, write_sd_folder

STEPS, SEEDS = 6, [3, 4]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_sd_folder(tmp_path_factory.mktemp("sd") / "tiny", seed=5)


def pipeline_outputs(folder, name: str, noise: torch.Tensor, guidance: float, output_type: str) -> torch.Tensor:
    """What diffusers' pipeline makes from diffscore's unit noise of one seed (scaled as test_sd_sampling does)."""
    import json

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    sched = pipe.scheduler = scheduler(name, config)
    sched.set_timesteps(STEPS)
    levels = sched.sigmas if name != "ddim" else None
    if name == "ddim":  # the VP state: x / sqrt(sigma^2 + 1)
        abar = sched.alphas_cumprod[sched.timesteps[0]].double()
        latents = noise * math.sqrt((1 - abar) / abar) / math.sqrt((1 - abar) / abar + 1)
    else:
        latents = noise * float(levels[0]) / float(sched.init_noise_sigma)
    size = LATENT_SIZE * VAE_SCALE
    out = pipe(PROMPT, height=size, width=size, num_inference_steps=STEPS, guidance_scale=guidance,
               latents=latents.float(), output_type=output_type, return_dict=False)  # fmt: skip
    return out[0]


@pytest.mark.parametrize(
    "name, guidance, grid",
    [("euler", 1.0, "karras"), ("euler", 4.0, "karras"), ("heun", 4.0, "karras"), ("euler", 4.0, "ddim")],
)
def test_sample_equals_the_diffusers_pipeline_end_to_end(folder, tmp_path, name, guidance, grid):
    """euler/heun on Karras' grid: Euler/HeunDiscreteScheduler(use_karras_sigmas, linspace); euler on the ddim
    grid: DDIMScheduler (eta 0, set_alpha_to_one) — MusicScore's sampler. Images within float round-off."""
    out = tmp_path / "s.npz"
    args = ["sample", "--ckpt_path", folder, "--out", out, "--seed", str(SEEDS[0]), "--num_samples", str(len(SEEDS))]
    args += ["--sampler", name, "--steps", str(STEPS), "--prompt", PROMPT, "--guidance", str(guidance)]
    args += ["--grid", grid, "--accelerator", "cpu", "--devices", "1"]
    assert run_cli(args) == 0
    data = np.load(out)
    assert sorted(data.files) == ["latents", "noise", "samples", "seeds", "written_by"]
    latent_shape = (4, LATENT_SIZE, LATENT_SIZE)
    noise = seeded_noise(seed_generators(SEEDS, "cpu"), latent_shape, "cpu")
    torch.testing.assert_close(torch.from_numpy(data["noise"]), noise, rtol=0, atol=0)
    assert data["samples"].shape == (2, 3, LATENT_SIZE * VAE_SCALE, LATENT_SIZE * VAE_SCALE)
    reference = "ddim" if grid == "ddim" else name
    for i in range(len(SEEDS)):
        latents = pipeline_outputs(folder, reference, noise[i : i + 1], guidance, "latent")
        assert relative_error(torch.from_numpy(data["latents"][i : i + 1]), latents) <= 1e-5
        images = pipeline_outputs(folder, reference, noise[i : i + 1], guidance, "pt")  # in [0, 1]
        ours = (torch.from_numpy(data["samples"][i : i + 1]) / 2 + 0.5).clamp(0, 1)
        assert (ours - images).abs().max() <= 1e-5


def test_the_folders_own_sampler_settings(folder):
    """Heun 25 on Karras' grid (rho 7) over the schedule's own [sigma_0, sigma_{T-1}]; the VAE decodes."""
    model = open_model(folder)
    assert model.kind == "stable-diffusion" and model.text_conditioned and model.decoder is not None
    sampler = model.sampler()
    denoiser = model.network
    assert (sampler.name, sampler.steps) == ("heun", 25)
    assert float(sampler.sigmas[0]) == pytest.approx(denoiser.sigma_max, rel=1e-12)
    assert float(sampler.sigmas[-2]) == pytest.approx(denoiser.sigma_min, rel=1e-12)
    assert 14.5 < denoiser.sigma_max < 14.7 and 0.029 < denoiser.sigma_min < 0.03  # SD's scaled_linear levels
    assert model.image_shape == (3, LATENT_SIZE * VAE_SCALE, LATENT_SIZE * VAE_SCALE)


def test_a_prompt_longer_than_the_tokenizer_takes_is_truncated_with_one_warning(folder, tmp_path):
    """20 x "music score" (40 tokens) is cut to the tokenizer's 16 (start, 14 words, end): the samples are those of
    7 x "music score", and the command warns once, not once per batch."""
    base = ["sample", "--ckpt_path", folder, "--num_samples", "3", "--batch_size", "1", "--steps", "2"]
    with pytest.warns(UserWarning, match="truncated to the text encoder's 16") as caught:
        assert run_cli([*base, "--out", tmp_path / "long.npz", "--prompt", " ".join(["music score"] * 20)]) == 0
    assert len([w for w in caught if "truncated" in str(w.message)]) == 1
    assert run_cli([*base, "--out", tmp_path / "cut.npz", "--prompt", " ".join(["music score"] * 7)]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "long.npz")["samples"], np.load(tmp_path / "cut.npz")["samples"])
