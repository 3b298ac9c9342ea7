"""NVlabs/edm2 network pickles as a LoadedModel (kind "edm2-pickle") for every --ckpt_path: `diffscore sample`
draws them seed for seed as EDM2's generate_images.py does (alone, guided by a second pickle, and guided only in a
noise interval), `convert` writes them as weights-only checkpoints, and files diffscore cannot sample are one line.

``generate_images_py`` is this test's own reading of generate_images.py (StackedRandomGenerator: each seed's noise,
then its class; edm_sampler: float32 Heun on Karras' grid, ``D_guide.lerp(D_main, w)``), run on the network
tests/loading/test_edm2_network.py checks against a float64 reference of EDM2's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffscore.loading.model import LoadedModel
from diffscore.loading.open import open_model
from tests.conftest import run_cli
from tests.edm2_files import encoder_record
from tests.loading.test_edm2_network import CFG, KWARGS, edm2_state, write
from tests.networks.test_edm2_unet import SIDE, EDM2Tensors, edm2_precond


def generate_images_py(net, seeds, num_steps, gnet=None, guidance=1.0, interval=None, label_dim=10):
    """NVlabs/edm2 generate_images.py with edm_sampler's defaults (float32, sigma 0.002..80, rho 7, no churn);
    ``interval`` (lo, hi]: guidance only there (Kynkaanniemi et al. 2024), the plain main network elsewhere."""
    gens = [torch.Generator().manual_seed(s % (1 << 32)) for s in seeds]
    noise = torch.stack([torch.randn(3, SIDE, SIDE, generator=g) for g in gens])
    labels = None
    if label_dim:
        labels = torch.eye(label_dim)[torch.stack([torch.randint(label_dim, (), generator=g) for g in gens])]

    def denoise(x, t):
        with torch.no_grad():
            d = net(x, t.expand(len(seeds)), labels)
            if guidance == 1 or (interval is not None and not interval[0] < float(t) <= interval[1]):
                return d
            return gnet(x, t.expand(len(seeds)), labels).lerp(d, guidance)

    i = torch.arange(num_steps, dtype=torch.float32)
    t = (80 ** (1 / 7) + i / (num_steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    t = torch.cat([t, torch.zeros(1)])
    x_next = noise * t[0]
    for k in range(num_steps):
        x_cur, t_cur, t_next = x_next, t[k], t[k + 1]
        d_cur = (x_cur - denoise(x_cur, t_cur)) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if k < num_steps - 1:
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * (x_next - denoise(x_next, t_next)) / t_next)
    return x_next.double()


def labels_of(label_dim):
    """EDM2's network takes one-hot labels; diffscore's EDM2Precond class indices."""
    return lambda net: lambda x, s, onehot: net(x, s, None if onehot is None else onehot.argmax(1))


def close(got, expected):
    """Equal up to float32 round-off of these untrained networks, whose samples reach magnitudes of hundreds."""
    torch.testing.assert_close(got, expected, atol=2e-5 * float(expected.abs().max()), rtol=1e-4)


def sample(tmp_path, path, name, *extra):
    out = tmp_path / name
    args = ["sample", "--ckpt_path", path, "--out", out, "--num_samples", "5", "--seed", "3", "--steps", "5"]
    assert run_cli([*args, "--batch_size", "2", *extra]) == 0
    return torch.from_numpy(np.load(out)["samples"]).double()


def test_open_model_reads_an_edm2_pickle_with_generate_images_defaults(tmp_path):
    model = open_model(write(tmp_path))
    assert isinstance(model, LoadedModel) and model.kind == "edm2-pickle"
    assert model.data_shape == (3, SIDE, SIDE) and model.label_dim == 10
    d = model.defaults
    assert (d.sampler, d.steps, d.sigma_min, d.sigma_max, d.rho) == ("heun", 32, 0.002, 80.0, 7.0)
    assert model.sampler().nfe == 63 and model.info["encoder"] == "StandardRGBEncoder"


def test_sample_of_an_edm2_pickle_is_generate_images_py_seed_for_seed(tmp_path):
    path = write(tmp_path)
    net = labels_of(10)(open_model(path).network)
    expected = generate_images_py(net, range(3, 8), 5)
    got = sample(tmp_path, path, "s.npz")
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(got, expected, atol=5e-4, rtol=1e-4)


def guide_pickle(tmp_path, label_dim=10, name="guide.pkl"):
    """A second EDM2 network of the same data (other weights; conditional or unconditional)."""
    cfg = dict(CFG, label_dim=label_dim)
    P = EDM2Tensors(7)
    x, sigma = torch.zeros(1, 3, SIDE, SIDE, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    edm2_precond(P, cfg, x, sigma, torch.zeros(1, label_dim, dtype=torch.float64) if label_dim else None)
    return write(tmp_path, P.state, dict(KWARGS, label_dim=label_dim), name=name)


@pytest.mark.parametrize("guide_labels", [10, 0])
def test_guidance_by_a_second_edm2_pickle_is_generate_images_py_seed_for_seed(tmp_path, guide_labels):
    """--guide GNET --guidance 1.7 (EDM2's autoguidance, or classifier-free guidance by an unconditional
    network when the guide has no labels), and the same restricted to --guidance_interval."""
    path, gpath = write(tmp_path), guide_pickle(tmp_path, guide_labels)
    net = labels_of(10)(open_model(path).network)
    gnet = labels_of(guide_labels)(open_model(gpath).network)
    if not guide_labels:
        gnet_plain = open_model(gpath).network
        gnet = lambda x, s, onehot: gnet_plain(x, s, None)  # noqa: E731
    expected = generate_images_py(net, range(3, 8), 5, gnet, 1.7)
    got = sample(tmp_path, path, "g.npz", "--guide", gpath, "--guidance", "1.7")
    plain = generate_images_py(net, range(3, 8), 5)
    assert (expected - plain).abs().max() > 1e-2  # guidance changes the samples
    close(got, expected)
    full = expected
    interval = (0.5, 10.0)  # the 5-step grid has levels 80, 10.9, 0.87, 0.036, 0.002: guided at 0.87 only
    expected = generate_images_py(net, range(3, 8), 5, gnet, 1.7, interval)
    got = sample(tmp_path, path, "i.npz", "--guide", gpath, "--guidance", "1.7", "--guidance_interval", "[0.5, 10]")
    assert (expected - plain).abs().max() > 1e-1 and (expected - full).abs().max() > 1e-1
    close(got, expected)


def test_a_guide_of_other_data_is_one_line(tmp_path, capsys):
    path = write(tmp_path)
    five = guide_pickle(tmp_path, 5, "five.pkl")
    out = tmp_path / "s.npz"
    args = ["sample", "--ckpt_path", path, "--out", out, "--num_samples", "2", "--steps", "2", "--guidance", "2"]
    assert run_cli([*args, "--guide", five]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "5 classes" in err and "10" in err, err
    assert not out.exists()


def test_convert_writes_a_weights_only_checkpoint_that_samples_as_the_pickle(tmp_path, capsys):
    path = write(tmp_path)
    ckpt = tmp_path / "net.ckpt"
    assert run_cli(["convert", "--src", path, "--out", ckpt]) == 0
    assert "sampler heun, 32 steps" in capsys.readouterr().out
    raw = torch.load(ckpt, weights_only=True)
    assert raw["hyper_parameters"]["precond"] == {"name": "edm2", "kwargs": {"logvar_channels": 128}}
    assert open_model(ckpt).defaults.steps == 32
    torch.testing.assert_close(sample(tmp_path, ckpt, "b.npz"), sample(tmp_path, path, "a.npz"), rtol=0, atol=0)


def test_a_latent_edm2_model_is_refused_naming_stable_diffusion(tmp_path, capsys):
    """As EDM2 pickles it (numpy scale/bias: refused while reading) and without the arrays (refused once its
    encoder is seen); either way one line naming the file and the Stable Diffusion work's VAE support."""
    with_arrays = write(tmp_path, encoder=encoder_record("StabilityVAEEncoder"), name="latent.pkl")
    vae = encoder_record("StabilityVAEEncoder")
    del vae.scale, vae.bias
    bare = write(tmp_path, encoder=vae, name="latent_bare.pkl")
    for path in (with_arrays, bare):
        assert run_cli(["sample", "--ckpt_path", path, "--out", tmp_path / "s.npz", "--num_samples", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and "Stable Diffusion" in err, err


@pytest.mark.parametrize(
    "change, needle",
    [
        ("missing", "unet.out_gain"),
        ("extra", "unet.surplus"),
        ("version", "model_channels_v3"),
    ],
)
def test_bad_edm2_pickles_are_one_line(tmp_path, capsys, change, needle):
    state, kwargs = edm2_state(), dict(KWARGS)
    if change == "missing":
        del state["unet.out_gain"]
    elif change == "extra":
        state["unet.surplus"] = torch.zeros(3)
    else:  # a Precond of another EDM2 version: a keyword argument this one does not know
        kwargs["model_channels_v3"] = 16
    path = write(tmp_path, state, kwargs, name="bad.pkl")
    assert run_cli(["sample", "--ckpt_path", path, "--out", tmp_path / "s.npz", "--num_samples", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and needle in err, err


def test_evaluate_takes_a_guide_and_records_it(tiny_ckpt, tmp_path):
    """`evaluate --guide` (here the model itself: D_g + w (D - D_g) = D, so the metrics equal the unguided run's,
    which also shows an unconditional model may be guided by a network) and its summary says how it guided."""
    args = ["evaluate", "--ckpt_path", tiny_ckpt, "--num_samples", "8", "--steps", "2", "--metrics", "fd_digits"]
    plain, guided = tmp_path / "p.json", tmp_path / "g.json"
    assert run_cli([*args, "--out", plain]) == 0
    extra = ["--guide", tiny_ckpt, "--guidance", "1.5", "--guidance_interval", "[0.1, 50]", "--out", guided]
    assert run_cli([*args, *extra]) == 0
    p, g = json.loads(plain.read_text()), json.loads(guided.read_text())
    assert "guide" not in p and g["guidance"] == 1.5 and g["guide"] == str(tiny_ckpt)
    assert g["guidance_interval"] == [0.1, 50] and g["runs"][0]["fd_digits"] == p["runs"][0]["fd_digits"]


def test_an_edm2_pickle_is_a_disback_teacher(tmp_path):
    from diffscore.core.precond_edm2 import EDM2Precond
    from diffscore.lit.modules import DisBackModule

    path = write(tmp_path)
    student = DisBackModule(teacher_ckpt=str(path), num_path=2, record_interval=1, backtrack_interval=1)
    teacher = open_model(path).network
    x, sigma, labels = torch.randn(2, 3, SIDE, SIDE), torch.tensor([0.5, 2.0]), torch.tensor([1, 7])
    with torch.no_grad():
        torch.testing.assert_close(student.teacher(x, sigma, labels), teacher(x, sigma, labels), rtol=0, atol=0)
    assert isinstance(student.generator, EDM2Precond) and student.teacher_data_config is None
