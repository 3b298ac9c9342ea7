"""diffscore.data.latents on the tiny random AutoencoderKL of tests/sd_files.py: the stored statistics are the VAE
posterior's mean and std, and latents drawn from them have that mean and std times the scaling factor (once)."""

from __future__ import annotations

import pytest
import torch

from diffscore.data.latents import encode_latent_stats, sample_latents
from tests.sd_files import LATENT_SIZE, SCALING_FACTOR, VAE_SCALE, one_thread, tiny_vae


@pytest.fixture(scope="module")
def vae():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return tiny_vae()


@pytest.fixture(scope="module")
def images():
    size = LATENT_SIZE * VAE_SCALE
    return torch.rand(5, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1  # in [-1, 1]


def test_stats_are_the_posterior_mean_and_std(vae, images):
    """Against the encoder's moments computed here: quant_conv(encoder(x)) = [mean, log variance], the log variance
    clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does, std = exp(logvar / 2)."""
    with one_thread():
        stats = encode_latent_stats(vae, images, batch_size=2)
        with torch.no_grad():
            moments = vae.quant_conv(vae.encoder(images))  # [N, 8, h, w]
    mean, logvar = moments.chunk(2, dim=1)
    assert stats.shape == (5, 8, LATENT_SIZE, LATENT_SIZE) and stats.dtype == torch.float32
    torch.testing.assert_close(stats[:, :4], mean)
    torch.testing.assert_close(stats[:, 4:], (0.5 * logvar.clamp(-30, 20)).exp())
    assert bool((stats[:, 4:] > 0).all())


def test_sampled_latents_have_the_posterior_moments_times_the_scale(vae, images):
    with one_thread():
        stats = encode_latent_stats(vae, images[:1])  # [1, 8, h, w]
    draws = 20000
    z = sample_latents(stats.expand(draws, -1, -1, -1), SCALING_FACTOR, torch.Generator().manual_seed(2))
    mean, std = stats[:, :4] * SCALING_FACTOR, stats[:, 4:] * SCALING_FACTOR  # [1, 4, h, w]
    assert z.shape == (draws, 4, LATENT_SIZE, LATENT_SIZE)
    # per element: the sample mean within 5 standard errors, the sample std within 5 of its standard errors
    assert bool(((z.mean(0) - mean[0]).abs() <= 5 * std[0] / draws**0.5).all())
    assert bool(((z.std(0) - std[0]).abs() <= 5 * std[0] / (2 * draws) ** 0.5).all())


def test_the_scale_is_applied_once(vae, images):
    with one_thread():
        stats = encode_latent_stats(vae, images)
    certain = torch.cat([stats[:, :4], torch.zeros_like(stats[:, 4:])], dim=1)  # std 0: z is the mean
    assert torch.equal(sample_latents(certain, SCALING_FACTOR), stats[:, :4] * SCALING_FACTOR)
    unscaled = sample_latents(stats, 1.0, torch.Generator().manual_seed(3))
    scaled = sample_latents(stats, SCALING_FACTOR, torch.Generator().manual_seed(3))
    torch.testing.assert_close(scaled, unscaled * SCALING_FACTOR)


def test_bad_inputs_raise(vae, images):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        encode_latent_stats(vae, images * 3)
    with pytest.raises(ValueError, match="float"):
        encode_latent_stats(vae, (images > 0).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\[N, 2C, h, w\]"):
        sample_latents(torch.zeros(1, 7, 2, 2), 0.5)
    with pytest.raises(ValueError, match="scaling_factor"):
        sample_latents(torch.zeros(1, 8, 2, 2), 0.0)
