import math

import numpy as np
import pytest
import torch
from torch import nn

from diffscore.core.precond import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond
from diffscore.core.schedules import LogNormalSigma, clip_sigma_range, karras_sigmas


@pytest.mark.parametrize("n", [2, 5, 18, 256])
def test_karras_sigmas_endpoints_monotone_and_formula(n):
    s = karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert s.shape == (n + 1,)
    assert s[0].item() == pytest.approx(80.0, rel=1e-12)
    assert s[-2].item() == pytest.approx(0.002, rel=1e-12)
    assert s[-1].item() == 0.0
    assert (s[:-1] > s[1:]).all()
    # Karras et al. Eq. 5, evaluated independently in numpy.
    i = np.arange(n)
    ref = (80.0 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s[:-1].numpy(), ref, rtol=1e-12)


def test_karras_sigmas_single_step_and_known_values():
    assert karras_sigmas(1).tolist() == [80.0, 0.0]
    # Wang & Vastola quote the 18-step grid: t_1 = 57.6, t_2 = 40.8, t_4 = 19.4, t_6 = 8.40, t_8 = 3.26
    s = karras_sigmas(18)
    for k, v in {1: 57.6, 2: 40.8, 4: 19.4, 6: 8.40, 8: 3.26}.items():
        assert s[k].item() == pytest.approx(v, abs=0.06)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_karras_sigmas_rejects_bad_steps(bad):
    with pytest.raises(ValueError, match="num_steps"):
        karras_sigmas(bad)


def test_karras_sigmas_rejects_bad_range():
    with pytest.raises(ValueError):
        karras_sigmas(10, sigma_min=1.0, sigma_max=0.5)


def test_lognormal_sigma_moments_and_determinism():
    law = LogNormalSigma(P_mean=-1.2, P_std=1.2)
    s = law(200_000, device="cpu", generator=torch.Generator().manual_seed(0))
    assert s.shape == (200_000,) and (s > 0).all()
    log_s = s.log()
    assert log_s.mean().item() == pytest.approx(-1.2, abs=0.02)
    assert log_s.std().item() == pytest.approx(1.2, abs=0.02)
    again = law(200_000, device="cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, again)
    assert math.isclose(torch.median(s).item(), math.exp(-1.2), rel_tol=0.02)


def test_karras_sigmas_round_sigma_rounds_every_level_but_the_final_zero():
    levels = torch.tensor([100.0, 30.0, 9.0, 2.0, 0.5, 0.1, 0.01, 0.0], dtype=torch.float64)
    calls = []

    def nearest(sigma):
        calls.append(sigma.clone())
        return levels[(sigma.view(-1, 1) - levels.view(1, -1)).abs().argmin(1)].reshape(sigma.shape)

    s = karras_sigmas(6, 0.02, 80.0, round_sigma=nearest)
    plain = karras_sigmas(6, 0.02, 80.0)
    assert len(calls) == 1 and torch.equal(calls[0], plain[:-1])  # one call on t_0 .. t_{N-1}
    assert s.dtype == torch.float64 and s.device.type == "cpu" and s.shape == (7,)
    expected = [min(levels.tolist(), key=lambda v: abs(v - t)) for t in plain[:-1].tolist()] + [0.0]
    assert s.tolist() == expected
    single = karras_sigmas(1, round_sigma=nearest)
    assert single.tolist() == [100.0, 0.0]


def test_clip_sigma_range_is_edm_min_max():
    assert clip_sigma_range(0.002, 80.0) == (0.002, 80.0)  # EDMPrecond: [0, inf)
    assert clip_sigma_range(0.002, 80.0, 0.0, math.inf) == (0.002, 80.0)
    assert clip_sigma_range(0.002, 80.0, 0.02, 100.0) == (0.02, 80.0)  # VE
    assert clip_sigma_range(0.002, 80.0, 0.0064, 20291.17) == (0.0064, 80.0)  # iDDPM
    assert clip_sigma_range(0.5, 300.0, 0.001, 152.2) == (0.5, 152.2)  # VP
    with pytest.raises(ValueError, match="does not meet"):
        clip_sigma_range(0.002, 0.01, 0.02, 100.0)
    with pytest.raises(ValueError):
        clip_sigma_range(1.0, 0.5)


def test_edm_sampler_grid_for_each_preconditioning():
    """EDM's edm_sampler: clip (0.002, 80) to the net's range, Eq. 5, then net.round_sigma on the grid."""
    for net in (
        EDMPrecond(nn.Identity()),
        VPPrecond(nn.Identity()),
        VEPrecond(nn.Identity()),
        iDDPMPrecond(nn.Identity()),
    ):
        lo, hi = clip_sigma_range(0.002, 80.0, net.sigma_min, net.sigma_max)
        s = karras_sigmas(18, lo, hi, round_sigma=net.round_sigma)
        assert s[-1] == 0 and (s[:-1] >= net.sigma_min).all() and (s[:-1] <= net.sigma_max).all()
        assert torch.equal(net.round_sigma(s[:-1]), s[:-1])
        if isinstance(net, iDDPMPrecond):
            assert set(s[:-1].tolist()) <= set(net.u.double().tolist())
            assert s[-2].item() == pytest.approx(net.sigma_min) and s[0].item() == pytest.approx(80.0, rel=0.01)
        else:
            assert torch.equal(s, karras_sigmas(18, lo, hi))
