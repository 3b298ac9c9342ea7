"""Latent data for Stable Diffusion: `diffscore dataset --encode` on synthetic MusicScore pages writes what the
VAE encodes (checked against encode_latent_stats of the stored images), with the pages' captions and splits;
LatentDataModule draws scaled latents from it; teleportation and `probe gaussian` run on it in latent space."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from diffscore.data.latents import encode_latent_stats, sample_latents
from diffscore.data.synthetic_scores import write_synthetic_musicscore
from diffscore.lit.datamodules.latents import LatentDataModule
from diffscore.lit.datamodules.musicscore import MusicScoreDataModule
from diffscore.loading.stable_diffusion import read_vae
from tests.conftest import run_cli
from tests.fixtures import random_images, write_dataset
from tests.sd_files import LATENT_SIZE, SCALING_FACTOR, VAE_SCALE, write_sd_folder

PAGES = {"train": 6, "val": 2, "test": 2}
SIDE = LATENT_SIZE * VAE_SCALE  # 16 x 16 pages


@pytest.fixture(scope="module")
def sd_data(tmp_path_factory):
    """(SD folder, MusicScore scale folder, latent ZIP written by `diffscore dataset --encode`)."""
    root = tmp_path_factory.mktemp("sd_data")
    folder = write_sd_folder(root / "sd", seed=2)
    scale_dir = write_synthetic_musicscore(root / "pages", "400", PAGES, page_width=64, seed=1)
    out = root / "latents.zip"
    args = ["dataset", "--source", scale_dir, "--dest", out, "--encode", folder, "--resolution", str(SIDE)]
    assert run_cli([*args, "--batch_size", "3"]) == 0
    return folder, scale_dir, out


def test_encode_writes_the_posterior_of_each_page_with_its_caption_and_split(sd_data):
    folder, scale_dir, out = sd_data
    with zipfile.ZipFile(out) as zf:
        meta = json.loads(zf.read("dataset.json"))
        names = sorted(zf.namelist())
        stats = np.load(zf.open("00000/img-mean-std-00000007.npy"))
    total = sum(PAGES.values())
    assert meta["count"] == total and meta["latent_shape"] == [4, LATENT_SIZE, LATENT_SIZE]
    assert meta["scaling_factor"] == SCALING_FACTOR and meta["image_shape"] == [3, SIDE, SIDE]
    assert len([n for n in names if n.endswith(".npy")]) == len([n for n in names if n.endswith(".png")]) == total
    splits = [s for _, s in meta["splits"]]
    assert splits == ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    pages = MusicScoreDataModule(str(scale_dir), resolution=SIDE, batch_size=2)
    expected = [c for split in ("train", "val", "test") for c in pages.captions(split)]
    assert [c for _, c in meta["captions"]] == expected
    # member 7 is the second val page: its statistics are the VAE's posterior of that page (gray -> RGB)
    page = pages.datasets["val"][1][0].to(torch.float32).expand(3, -1, -1) / 127.5 - 1
    vae, _, _ = read_vae(folder)
    reference = encode_latent_stats(vae, page[None])[0]
    assert stats.shape == (8, LATENT_SIZE, LATENT_SIZE) and stats.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(stats), reference, rtol=1e-5, atol=1e-6)


def test_the_data_module_draws_scaled_latents_at_load_time(sd_data):
    _, _, out = sd_data
    dm = LatentDataModule(str(out), batch_size=6)
    assert dm.data_shape == (4, LATENT_SIZE, LATENT_SIZE) and len(dm.captions("test")) == 2
    stats, captions = next(iter(torch.utils.data.DataLoader(dm.dataset("train"), batch_size=6)))
    assert stats.shape == (6, 8, LATENT_SIZE, LATENT_SIZE) and list(captions) == dm.captions("train")
    torch.manual_seed(3)
    latents, cond = dm.on_after_batch_transfer((stats, captions), 0)
    torch.manual_seed(3)
    torch.testing.assert_close(latents, sample_latents(stats, SCALING_FACTOR), rtol=0, atol=0)
    assert cond == captions
    images = dm.images("test")
    assert images.shape == (2, 3, LATENT_SIZE * VAE_SCALE, LATENT_SIZE * VAE_SCALE) and images.min() >= -1
    channels = images.unbind(1)  # the grayscale pages went in as three equal channels
    assert torch.equal(channels[0], channels[1]) and torch.equal(channels[1], channels[2])


def test_teleport_and_probe_gaussian_run_in_latent_space(sd_data, tmp_path, capsys):
    folder, scale_dir, out = sd_data
    base = ["sample", "--ckpt_path", folder, "--num_samples", "2", "--steps", "4", "--accelerator", "cpu"]
    assert run_cli([*base, "--out", tmp_path / "plain.npz"]) == 0
    teleport = ["--teleport.skip", "2", "--teleport.data", out, "--teleport.gaussian", tmp_path / "g.pt"]
    assert run_cli([*base, "--out", tmp_path / "t.npz", *teleport]) == 0
    assert "teleporting to sigma" in capsys.readouterr().out
    plain, jumped = np.load(tmp_path / "plain.npz"), np.load(tmp_path / "t.npz")
    assert (
        jumped["latents"].shape == plain["latents"].shape and np.abs(jumped["latents"] - plain["latents"]).max() > 1e-3
    )
    probe = ["probe", "gaussian", "--ckpt_path", folder, "--data", out, "--num_points", "4", "--gmm_components", "[2]"]
    assert run_cli(probe) == 0
    assert "gaussian" in capsys.readouterr().out.lower()
    pixels = write_dataset(tmp_path / "pixels", random_images(3, SIDE))  # pixels for a latent model: one line
    assert run_cli([*base, "--out", tmp_path / "x.npz", "--teleport.skip", "1", "--teleport.data", pixels]) != 0
    assert "pass a latent dataset of its VAE" in capsys.readouterr().err


def test_probe_ntk_runs_on_the_unet_in_its_own_preconditioning(sd_data, tmp_path):
    """The NTK probe's regression model is F of the denoiser's own coefficients: for the discrete-DDPM U-Net,
    c_out^2 mean (F - y)^2 is the denoising error mean (D - x0)^2 at every sigma (the identity the probe rests
    on), and `probe ntk` measures the folder on its latent data end to end."""
    from diffscore.loading.open import open_model
    from diffscore.probes.ntk import BackboneOutput, regression_target

    folder, scale_dir, out = sd_data
    denoiser = open_model(folder).network
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, LATENT_SIZE, LATENT_SIZE, generator=g)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        f = BackboneOutput(denoiser)(x, sigma).double()
        error = (denoiser(x, sigma).double() - x0.double()).flatten(1).square().mean(1)
    c_out = denoiser.coefficients(sigma.double())[1]
    y = regression_target(x, sigma, x0, denoiser.coefficients)
    torch.testing.assert_close(c_out**2 * (f - y).square().mean(1), error, rtol=1e-4, atol=1e-7)
    args = ["probe", "ntk", "--ckpt_path", folder, "--data", out, "--out", tmp_path / "ntk"]
    assert run_cli([*args, "--num_points", "2", "--num_kernel_points", "4", "--num_projections", "1"]) == 0
    result = json.loads((tmp_path / "ntk" / "ntk.json").read_text())
    assert np.isfinite(result["ntk/heldout_loss"]) and result["ntk/heldout_loss"] > 0
