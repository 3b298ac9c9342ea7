"""The sampling callbacks' guidance by a second network (SampleGrid/SampleQuality ``guide`` and ``guidance``): the
guide file is opened once, on first use, and the sampler's one Euler step from sigma_max is the hand-written
D_guide + w (D_module - D_guide) of the two denoisers."""

from __future__ import annotations

import pytest
import torch

from diffscore.errors import DiffscoreError
from diffscore.lit.callbacks.sample_grid import CallbackGuide, SampleGrid
from diffscore.lit.modules import EDM2Module
from diffscore.loading.open import open_model
from diffscore.networks import EDM2UNet
from diffscore.sampling.seeds import seed_generators, seeded_noise


def test_a_callbacks_guide_is_the_lerp_of_the_two_denoisers(tiny_ckpt):
    torch.manual_seed(0)
    net = EDM2UNet([1, 8, 8], model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("out_gain", "emb_gain")):
                p.fill_(0.5)
    module = EDM2Module(net).eval()  # an EDM2 model guided by an EDM one of the same data (the quickstart)
    guiding = CallbackGuide(str(tiny_ckpt), 2.5, steps=1, sampler="euler")
    sampler = guiding.sampler(module)
    assert guiding._model is not None and guiding.sampler(module).options.guide == str(tiny_ckpt)
    got = sampler.generate([0, 1]).double()
    x = seeded_noise(seed_generators([0, 1], "cpu"), (1, 8, 8), "cpu") * 80.0
    sigma = torch.full((2,), 80.0)
    with torch.no_grad():  # one Euler step from 80 to 0 lands on the guided denoiser's output
        d_main = module.denoiser(x, sigma).double()
        d_guide = open_model(tiny_ckpt).network(x, sigma).double()
    torch.testing.assert_close(got, d_guide + 2.5 * (d_main - d_guide), atol=1e-4, rtol=1e-4)
    assert (d_main - d_guide).abs().max() > 1e-2


def test_a_callbacks_bad_guidance_settings_fail_at_config_time():
    with pytest.raises(DiffscoreError, match="--guide"):
        SampleGrid(guidance=2.0, guide="")
    with pytest.raises(DiffscoreError, match="--guidance must be a finite number"):
        SampleGrid(guidance=float("nan"))
