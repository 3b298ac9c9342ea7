import math

import numpy as np
import pytest
import torch

from diffscore.core.schedules import LogNormalSigma, karras_sigmas


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
