import math

import pytest
import torch

from diffscore.core.gaussian import GaussianDenoiser
from diffscore.core.samplers import SAMPLERS, dpmpp_2m, euler, get_sampler, heun, nfe, unipc
from diffscore.core.schedules import karras_sigmas


def gaussian(dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    cov = 0.1 * A @ A.T + 0.01 * torch.eye(dim, dtype=torch.float64)
    mean = 0.3 * torch.randn(dim, generator=g, dtype=torch.float64)
    return GaussianDenoiser(mean, cov)


def start(n=64, dim=4, sigma_max=80.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) * sigma_max


def test_heun_matches_closed_form_pf_ode():
    gauss = gaussian()
    x_T = start()
    exact = gauss.pf_ode(x_T, 80.0, 0.0)
    out = heun(gauss, x_T, karras_sigmas(512))
    # What is left is the final Euler step sigma_min -> 0 (x -> D(x; 0.002)), an O(sigma_min^2) effect:
    assert (out - exact).abs().max().item() < 5e-4
    # and the discretisation error itself falls as N^-2 (1e-4 at N = 512, 2.5e-5 at N = 1024):
    assert (out - gauss(gauss.pf_ode(x_T, 80.0, 0.002), 0.002)).abs().max().item() < 2e-4
    # EDM's 18-step default is within a few percent (relative RMS, measured 4.6%) on this Gaussian
    out18 = heun(gauss, x_T, karras_sigmas(18))
    rel_rms = ((out18 - exact).pow(2).mean() / (exact - gauss.mean).pow(2).mean()).sqrt().item()
    assert rel_rms < 0.06


def test_convergence_orders_euler_first_heun_second():
    """Halving the step size divides the error by ~2 for Euler and ~4 for Heun.

    The grids stop at sigma_min = 0.5 and then take the sampler's final step to 0, which for both samplers
    is the Euler step x -> D(x; 0.5); so the reference is D(exact PF-ODE solution at 0.5; 0.5).
    """
    gauss = gaussian()
    x_T = start()
    ref = gauss(gauss.pf_ode(x_T, 80.0, 0.5), 0.5)
    errs = {}
    for name, fn in (("euler", euler), ("heun", heun)):
        errs[name] = [
            (fn(gauss, x_T, karras_sigmas(n + 1, sigma_min=0.5)) - ref).abs().max().item() for n in (16, 32, 64)
        ]
    e1, e2 = errs["euler"], errs["heun"]
    assert 1.6 < e1[0] / e1[1] < 2.5 and 1.6 < e1[1] / e1[2] < 2.5, e1
    assert 3.0 < e2[0] / e2[1] < 5.0 and 3.0 < e2[1] / e2[2] < 5.0, e2


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma, cond=None, aug_label=None):
        self.calls += 1
        assert sigma.shape == (x.shape[0],)
        return self.fn(x, sigma)


@pytest.mark.parametrize("n", [1, 2, 18, 40])
def test_nfe_matches_counted_calls(n):
    gauss = gaussian()
    for name in SAMPLERS:
        counter = Counter(gauss)
        get_sampler(name)(counter, start(n=3), karras_sigmas(n))
        assert counter.calls == nfe(name, n)
    counter = Counter(gauss)
    heun(counter, start(n=3), karras_sigmas(n), s_churn=40, s_min=0.05, s_max=50, generator=torch.Generator())
    assert counter.calls == nfe("heun", n)
    assert nfe("heun", 18) == 35 and nfe("heun", 40) == 79 and nfe("euler", 18) == 18


def test_input_not_modified_and_churn_reproducible():
    gauss = gaussian()
    x = start(n=8)
    x_copy = x.clone()

    def churned(seed):
        return heun(
            gauss,
            x,
            karras_sigmas(10),
            s_churn=40,
            s_min=0.05,
            s_max=50,
            s_noise=1.003,
            generator=torch.Generator().manual_seed(seed),
        )

    a, b, c = churned(3), churned(3), churned(4)
    euler(gauss, x, karras_sigmas(10))
    assert torch.equal(x, x_copy)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_churned_heun_samples_the_right_distribution():
    """Stochastic sampling (EDM Algorithm 2 with churn) still lands on N(mu, Sigma)."""
    gauss = gaussian(dim=2, seed=3)
    x_T = start(n=6000, dim=2, seed=5)
    out = heun(
        gauss,
        x_T,
        karras_sigmas(64),
        s_churn=30,
        s_min=0.05,
        s_max=50,
        generator=torch.Generator().manual_seed(0),
    )
    cov = gauss.eigvecs @ torch.diag(gauss.eigvals) @ gauss.eigvecs.T
    emp_cov = torch.cov(out.T)
    assert (out.mean(0) - gauss.mean).abs().max().item() < 4 * cov.diag().max().sqrt().item() / 6000**0.5
    assert (emp_cov - cov).abs().max().item() < 0.1 * cov.abs().max().item()


def test_bad_grids_and_names():
    gauss = gaussian()
    with pytest.raises(ValueError, match="end with 0"):
        heun(gauss, start(), torch.tensor([80.0, 1.0]))
    with pytest.raises(ValueError, match="at least 2"):
        euler(gauss, start(), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="unknown sampler"):
        nfe("dpm", 10)
    with pytest.raises(ValueError, match="num_steps"):
        nfe("heun", 0)


@pytest.mark.parametrize("fn", [dpmpp_2m, unipc])
def test_multistep_solvers_are_at_least_second_order(fn):
    gauss = gaussian()
    x_T = start()
    ref = gauss(gauss.pf_ode(x_T, 80.0, 0.5), 0.5)  # both end with x -> D(x; sigma_min), as Heun does
    errs = [(fn(gauss, x_T, karras_sigmas(n + 1, sigma_min=0.5)) - ref).abs().max().item() for n in (16, 32, 64)]
    assert errs[0] / errs[1] > 3.0 and errs[1] / errs[2] > 3.0, errs
    assert errs[2] < 1e-3


def test_samplers_agree_as_steps_grow():
    gauss = gaussian()
    x_T = start(n=16)

    def spread(n, names):
        outs = [SAMPLERS[name](gauss, x_T, karras_sigmas(n)) for name in names]
        return max((a - b).abs().max().item() for a in outs for b in outs)

    assert spread(400, SAMPLERS) < 0.05 * spread(12, SAMPLERS)  # Euler's first-order error dominates
    second_order = ["heun", "dpmpp_2m", "unipc"]
    assert spread(400, second_order) < 1e-3 < spread(12, second_order)


# ---------------------------------------------------------------------------------------------------------
# per-seed churn noise and discrete noise levels, as NVlabs/edm's generate.py and edm_sampler do
CHURN = dict(s_churn=40.0, s_min=0.05, s_max=10.0, s_noise=1.003)  # s_max < 80: the first steps have gamma = 0
DIM = 4


def lattice_round(levels: torch.Tensor):
    """round_sigma to the nearest of a fixed set of levels (an iDDPM-like denoiser), in the input's dtype."""

    def round_sigma(sigma):
        sigma = torch.as_tensor(sigma)
        idx = (sigma.reshape(-1, 1).double() - levels.view(1, -1)).abs().argmin(1)
        return levels[idx].to(sigma.dtype).reshape(sigma.shape)

    return round_sigma


LEVELS = torch.cat([torch.logspace(-3, math.log10(200.0), 60, dtype=torch.float64), torch.zeros(1)])


def seeded(seeds, sigma0):
    """generate.py's order: one generator per seed, the latents drawn from it first."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.stack([torch.randn(DIM, generator=g, dtype=torch.float64) for g in gens]) * sigma0
    return x, gens


def edm_reference(denoiser, seed, sigmas, s_churn, s_min, s_max, s_noise, round_sigma=None):
    """One sample, one step at a time, in the order of NVlabs/edm's edm_sampler with a per-seed generator:
    latents, then one randn per step (also where gamma = 0), t_hat rounded; no correction on the last step."""
    rnd = round_sigma or (lambda s: s)
    t = sigmas.tolist()
    N = len(t) - 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(DIM, generator=g, dtype=torch.float64) * t[0]

    def D(v, s):
        return denoiser(v[None], torch.tensor([s], dtype=torch.float32))[0]

    for i in range(N):
        t_cur, t_next = t[i], t[i + 1]
        gamma = min(s_churn / N, math.sqrt(2) - 1) if s_min <= t_cur <= s_max else 0.0
        t_hat = float(rnd(torch.tensor(t_cur + gamma * t_cur, dtype=torch.float64)))
        x_hat = x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * torch.randn(DIM, generator=g, dtype=torch.float64)
        d = (x_hat - D(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d
        if i < N - 1:
            d2 = (x_next - D(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


@pytest.mark.parametrize("rounded", [False, True])
def test_per_seed_churn_matches_an_independent_edm_loop(rounded):
    gauss = gaussian()
    round_sigma = lattice_round(LEVELS) if rounded else None
    sigmas = karras_sigmas(12, round_sigma=round_sigma)
    seeds = [3, 11, 12, 40, 7]
    x, gens = seeded(seeds, sigmas[0].item())
    out = heun(gauss, x, sigmas, **CHURN, generator=gens, round_sigma=round_sigma)
    for row, seed in zip(out, seeds):
        ref = edm_reference(gauss, seed, sigmas, **CHURN, round_sigma=round_sigma)
        torch.testing.assert_close(row, ref, rtol=1e-12, atol=1e-12)
    plain = heun(gauss, x, sigmas, generator=[torch.Generator().manual_seed(s) for s in seeds])
    assert (out - plain).abs().max() > 1e-3  # the churn did something


def diagonal_gaussian(x, sigma, cond=None, aug_label=None):
    """The exact denoiser of N(mu, diag(lam)), elementwise: no matmul whose rounding could depend on the batch."""
    mu = torch.tensor([0.3, -0.2, 0.0, 1.0], dtype=torch.float64)
    lam = torch.tensor([0.5, 0.1, 2.0, 0.01], dtype=torch.float64)
    s2 = sigma.to(torch.float64).view(-1, 1) ** 2
    return mu + lam / (lam + s2) * (x - mu)


def test_per_seed_churned_samples_do_not_depend_on_the_batch():
    gauss = diagonal_gaussian
    sigmas = karras_sigmas(10)
    seeds = list(range(100, 107))
    x, gens = seeded(seeds, 80.0)
    whole = heun(gauss, x, sigmas, **CHURN, generator=gens)
    parts = []
    for chunk in ([100], [101, 102, 103], [104, 105, 106]):
        xc, gc = seeded(chunk, 80.0)
        parts.append(heun(gauss, xc, sigmas, **CHURN, generator=gc))
    assert torch.equal(torch.cat(parts), whole)
    single = [heun(gauss, *seeded([s], 80.0)[:1], sigmas, **CHURN, generator=seeded([s], 80.0)[1]) for s in seeds]
    assert torch.equal(torch.cat(single), whole)


def test_churn_draws_once_per_step_and_nothing_without_churn():
    gauss = gaussian()
    sigmas = karras_sigmas(9)  # CHURN's s_max = 10: several steps have gamma = 0, and they still draw
    x, gens = seeded([5, 6], 80.0)
    before = [g.get_state() for g in gens]
    heun(gauss, x, sigmas, generator=gens)  # s_churn = 0
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, before))
    heun(gauss, x, sigmas, **CHURN, generator=gens)
    for seed, g in zip([5, 6], gens):
        ref = torch.Generator().manual_seed(seed)
        for _ in range(1 + 9):  # the latents, then one draw per step
            torch.randn(DIM, generator=ref, dtype=torch.float64)
        assert torch.equal(g.get_state(), ref.get_state())


def test_one_generator_still_works_and_bad_generator_lists_are_refused():
    gauss = gaussian()
    x = start(n=3)
    one = heun(gauss, x, karras_sigmas(6), **CHURN, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(one).all()
    with pytest.raises(ValueError, match="one torch.Generator per row"):
        heun(gauss, x, karras_sigmas(6), **CHURN, generator=[torch.Generator()] * 2)
    with pytest.raises(ValueError, match="one torch.Generator per row"):
        heun(gauss, x, karras_sigmas(6), **CHURN, generator=[torch.Generator(), torch.Generator(), 3])


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_round_sigma_only_evaluates_the_denoiser_on_its_levels(name):
    gauss = gaussian()
    round_sigma = lattice_round(LEVELS)
    levels = set(LEVELS.float().tolist())
    seen = []

    def recorder(x, sigma, cond=None, aug_label=None):
        seen.extend(sigma.tolist())
        return gauss(x, sigma)

    sigmas = karras_sigmas(15, round_sigma=round_sigma)
    kwargs = dict(CHURN, generator=torch.Generator().manual_seed(1)) if name == "heun" else {}
    get_sampler(name)(recorder, start(n=2), sigmas, round_sigma=round_sigma, **kwargs)
    assert seen and set(seen) <= levels
    if name == "heun":  # churned levels were rounded up to other levels than the grid's
        assert set(seen) - set(sigmas.float().tolist())
    with pytest.raises(ValueError, match="noise levels"):  # a grid off the levels is refused, not fixed
        get_sampler(name)(recorder, start(n=2), karras_sigmas(15), round_sigma=round_sigma)
