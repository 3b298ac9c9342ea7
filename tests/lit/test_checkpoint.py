"""Reading checkpoints: files written before the 2026-12 layout still load and sample the same; classes a file
names are built only from the allowed list, with plain-data arguments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffscore.errors import DiffscoreError
from diffscore.lit.checkpoint import build, load_checkpoint_datamodule, load_model, resolve
from diffscore.lit.data import DigitsDataModule
from diffscore.lit.modules import DiffusionModule
from diffscore.lit.sampling import SamplingOptions

FILES = Path(__file__).resolve().parents[1] / "data_files"
LEGACY = FILES / "quickstart-2026-11.ckpt"  # `fit` of a tiny quickstart U-Net on the main of 2026-11 (132019c)


def test_a_checkpoint_written_before_the_move_loads_and_samples_as_it_did():
    """Its config names ``diffscore.lit.DiffusionModule`` / ``diffscore.lit.DigitsDataModule``; the samples of
    seeds 0-3 were written by that main's `diffscore sample` and must come out the same."""
    hp = torch.load(LEGACY, weights_only=True)["hyper_parameters"]
    assert hp["_class_path"] == "diffscore.lit.DiffusionModule"
    model = load_model(LEGACY)
    assert isinstance(model, DiffusionModule)
    dm = load_checkpoint_datamodule(LEGACY)
    assert isinstance(dm, DigitsDataModule)
    with np.load(FILES / "quickstart-2026-11.samples.npz") as ref:
        assert ref["seeds"].tolist() == [0, 1, 2, 3]
        samples = model.generate([0, 1, 2, 3], SamplingOptions())
        torch.testing.assert_close(samples, torch.from_numpy(ref["samples"]), rtol=0, atol=1e-5)


def test_only_allowed_classes_are_built_and_nothing_is_imported_for_others(monkeypatch):
    imported = []
    monkeypatch.setattr("importlib.import_module", lambda name: imported.append(name))
    for path in ("os.system", "torch.nn.Linear", "diffscore.lit.modules.DiffusionModule", "collections.Counter"):
        with pytest.raises(DiffscoreError, match="not a backbone class"):
            resolve(path, "backbone")
    assert imported == []


def test_build_checks_argument_names_and_plain_values():
    config = {"class_path": "diffscore.networks.MLP", "init_args": {"data_shape": [2], "width": 8, "depth": 1}}
    assert build(config, "backbone").data_shape == (2,)
    with pytest.raises(DiffscoreError, match="no argument 'evil'"):
        build({**config, "init_args": {"evil": 1}}, "backbone")
    with pytest.raises(DiffscoreError, match="not plain data"):
        build({**config, "init_args": {"width": object()}}, "backbone")
    with pytest.raises(DiffscoreError, match="not plain data"):
        build({**config, "init_args": {"dropout": float("nan")}}, "backbone")
    with pytest.raises(DiffscoreError, match="rejects the saved arguments"):
        build({**config, "init_args": {"width": -3}}, "backbone")
    with pytest.raises(DiffscoreError, match="not a data class"):
        build({"class_path": "diffscore.networks.MLP"}, "data")


def _with_data(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "with_data.ckpt"
    torch.save({"state_dict": {}, "datamodule_hyper_parameters": data}, path)
    return path


def test_data_named_by_an_untrusted_checkpoint_write_nothing(tmp_path, capsys):
    """A crafted data section asks MusicScore to write synthetic pages under a folder of its choosing: built from
    the file, it writes nothing and names the folder; with --trust_checkpoint the user allows it."""
    planted = tmp_path / "planted"
    data = {"_class_path": "diffscore.lit.data.MusicScoreDataModule", "root": str(planted), "synthetic_pages": 8}
    path = _with_data(tmp_path, data)
    with pytest.raises(DiffscoreError):
        load_checkpoint_datamodule(path)
    assert not planted.exists()
    out = capsys.readouterr().out
    assert "not applying the checkpoint's data.synthetic_pages=8" in out and str(planted) in out
    dm = load_checkpoint_datamodule(path, trust=True)
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
