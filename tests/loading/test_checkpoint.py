"""Opening model files: checkpoints written by older mains still load and sample as they did; classes a file
names are built only from the allowed tables, with plain-data arguments; each command reads each file once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffscore.errors import DiffscoreError
from diffscore.lit.datamodules import DigitsDataModule
from diffscore.lit.datamodules.from_file import DATA_MODULES, model_datamodule
from diffscore.loading.classes import BACKBONES, build, resolve
from diffscore.loading.open import open_model
from diffscore.sampling.diffusion import DiffusionSampler
from diffscore.sampling.one_step import OneStepSampler

FILES = Path(__file__).resolve().parents[1] / "data_files"
# `fit` of a tiny quickstart U-Net on the main of 2026-11 (132019c), and of a ScoreAug digits U-Net (Heun 4 steps
# with churn) and a DisBack run from it on the main of 2026-12 (1ae9c07), with what that main's `diffscore sample`
# drew for seeds 0-3
LEGACY = FILES / "quickstart-2026-11.ckpt"
OLD_FILES = {"quickstart-2026-11": DiffusionSampler, "scoreaug-2026-12": DiffusionSampler}
OLD_FILES["disback-2026-12"] = OneStepSampler


@pytest.mark.parametrize("name", list(OLD_FILES))
def test_a_checkpoint_of_an_older_main_loads_and_samples_as_it_did(name):
    """The 2026-11 file names ``diffscore.lit.DiffusionModule`` / ``diffscore.lit.DigitsDataModule`` and flat
    sampler settings; the 2026-12 ones an augmentation arm by string and churn in ``sampler_kwargs``; the samples
    must come out as that main's `diffscore sample` wrote them. Bit for bit on the machine that wrote them; another
    CPU's vector kernels round differently (CI measured up to 1e-6 on the ScoreAug file), so the bound is float32
    round-off, far below what a misread setting moves (a dropped churn moved the ScoreAug samples by 9.0, five
    steps instead of four by 5.3)."""
    model = open_model(FILES / f"{name}.ckpt")
    assert isinstance(model_datamodule(model), DigitsDataModule)
    sampler = model.sampler()
    assert isinstance(sampler, OLD_FILES[name])
    with np.load(FILES / f"{name}.samples.npz") as ref:
        assert ref["seeds"].tolist() == [0, 1, 2, 3]
        torch.testing.assert_close(
            sampler.generate([0, 1, 2, 3]), torch.from_numpy(ref["samples"]), rtol=1e-5, atol=1e-5
        )


def test_only_allowed_classes_are_built_and_nothing_is_imported_for_others(monkeypatch):
    imported = []
    monkeypatch.setattr("importlib.import_module", lambda name: imported.append(name))
    for path in ("os.system", "torch.nn.Linear", "diffscore.lit.modules.DiffusionModule", "collections.Counter"):
        with pytest.raises(DiffscoreError, match="not a backbone class"):
            resolve(path, BACKBONES, "backbone")
    assert imported == []


def test_build_checks_argument_names_and_plain_values():
    config = {"class_path": "diffscore.networks.MLP", "init_args": {"data_shape": [2], "width": 8, "depth": 1}}
    assert build(config, BACKBONES, "backbone").data_shape == (2,)
    with pytest.raises(DiffscoreError, match="no argument 'evil'"):
        build({**config, "init_args": {"evil": 1}}, BACKBONES, "backbone")
    with pytest.raises(DiffscoreError, match="not plain data"):
        build({**config, "init_args": {"width": object()}}, BACKBONES, "backbone")
    with pytest.raises(DiffscoreError, match="not plain data"):
        build({**config, "init_args": {"dropout": float("nan")}}, BACKBONES, "backbone")
    with pytest.raises(DiffscoreError, match="rejects the saved arguments"):
        build({**config, "init_args": {"width": -3}}, BACKBONES, "backbone")
    with pytest.raises(DiffscoreError, match="not a data class"):
        build({"class_path": "diffscore.networks.MLP"}, DATA_MODULES, "data")


def _with_data(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "with_data.ckpt"
    ckpt = torch.load(LEGACY, weights_only=True)
    torch.save({**ckpt, "datamodule_hyper_parameters": data}, path)
    return path


def test_data_named_by_an_untrusted_checkpoint_write_nothing(tmp_path, capsys):
    """A crafted data section asks MusicScore to write synthetic pages under a folder of its choosing: built from
    the file, it writes nothing and names the folder; with --trust_checkpoint the user allows it."""
    planted = tmp_path / "planted"
    data = {"_class_path": "diffscore.lit.datamodules.MusicScoreDataModule", "root": str(planted), "synthetic_pages": 8}
    path = _with_data(tmp_path, data)
    with pytest.raises(DiffscoreError):
        model_datamodule(open_model(path))
    assert not planted.exists()
    out = capsys.readouterr().out
    assert "not applying the checkpoint's data.synthetic_pages=8" in out and str(planted) in out
    dm = model_datamodule(open_model(path, trust=True))
    assert planted.is_dir() and len(dm.dataset("train")) == 8


def test_a_trusted_checkpoint_s_data_are_read_with_the_trust_flag(tiny_ckpt, tmp_path):
    """evaluate --trust_checkpoint true passed the flag to the model loader only: the data loader refused it."""
    import argparse

    from tests.conftest import run_cli

    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=False)
    ckpt["note"] = argparse.Namespace(why="an object beyond plain data")  # needs full unpickling
    path = tmp_path / "trusted.ckpt"
    torch.save(ckpt, path)
    args = ["evaluate", "--ckpt_path", path, "--num_samples", "4", "--steps", "1", "--metrics", "memorization"]
    assert run_cli(args) == 2
    assert run_cli([*args, "--trust_checkpoint", "true"]) == 0
