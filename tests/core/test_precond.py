import math

import pytest
import torch
from torch import nn

from diffscore.core.precond import EDMPrecond, edm_coefficients


@pytest.mark.parametrize("sigma", [0.002, 0.1, 0.5, 1.0, 80.0])
def test_coefficients_match_edm_table1(sigma):
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edm_coefficients(torch.tensor([sigma], dtype=torch.float64), sd)
    assert c_skip.item() == pytest.approx(sd**2 / (sigma**2 + sd**2), rel=1e-12)
    assert c_out.item() == pytest.approx(sigma * sd / math.sqrt(sigma**2 + sd**2), rel=1e-12)
    assert c_in.item() == pytest.approx(1 / math.sqrt(sd**2 + sigma**2), rel=1e-12)
    assert c_noise.item() == pytest.approx(math.log(sigma) / 4, rel=1e-12)


class Recorder(nn.Module):
    """F(x, c_noise) = 3 x + c_noise, remembering its inputs."""

    def forward(self, x, c_noise, cond=None, aug_label=None):
        self.seen = (x.clone(), c_noise.clone(), cond, aug_label)
        return 3 * x + c_noise.view(-1, 1, 1, 1)


def test_precond_wraps_backbone_as_in_the_formula():
    bb = Recorder()
    D = EDMPrecond(bb, sigma_data=0.5)
    x = torch.randn(4, 2, 3, 3)
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0])
    cond = torch.tensor([1, 0, 2, 1])
    out = D(x, sigma, cond)
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in edm_coefficients(sigma, 0.5))
    x_in, seen_noise, seen_cond, _ = bb.seen
    torch.testing.assert_close(x_in, c_in * x)
    torch.testing.assert_close(seen_noise, sigma.log() / 4)
    assert torch.equal(seen_cond, cond)
    torch.testing.assert_close(out, c_skip * x + c_out * (3 * c_in * x + c_noise))


def test_precond_is_identity_at_tiny_sigma_and_accepts_scalar_sigma():
    D = EDMPrecond(Recorder())
    x = torch.randn(3, 1, 2, 2)
    torch.testing.assert_close(D(x, torch.tensor(1e-6)), x, atol=1e-5, rtol=1e-5)


def test_c_in_gives_unit_variance_inputs():
    # x0 with std sigma_data plus sigma n has variance sd^2 + sigma^2; c_in rescales it to 1.
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(100_000, generator=g)
    for sigma in (0.05, 1.0, 20.0):
        x = x0 + sigma * torch.randn(100_000, generator=g)
        _, _, c_in, _ = edm_coefficients(torch.tensor(sigma), 0.5)
        assert (c_in * x).std().item() == pytest.approx(1.0, abs=0.01)
