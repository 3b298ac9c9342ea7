"""NVlabs/edm network pickles as diffscore models: written here in EDM's format (tests/edm_files.py), read without
running their code, wired to the right preconditioning, sampled seed for seed as EDM's generate.py samples, and
converted to a checkpoint that loads with weights_only=True and samples the same.

The references below are this test's own reading of EDM's Table 1 (the preconditionings) and of generate.py's
procedure (per-seed generators: latents, then class labels, then the float64 sampler's churn noise, sigma clipped to
the network's range and rounded to its levels), run on the network the pickle holds.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffscore.errors import DiffscoreError
from diffscore.lit.datamodules.from_file import model_datamodule
from diffscore.loading.open import open_model
from diffscore.sampling.options import SamplingOptions
from tests.conftest import run_cli
from tests.edm_files import write_edm_network
from tests.loading.test_edm_dhariwal import CASES as ADM_CASES
from tests.loading.test_edm_dhariwal import edm_state, random_maker
from tests.loading.test_edm_song import DDPMPP, SIDE, edm_net, song_unet

DDPMPP_COND = dict(DDPMPP, label_dim=10)
PRECONDS = {  # EDM's class, its init kwargs, and the sampler range EDM's sampler clips [0.002, 80] to
    "EDMPrecond": dict(sigma_data=0.5),
    "VPPrecond": dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5),
    "VEPrecond": dict(sigma_min=0.02, sigma_max=100),
}


def song_pickle(tmp_path, precond="EDMPrecond", cfg=DDPMPP, name="net.pkl"):
    """An EDM pickle of ``precond`` around a small SongUNet; returns (path, EDM's float32 state as float64)."""
    P = edm_net(cfg)[0]
    state32 = {k: v.float() for k, v in P.state.items()}
    kwargs = dict(img_resolution=SIDE, img_channels=3, label_dim=cfg.get("label_dim", 0), **PRECONDS[precond])
    path = write_edm_network(tmp_path / name, precond, kwargs, "SongUNet", cfg, state32)
    P.state = {k: v.double() for k, v in state32.items()}
    return path, P


def table1(precond: str, sigma: torch.Tensor) -> tuple:
    """(c_skip, c_out, c_in, c_noise) of Karras et al. 2022, Table 1, in float64."""
    s = sigma.double()
    if precond == "EDMPrecond":
        sd = 0.5
        return sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (sd**2 + s**2).sqrt(), s.log() / 4
    if precond == "VPPrecond":
        beta_d, beta_min = 19.9, 0.1
        t = ((beta_min**2 + 2 * beta_d * (1 + s**2).log()).sqrt() - beta_min) / beta_d  # sigma^-1(sigma)
        return torch.ones_like(s), -s, 1 / (s**2 + 1).sqrt(), 999 * t
    return torch.ones_like(s), s, torch.ones_like(s), (0.5 * s).log()  # VE


@pytest.mark.parametrize("precond", list(PRECONDS))
def test_an_edm_pickle_denoises_as_its_preconditioning_around_the_network(tmp_path, precond):
    path, P = song_pickle(tmp_path, precond)
    model = open_model(path)
    assert model.kind == "edm-pickle" and not model.network.training
    assert model.settings["precond"]["name"] == {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}[precond]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, SIDE, SIDE, generator=g)
    sigma = torch.tensor([0.05, 1.0, 20.0])
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) if c.ndim else c for c in table1(precond, sigma))
    with torch.no_grad():
        got = model.network(x, sigma)
        F_x = song_unet(P, DDPMPP, c_in * x.double(), c_noise.flatten().float().double())
    expected = c_skip * x.double() + c_out * F_x
    # fp32 round-off of F is amplified by |c_out| (VP: sigma, 20 here): compare in F's units
    scale = c_out.abs().clamp_min(1.0) if c_out.ndim else max(abs(float(c_out)), 1.0)
    torch.testing.assert_close(got.double() / scale, expected / scale, atol=2e-4, rtol=1e-4)


def test_sampler_range_is_clipped_to_the_network_as_edm_does(tmp_path):
    ve = open_model(song_pickle(tmp_path, "VEPrecond")[0]).sampler(SamplingOptions(steps=18)).sigmas
    assert float(ve[0]) == pytest.approx(80.0) and float(ve[-2]) == pytest.approx(0.02)
    edm = open_model(song_pickle(tmp_path, "EDMPrecond", name="edm.pkl")[0])
    assert float(edm.sampler().sigmas[-2]) == pytest.approx(0.002) and edm.defaults.steps == 18


def generate_py(model, seeds, num_steps, s_churn=0.0, s_min=0.0, s_max=math.inf, s_noise=1.0):
    """NVlabs/edm generate.py, as this test reads it, on ``model.network`` (the network EDM would call)."""
    net = model.network
    gens = [torch.Generator().manual_seed(s % (1 << 32)) for s in seeds]
    latents = torch.stack([torch.randn(model.data_shape, generator=g) for g in gens])  # float32
    labels = None
    if model.label_dim:
        index = torch.stack([torch.randint(model.label_dim, (), generator=g) for g in gens])
        labels = torch.eye(model.label_dim)[index]  # one-hot, as EDM passes them
    sigma_min, sigma_max = max(0.002, net.sigma_min), min(80.0, net.sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / 7) + i / (num_steps - 1) * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7
    t = torch.cat([net.round_sigma(t), torch.zeros(1, dtype=torch.float64)])
    x_next = latents.double() * t[0]
    for k in range(num_steps):
        x_cur, t_cur, t_next = x_next, t[k], t[k + 1]
        gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if s_min <= t_cur <= s_max else 0.0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        eps = torch.stack([torch.randn(x_cur.shape[1:], generator=g, dtype=torch.float64) for g in gens])
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * s_noise * eps
        with torch.no_grad():
            denoised = net(x_hat.float(), t_hat.float().expand(len(seeds)), labels).double()
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if k < num_steps - 1:
            with torch.no_grad():
                denoised = net(x_next.float(), t_next.float().expand(len(seeds)), labels).double()
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * (x_next - denoised) / t_next)
    return x_next


@pytest.mark.parametrize("churn", [False, True])
def test_diffscore_sample_of_an_edm_pickle_is_generate_py_seed_for_seed(tmp_path, churn):
    """Class-conditional, so the labels are drawn from each seed's generator after its latents; with churn, the
    churn noise too (EDM's ImageNet-64 settings)."""
    path, _ = song_pickle(tmp_path, "EDMPrecond", DDPMPP_COND)
    kwargs = dict(s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003) if churn else {}
    out = tmp_path / "s.npz"
    args = ["sample", "--ckpt_path", path, "--out", out, "--num_samples", "5", "--seed", "3", "--steps", "6"]
    assert run_cli([*args, "--batch_size", "2", "--sampler_kwargs", json.dumps(kwargs)]) == 0
    expected = generate_py(open_model(path), range(3, 8), 6, **kwargs)
    got = torch.from_numpy(np.load(out)["samples"]).double()
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(got, expected, atol=5e-4, rtol=1e-4)
    if churn:  # a different stream would be off by the churn noise itself
        plain = generate_py(open_model(path), range(3, 8), 6)
        assert (plain - expected).abs().max() > 1e-2


def test_iddpm_baseline_with_a_learned_variance_samples_on_its_levels(tmp_path):
    """iDDPMPrecond around a DhariwalUNet with 2C outputs (EDM's baseline-imagenet-64x64-cond-adm.pkl kind)."""
    from diffscore.core.precond import iddpm_u

    kw = dict(ADM_CASES["learned variance"])
    state = edm_state(kw, random_maker())
    precond = dict(img_resolution=16, img_channels=3, label_dim=5, C_1=0.001, C_2=0.008, M=1000)
    extra = {"u": iddpm_u()}
    path = write_edm_network(tmp_path / "b.pkl", "iDDPMPrecond", precond, "DhariwalUNet", kw, state, extra)
    model = open_model(path)
    levels = set(iddpm_u().tolist())
    assert all(float(s) in levels for s in model.sampler(SamplingOptions(steps=8)).sigmas[:-1])
    assert model.defaults.steps == 256 and model.defaults.sampler_kwargs["s_churn"] == 40  # EDM's ImageNet
    x = generate_py(model, [0, 1], 4)
    got = model.sampler(SamplingOptions(steps=4, sampler_kwargs={})).generate([0, 1])
    torch.testing.assert_close(got.double(), x, atol=5e-4, rtol=1e-4)
    bad = {"u": iddpm_u() * 1.01}
    tampered = write_edm_network(tmp_path / "t.pkl", "iDDPMPrecond", precond, "DhariwalUNet", kw, state, bad)
    with pytest.raises(DiffscoreError, match="noise table u"):
        open_model(tampered)


def test_the_code_a_pickle_embeds_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    src = f"open({str(marker)!r}, 'w').write('ran')\n"
    P = edm_net(DDPMPP)[0]
    path = write_edm_network(
        tmp_path / "evil.pkl",
        "EDMPrecond",
        dict(img_resolution=SIDE, img_channels=3),
        "SongUNet",
        DDPMPP,
        {k: v.float() for k, v in P.state.items()},
        module_src=src,
    )
    assert (
        run_cli(["sample", "--ckpt_path", path, "--out", tmp_path / "s.npz", "--num_samples", "2", "--steps", "2"]) == 0
    )
    assert not marker.exists()


def test_convert_writes_a_weights_only_checkpoint_that_samples_as_the_pickle(tmp_path, capsys):
    path, _ = song_pickle(tmp_path, "VPPrecond", DDPMPP_COND)
    ckpt = tmp_path / "net.ckpt"
    assert run_cli(["convert", "--src", path, "--out", ckpt]) == 0
    assert "wrote" in capsys.readouterr().out
    raw = torch.load(ckpt, weights_only=True)
    assert raw["hyper_parameters"]["precond"]["name"] == "vp"
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    for src, out in ((path, a), (ckpt, b)):
        assert run_cli(["sample", "--ckpt_path", src, "--out", out, "--num_samples", "3", "--steps", "4"]) == 0
    np.testing.assert_array_equal(np.load(a)["samples"], np.load(b)["samples"])
    assert run_cli(["convert", "--src", path, "--out", ckpt]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def test_imported_models_have_no_data_and_say_what_to_pass(tmp_path, capsys):
    path, _ = song_pickle(tmp_path)
    assert model_datamodule(open_model(path)) is None
    code = run_cli(["sample", "--ckpt_path", path, "--out", tmp_path / "s.npz", "--teleport.skip", "2"])
    assert code == 2 and "--teleport.gaussian" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, needle",
    [(b"", "not|empty|truncated"), (b"\x80\x04\x95garbage", "truncated|not"), (b"PK\x03\x04zip", "torch|not")],
)
def test_broken_pickles_are_one_line_errors(tmp_path, capsys, content, needle):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(content)
    assert run_cli(["sample", "--ckpt_path", bad, "--out", tmp_path / "s.npz"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err, err


def test_fit_starts_from_the_weights_of_init_from(tmp_path, monkeypatch, capsys, tiny_ckpt):
    """`fit --init_from FILE` (EDM's --transfer): the source's EMA weights, when the config's backbone matches;
    an EDM pickle of another network is refused in one line."""
    from tests.conftest import QUICKSTART, TINY

    monkeypatch.chdir(tmp_path)
    frozen = ["--model.init_args.optimizer.init_args.lr=0", "--trainer.max_steps=1", "--trainer.logger=false"]
    assert run_cli(["fit", "--config", QUICKSTART, *TINY, *frozen, "--init_from", tiny_ckpt]) == 0
    (last,) = tmp_path.glob("runs/**/last.ckpt")
    raw = torch.load(last, weights_only=True)["current_model_state"]  # the raw weights after one step at lr 0
    source = open_model(tiny_ckpt).network.state_dict()
    for key in source:
        torch.testing.assert_close(raw[f"denoiser.{key}"], source[key], rtol=0, atol=0)
    path, _ = song_pickle(tmp_path)
    capsys.readouterr()
    assert run_cli(["fit", "--config", QUICKSTART, *TINY, *frozen, "--init_from", path]) == 2
    assert "is not the config's backbone" in capsys.readouterr().err


def test_an_edm_pickle_is_a_disback_teacher(tmp_path):
    from diffscore.lit.modules import DisBackModule

    path, _ = song_pickle(tmp_path)
    student = DisBackModule(teacher_ckpt=str(path), num_path=2, record_interval=1, backtrack_interval=1)
    teacher = open_model(path)
    x, sigma = torch.randn(2, 3, SIDE, SIDE), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(student.teacher(x, sigma), teacher.network(x, sigma), rtol=0, atol=0)
    assert student.teacher_data_config is None
