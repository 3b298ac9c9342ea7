import math

import pytest
import torch
from torch import nn

from diffscore.core.precond import (
    EDMPrecond,
    VEPrecond,
    VPPrecond,
    edm_coefficients,
    iddpm_coefficients,
    iddpm_u,
    iDDPMPrecond,
    ve_coefficients,
    vp_coefficients,
    vp_sigma,
    vp_sigma_inv,
)


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


# ---------------------------------------------------------------------------------------------------------
# VP, VE, iDDPM (Karras et al. 2022, Table 1), against the formulas written out here in float64
BETA_D, BETA_MIN, M = 19.9, 0.1, 1000
SIGMAS = [0.002, 0.05, 0.5, 1.0, 7.0, 80.0]


def vp_t_of_sigma(sigma: float) -> float:
    """Solves sigma^2 = exp(beta_d t^2 / 2 + beta_min t) - 1 for t >= 0 (the quadratic formula)."""
    a, b, c = 0.5 * BETA_D, BETA_MIN, -math.log(1 + sigma**2)
    return (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)


def iddpm_u_reference(C_1=0.001, C_2=0.008, M=M) -> list[float]:
    def alpha_bar(j):
        return math.sin(0.5 * math.pi * j / (M * (C_2 + 1))) ** 2

    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C_1) - 1)
    return u


@pytest.mark.parametrize("sigma", SIGMAS)
def test_vp_coefficients_match_table1(sigma):
    c_skip, c_out, c_in, c_noise = vp_coefficients(torch.tensor([sigma], dtype=torch.float64), BETA_D, BETA_MIN, M)
    assert c_skip.item() == 1 and c_out.item() == -sigma
    assert c_in.item() == pytest.approx(1 / math.sqrt(sigma**2 + 1), rel=1e-12)
    assert c_noise.item() == pytest.approx((M - 1) * vp_t_of_sigma(sigma), rel=1e-9)
    t = torch.tensor([vp_t_of_sigma(sigma)], dtype=torch.float64)
    assert vp_sigma(t, BETA_D, BETA_MIN).item() == pytest.approx(sigma, rel=1e-9)  # sigma(t) inverts t(sigma)
    assert vp_sigma_inv(vp_sigma(t, BETA_D, BETA_MIN), BETA_D, BETA_MIN).item() == pytest.approx(t.item(), rel=1e-9)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_ve_coefficients_match_table1(sigma):
    c_skip, c_out, c_in, c_noise = ve_coefficients(torch.tensor([sigma], dtype=torch.float64))
    assert (c_skip.item(), c_out.item(), c_in.item()) == (1, sigma, 1)
    assert c_noise.item() == pytest.approx(math.log(0.5 * sigma), rel=1e-12)


def test_iddpm_u_table_follows_its_recursion():
    u = iddpm_u(0.001, 0.008, M)
    ref = torch.tensor(iddpm_u_reference(), dtype=torch.float64)
    assert u.dtype == torch.float32 and u.shape == (M + 1,)  # EDM's table is float32
    assert u[M] == 0 and (u[:-1] > u[1:]).all()
    torch.testing.assert_close(u.double(), ref, rtol=1e-3, atol=0)  # float32 recursion: ~5e-4 accumulated
    assert ref[0].item() == pytest.approx(20291.17, rel=1e-5) and ref[M - 1].item() == pytest.approx(0.0064, abs=1e-4)
    other = iddpm_u(0.002, 0.01, 50)
    torch.testing.assert_close(
        other.double(), torch.tensor(iddpm_u_reference(0.002, 0.01, 50)).double(), rtol=1e-4, atol=0
    )


def test_iddpm_round_sigma_and_c_noise_pick_the_nearest_level():
    net = iDDPMPrecond(nn.Identity())
    u = net.u.double().tolist()
    g = torch.Generator().manual_seed(0)
    sigmas = torch.cat([torch.exp(torch.randn(200, generator=g, dtype=torch.float64) * 3), net.u[::97].double()])
    rounded = net.round_sigma(sigmas)
    _, _, _, c_noise = iddpm_coefficients(sigmas.float(), net.u)
    assert rounded.dtype == torch.float64 and rounded.shape == sigmas.shape
    for s, r, c in zip(sigmas.tolist(), rounded.tolist(), c_noise.tolist()):
        j = min(range(M + 1), key=lambda k: abs(u[k] - s))  # brute force
        assert r == u[j] and c == M - 1 - j
    assert torch.equal(net.round_sigma(rounded), rounded)  # idempotent
    assert net.round_sigma(torch.tensor(3.0)).shape == ()
    assert (net.sigma_min, net.sigma_max) == (float(net.u[M - 1]), float(net.u[0]))


class TwoHeaded(nn.Module):
    """F = [3 x + c_noise, 1e6]: iDDPM's backbone predicts a variance in the second half of its channels."""

    def __init__(self, factor=2):
        super().__init__()
        self.factor = factor
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, c_noise, cond=None, aug_label=None):
        self.seen = (x.clone(), c_noise.clone())
        mean = 3 * x + c_noise.view(-1, *([1] * (x.ndim - 1)))
        return torch.cat([mean] + [torch.full_like(x, 1e6)] * (self.factor - 1), dim=1)


def _reference_coefficients(kind: str, sigma: float, u: list[float]):
    if kind == "vp":
        return 1.0, -sigma, 1 / math.sqrt(sigma**2 + 1), (M - 1) * vp_t_of_sigma(sigma)
    if kind == "ve":
        return 1.0, sigma, 1.0, math.log(0.5 * sigma)
    j = min(range(M + 1), key=lambda k: abs(u[k] - sigma))
    return 1.0, -sigma, 1 / math.sqrt(sigma**2 + 1), M - 1 - j


@pytest.mark.parametrize("kind", ["vp", "ve", "iddpm"])
def test_precond_wraps_backbone_as_in_table1(kind):
    cls, factor = {"vp": (VPPrecond, 1), "ve": (VEPrecond, 1), "iddpm": (iDDPMPrecond, 2)}[kind]
    bb = TwoHeaded(factor)
    D = cls(bb)
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0])
    out = D(x, sigma)
    u = D.u.double().tolist() if kind == "iddpm" else []
    x_in, c_noise = bb.seen
    for i, s in enumerate(sigma.tolist()):
        c_skip, c_out, c_in, c_n = _reference_coefficients(kind, s, u)
        torch.testing.assert_close(x_in[i], (c_in * x[i].double()).float())
        # float32, as EDM: ln(1 + sigma^2) of VP loses ~1e-3 relative at sigma = 0.01; iDDPM's is an exact integer
        assert c_noise[i].item() == pytest.approx(c_n, rel=2e-3 if kind == "vp" else 1e-6, abs=1e-5)
        ref = c_skip * x[i].double() + c_out * (3 * c_in * x[i].double() + c_noise[i].double())
        torch.testing.assert_close(out[i].double(), ref, rtol=1e-5, atol=1e-4)  # the 1e6 half never enters
    assert list(D.state_dict()) == ["backbone.w"]
    with pytest.raises(ValueError, match="channels"):
        cls(TwoHeaded(3 - factor))(x, sigma)


def test_supported_ranges_and_round_sigma_identity():
    vp, ve, edm = VPPrecond(nn.Identity()), VEPrecond(nn.Identity()), EDMPrecond(nn.Identity(), sigma_data=0.5)
    assert vp.sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * BETA_D + BETA_MIN) - 1), rel=1e-6)
    assert vp.sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * BETA_D * 1e-10 + BETA_MIN * 1e-5)), rel=0.03)
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)
    assert (edm.sigma_min, edm.sigma_max) == (0.0, math.inf)
    assert EDMPrecond(nn.Identity(), 0.5, sigma_min=0.002, sigma_max=80).sigma_max == 80
    s = torch.tensor([0.0123, 7.0], dtype=torch.float64)
    for net in (vp, ve, edm):
        assert torch.equal(net.round_sigma(s), s)
    with pytest.raises(ValueError):
        VEPrecond(nn.Identity(), sigma_min=5, sigma_max=1)


def test_edm_precond_keeps_its_state_dict_keys():
    D = EDMPrecond(nn.Linear(2, 2), sigma_data=0.5)
    assert sorted(D.state_dict()) == ["backbone.bias", "backbone.weight"]
    assert sorted(iDDPMPrecond(nn.Linear(2, 4)).state_dict()) == ["backbone.bias", "backbone.weight"]  # u: derived
