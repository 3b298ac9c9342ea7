"""DisBack and Diff-Instruct on a latent, text-conditioned teacher: a tiny random Stable Diffusion folder through
experiments/disback_sd.yaml on the CPU; the one-step generator's checkpoint samples decoded images; captions come
from the teacher's data, or are the empty caption."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from diffscore.core.discrete_ddpm import DiscreteDDPMPrecond
from diffscore.data.latent_dataset import write_latents
from diffscore.lit.modules.disback import DisBackModule, fingerprint, teacher_captions
from diffscore.loading.open import open_model
from tests.conftest import REPO, run_cli
from tests.sd_files import LATENT_SIZE, VAE_SCALE, one_thread, write_sd_folder

DISBACK_SD = str(REPO / "experiments" / "disback_sd.yaml")
SHRINK = ["--trainer.accelerator=cpu", "--trainer.precision=32", "--trainer.enable_progress_bar=false"]
SHRINK += ["--model.init_args.num_path=2", "--model.init_args.record_interval=1"]
SHRINK += ["--model.init_args.backtrack_interval=1", "--model.init_args.generator_steps=2"]
SHRINK += ["--data.init_args.batch_size=2", "--data.init_args.batches_per_epoch=4"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return write_sd_folder(tmp_path_factory.mktemp("sd_teacher") / "sd", seed=8)


@pytest.mark.parametrize("method", ["disback", "diffinstruct"])
def test_both_methods_distil_a_stable_diffusion_teacher_end_to_end(teacher, tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", DISBACK_SD, f"--model.init_args.teacher_ckpt={teacher}", *SHRINK]
    with one_thread():
        assert run_cli([*args, f"--model.init_args.method={method}", "--model.init_args.sigma_init=14.6"]) == 0
    (ckpt,) = tmp_path.glob("runs/**/checkpoints/last.ckpt")
    model, base = open_model(ckpt), open_model(teacher)
    assert model.kind == "one-step" and isinstance(model.network, DiscreteDDPMPrecond) and model.decoder is not None
    assert model.sigma_init == 14.6 and fingerprint(model.network) != fingerprint(base.network)  # G was trained
    if method == "disback":
        assert len(list(tmp_path.glob("runs/**/disback_path/node_*.pt"))) == 2
    out = tmp_path / "s.npz"
    with one_thread():
        assert run_cli(["sample", "--ckpt_path", ckpt, "--out", out, "--num_samples", "2", "--prompt", "a score"]) == 0
    data = np.load(out)
    assert data["samples"].shape == (2, 3, LATENT_SIZE * VAE_SCALE, LATENT_SIZE * VAE_SCALE)
    assert data["latents"].shape == (2, 4, LATENT_SIZE, LATENT_SIZE)


def test_captions_come_from_the_option_the_teachers_data_or_are_empty(teacher, tmp_path):
    loaded = open_model(teacher)
    assert teacher_captions(loaded, None) == [""]  # a folder names no data: unconditional distillation
    assert teacher_captions(loaded, ["a music score"]) == ["a music score"]
    pages = [(torch.zeros(3, 16, 16, dtype=torch.uint8), None, f"a music score {i}", "train") for i in range(3)]
    path = tmp_path / "latents.zip"
    with zipfile.ZipFile(path, "w") as zf:
        meta = write_latents(zf.writestr, pages, lambda x: torch.rand(len(x), 8, 8, 8), batch_size=3)
        zf.writestr("dataset.json", json.dumps({**meta, "scaling_factor": 0.3}))
    loaded.data_config = {"class_path": "diffscore.lit.datamodules.LatentDataModule", "init_args": {"path": str(path)}}
    assert teacher_captions(loaded, None) == [f"a music score {i}" for i in range(3)]
    module = DisBackModule(str(teacher), method="diffinstruct", captions=["x", "y"], generator_steps=1)
    _, sigma, _, cond = module._noise(64)
    assert set(cond) == {"x", "y"}
    assert bool((sigma >= module.teacher.sigma_min).all() and (sigma <= module.teacher.sigma_max).all())
