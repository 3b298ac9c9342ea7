"""Fine-tuning a Stable Diffusion folder: experiments/musicscore_sd_tiny.yaml through `diffscore fit` on latents of
synthetic score pages, then the checkpoint samples, evaluates (FID-k on the test captions) and resumes; the
module trains the U-Net only, with SD's own loss and caption dropout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffscore.core.discrete_ddpm import ddpm_loss
from diffscore.data.synthetic_scores import write_synthetic_musicscore
from diffscore.lit.modules.stable_diffusion import StableDiffusionModule
from diffscore.loading.open import open_model
from tests.conftest import REPO, run_cli
from tests.sd_files import LATENT_SIZE, VAE_SCALE, one_thread, write_sd_folder

TINY_SD = str(REPO / "experiments" / "musicscore_sd_tiny.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(folder, latents, the run's last.ckpt after 3 steps of `diffscore fit` on the tiny config)."""
    root = tmp_path_factory.mktemp("sd_fit")
    folder = write_sd_folder(root / "sd", seed=4)
    pages = write_synthetic_musicscore(root / "pages", "400", {"train": 8, "val": 2, "test": 2}, page_width=64)
    latents = root / "latents.zip"
    side = str(LATENT_SIZE * VAE_SCALE)
    assert run_cli(["dataset", "--source", pages, "--dest", latents, "--encode", folder, "--resolution", side]) == 0
    args = ["fit", "--config", TINY_SD, f"--model.init_args.pretrained={folder}", f"--data.init_args.path={latents}"]
    args += [f"--trainer.default_root_dir={root / 'runs'}", f"--trainer.logger.init_args.save_dir={root / 'runs'}"]
    args += ["--trainer.max_steps=3", "--trainer.val_check_interval=3", "--data.init_args.batch_size=4", *QUIET]
    with one_thread():
        assert run_cli(args) == 0
    (ckpt,) = (root / "runs").glob("**/checkpoints/last.ckpt")
    return folder, latents, ckpt, args


def test_the_checkpoint_is_the_folder_with_fine_tuned_unet_weights(run):
    folder, _, ckpt, _ = run
    tuned, base = open_model(ckpt), open_model(folder)
    assert tuned.kind == "diffscore" and tuned.decoder is not None and tuned.text_conditioned
    assert tuned.step == 3 and tuned.defaults.steps == 8
    unet, text = tuned.backbone.unet.state_dict(), tuned.backbone.text_encoder.state_dict()
    assert any(not torch.equal(v, base.backbone.unet.state_dict()[k]) for k, v in unet.items())
    assert all(torch.equal(v, base.backbone.text_encoder.state_dict()[k]) for k, v in text.items())
    assert all(
        torch.equal(a, b) for a, b in zip(tuned.decoder.state_dict().values(), base.decoder.state_dict().values())
    )


def test_the_checkpoint_samples_evaluates_and_resumes(run, tmp_path, random_inception):
    folder, latents, ckpt, args = run
    out = tmp_path / "s.npz"
    prompt = ["--prompt", "a music score, instrumentation is violin", "--guidance", "4"]
    with one_thread():
        assert (
            run_cli(["sample", "--ckpt_path", ckpt, "--out", out, "--num_samples", "2", "--steps", "2", *prompt]) == 0
        )
    data = np.load(out)
    assert data["samples"].shape == (2, 3, LATENT_SIZE * VAE_SCALE, LATENT_SIZE * VAE_SCALE)
    assert data["latents"].shape == data["noise"].shape == (2, 4, LATENT_SIZE, LATENT_SIZE)
    result = tmp_path / "eval.json"
    evaluate = ["evaluate", "--ckpt_path", ckpt, "--metrics", "fid_k", "--fid_k", "[2]", "--prompts", "test"]
    evaluate += ["--num_samples", "2", "--steps", "2", "--guidance", "4", "--inception_weights", random_inception]
    with one_thread():
        assert run_cli([*evaluate, "--out", result]) == 0
    assert json.loads(result.read_text())["runs"][0]["fid_2"] > 0
    with one_thread():
        assert run_cli([*[a for a in args if "max_steps" not in a], "--trainer.max_steps=5", "--ckpt_path", ckpt]) == 0
    assert open_model(ckpt).step == 5  # continued in the same run folder


def test_training_moves_the_unet_only_with_sds_loss_and_caption_dropout(run):
    folder = run[0]
    module = StableDiffusionModule(pretrained=str(folder), caption_dropout=0.5)
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 4, LATENT_SIZE, LATENT_SIZE), torch.randn(4, 4, LATENT_SIZE, LATENT_SIZE)
    sigma = module.sigma_law(4)
    assert all(bool((module.denoiser.sigmas == s).any()) for s in sigma)  # trained levels only
    captions = ["a music score"] * 4
    with one_thread():
        module._loss(x0, sigma, noise, captions).mean().backward()
    assert all(p.grad is not None for p in module.backbone.unet.parameters())
    assert all(p.grad is None for p in module.backbone.text_encoder.parameters())
    assert not any(p.requires_grad for p in module.sampler().decoder.parameters())
    dropped = [c for _ in range(200) for c in module._drop_captions(captions)]
    assert 0.4 < dropped.count("") / len(dropped) < 0.6
    with torch.no_grad(), one_thread():
        expected = ddpm_loss(module.denoiser, x0, sigma, noise, captions)
        torch.testing.assert_close(module._fixed_sigma_loss(x0, sigma, noise, captions), expected)
