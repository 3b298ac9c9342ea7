"""Shared helpers: run the real CLI in-process on shrunken real configs (never fake ones)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests log nowhere unless a test asks for wandb explicitly (test_cli's offline run).
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")
GMM = str(REPO / "experiments" / "gmm.yaml")

# Shrinks experiments/quickstart.yaml to seconds: a tiny U-Net, a few steps, 4-sample grids.
TINY = [
    "--model.init_args.backbone.init_args.model_channels=8",
    "--model.init_args.sampling.steps=4",
    "--trainer.val_check_interval=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.batch_size=32",
]


def run_cli(args: list[str]) -> int:
    """Run `diffscore ARGS` in-process; returns the exit code (0 when it returned normally)."""
    from diffscore.commands import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A real quickstart checkpoint after 4 steps of a tiny U-Net (EMA weights in state_dict)."""
    root = tmp_path_factory.mktemp("tiny_run")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code = run_cli(["fit", "--config", QUICKSTART, *TINY, "--trainer.max_steps=4"])
    finally:
        os.chdir(cwd)
    assert code == 0
    (ckpt,) = root.glob("runs/**/checkpoints/last.ckpt")
    return ckpt


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory) -> Path:
    """A randomly initialised Inception weights file in torch-fidelity's format (the real one cannot be
    downloaded here): exercises the whole FID/KID/IS pipeline, not the numbers."""
    from unittest import mock

    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    with (
        mock.patch("torch_fidelity.feature_extractor_inceptionv3.torch.load", return_value={}),
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None),
    ):
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    torch.save(net.state_dict(), path)
    return path
