"""EDM2's preconditioning, loss, learning-rate schedule and presets (Karras et al. 2024; NVlabs/edm2
training/networks_edm2.py Precond, training/training_loop.py EDM2Loss and learning_rate_schedule, train_edm2.py),
against the formulas written out here in float64."""

import math

import pytest
import torch
from torch import nn

from diffscore.core.edm2_presets import EDM2_PRESETS, EDM2Preset, edm2_preset, edm2_size
from diffscore.core.losses import edm2_loss, edm_loss
from diffscore.core.precond_edm2 import EDM2Precond
from diffscore.core.schedules import edm2_learning_rate
from diffscore.errors import DiffscoreError


class Recorder(nn.Module):
    """F(x, c_noise) = 3 x + c_noise, remembering its inputs."""

    def forward(self, x, c_noise, cond=None, aug_label=None):
        self.seen = (x.clone(), c_noise.clone(), cond, aug_label)
        return 3 * x + c_noise.view(-1, 1, 1, 1)


class LogVar(nn.Module):
    """u(c_noise) = 2 c_noise + 0.1, remembering its input."""

    def forward(self, c_noise):
        self.seen = c_noise.clone()
        return 2 * c_noise + 0.1


def test_edm2_precond_is_edm_with_sigma_data_half_and_returns_logvar():
    backbone, logvar = Recorder(), LogVar()
    D = EDM2Precond(backbone, logvar)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    sigma = [0.002, 0.3, 2.0, 80.0]
    cond, aug = torch.tensor([1, 0, 2, 1]), torch.randn(4, 5)
    denoised, lv = D(x, torch.tensor(sigma), cond, aug, return_logvar=True)
    for i, s in enumerate(sigma):  # EDM, Table 1, with sd = 0.5, written per sample
        c_skip, c_out, c_in = 0.25 / (s * s + 0.25), s * 0.5 / math.sqrt(s * s + 0.25), 1 / math.sqrt(0.25 + s * s)
        c_noise = math.log(s) / 4
        expected = c_skip * x[i] + c_out * (3 * c_in * x[i] + c_noise)
        torch.testing.assert_close(denoised[i], expected, atol=1e-5, rtol=1e-5)  # float32 coefficients
        assert backbone.seen[1][i].item() == pytest.approx(c_noise, rel=1e-6)
        assert logvar.seen[i].item() == pytest.approx(c_noise, rel=1e-6)
        assert lv[i].item() == pytest.approx(2 * c_noise + 0.1, rel=1e-6)
    assert torch.equal(backbone.seen[2], cond) and torch.equal(backbone.seen[3], aug)
    assert lv.shape == (4,) and denoised.dtype == x.dtype
    torch.testing.assert_close(D(x, torch.tensor(sigma), cond, aug), denoised)  # plain call: denoised only


def test_edm2_precond_without_logvar_network_refuses_return_logvar():
    D = EDM2Precond(Recorder())
    x = torch.randn(2, 1, 2, 2)
    assert D(x, torch.tensor([1.0, 2.0])).shape == x.shape
    with pytest.raises(ValueError, match="no logvar network"):
        D(x, torch.tensor([1.0, 2.0]), return_logvar=True)


def toy_denoiser(x, sigma, cond=None, aug_label=None, return_logvar=False):
    """D = 0.8 x, u = 0.3 ln(sigma) - 0.2: a fixed function, so the loss has a closed form."""
    denoised, logvar = 0.8 * x, 0.3 * sigma.log() - 0.2
    return (denoised, logvar) if return_logvar else denoised


def test_edm2_loss_is_the_formula_and_edm2s_summed_form_over_pixels():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    sigma = torch.tensor([0.05, 1.0, 30.0])
    loss = edm2_loss(toy_denoiser, x0, sigma, noise)
    for i, s in enumerate(sigma.tolist()):
        x = x0[i].double() + s * noise[i].double()
        err = (0.8 * x - x0[i].double()).square().mean().item()
        weight = (s * s + 0.25) / (s * 0.5) ** 2
        u = 0.3 * math.log(s) - 0.2
        assert loss[i].item() == pytest.approx(weight / math.exp(u) * err + u, rel=1e-5)
        # EDM2 sums its per-element loss (u added at every element) over C, H, W: C*H*W times this one
        elementwise = weight / math.exp(u) * (0.8 * x - x0[i].double()).square() + u
        assert elementwise.sum().item() / x.numel() == pytest.approx(loss[i].item(), rel=1e-5)


def test_edm2_loss_with_zero_logvar_is_edm_loss_and_its_best_logvar_is_log_weighted_error():
    gen = torch.Generator().manual_seed(1)
    x0, noise, sigma = torch.randn(4, 3, 2, 2, generator=gen), torch.randn(4, 3, 2, 2, generator=gen), torch.rand(4)
    sigma = sigma + 0.1

    def with_logvar(u):
        return lambda x, s, c=None, a=None, return_logvar=False: (0.7 * x, torch.full_like(s, u))

    plain = edm_loss(lambda x, s, c=None, a=None: 0.7 * x, x0, sigma, noise)
    torch.testing.assert_close(edm2_loss(with_logvar(0.0), x0, sigma, noise), plain)
    best = plain[0].log().item()  # argmin_u lambda err / e^u + u = ln(lambda err)
    at = [edm2_loss(with_logvar(best + d), x0, sigma, noise)[0].item() for d in (-0.01, 0.0, 0.01)]
    assert at[1] < at[0] and at[1] < at[2]
    assert at[1] == pytest.approx(1 + best, rel=1e-6)


def test_edm2_learning_rate_values():
    s = edm2_preset("edm2-img64-s")
    lr = lambda n, **kw: edm2_learning_rate(n, s.lr, s.decay, s.batch, **kw)  # noqa: E731
    t_ref = 35000 * 2048  # images at which the decay starts
    assert lr(0) == 0.0  # EDM2's first step: ramp-up from 0
    assert lr(2.5e6) == pytest.approx(0.01 * 0.25, rel=1e-12)  # ramp-up over 10e6 images
    assert lr(10e6) == pytest.approx(0.01, rel=1e-12)
    assert lr(t_ref) == pytest.approx(0.01, rel=1e-12)
    assert lr(4 * t_ref) == pytest.approx(0.005, rel=1e-12)  # 1 / sqrt(t / t_ref)
    assert lr(1024 << 20) == pytest.approx(0.01 / math.sqrt((1024 << 20) / t_ref), rel=1e-12)
    assert lr(2.5e6, rampup_images=0) == pytest.approx(0.01, rel=1e-12)
    assert edm2_learning_rate(4 * t_ref, 0.01, 0, 2048) == pytest.approx(0.01, rel=1e-12)  # no decay
    with pytest.raises(ValueError):
        edm2_learning_rate(-1, 0.01, 35000, 2048)


def test_presets_are_train_edm2s():
    assert len(EDM2_PRESETS) == 12
    # train_edm2.py's rows: duration, batch, channels, lr, decay, dropout, P_mean, P_std
    assert edm2_preset("edm2-img64-s") == EDM2Preset(192, 0.0100, 35000, 0.00, -0.8, 1.6, 1024 << 20, 2048)
    assert edm2_preset("edm2-img64-m") == EDM2Preset(256, 0.0090, 35000, 0.10, -0.8, 1.6, 2048 << 20, 2048)
    assert edm2_preset("edm2-img512-xxl") == EDM2Preset(448, 0.0065, 70000, 0.10, -0.4, 1.0, 896 << 20, 2048)
    for name, preset in EDM2_PRESETS.items():  # the network sizes agree with the presets
        assert edm2_size(name.rsplit("-", 1)[1]) == (preset.channels, preset.dropout)
    with pytest.raises(DiffscoreError, match="'edm2-img64-xxl' does not exist.*edm2-img64-xs"):
        edm2_preset("edm2-img64-xxl")
