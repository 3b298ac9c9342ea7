"""Everything built on Lightning (with diffscore.commands, the only code that imports it).

modules/ (LightningModules), data/ (DataModules), callbacks/, and beside them checkpoint.py (reading and
rebuilding any checkpoint safely), sampling.py (how samples are drawn from any model), loggers.py, run_dir.py.

Names of the 2026-11 flat layout (``diffscore.lit.DiffusionModule``, ``diffscore.lit.disback.DisBackModule``, ...)
still resolve, so configs and checkpoints written then keep working; nothing is imported until one is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

# old name -> "new.module:Class"
LEGACY_NAMES = {
    "DiffusionModule": "diffscore.lit.modules.diffusion:DiffusionModule",
    "RegressionDiffusionModule": "diffscore.lit.modules.regression:RegressionDiffusionModule",
    "DigitsDataModule": "diffscore.lit.data.tensor:DigitsDataModule",
    "GMMDataModule": "diffscore.lit.data.tensor:GMMDataModule",
    "ImageDataModule": "diffscore.lit.data.images:ImageDataModule",
    "CIFAR10DataModule": "diffscore.lit.data.images:CIFAR10DataModule",
    "MusicScoreDataModule": "diffscore.lit.data.musicscore:MusicScoreDataModule",
    "EDMEMA": "diffscore.lit.callbacks.ema:EDMEMA",
    "GaussianScoreProbe": "diffscore.lit.callbacks.gaussian_probe:GaussianScoreProbe",
    "NTKProbe": "diffscore.lit.callbacks.ntk_probe:NTKProbe",
    "RunLog": "diffscore.lit.callbacks.run_log:RunLog",
    "SampleQuality": "diffscore.lit.callbacks.run_log:SampleQuality",
    "SampleGrid": "diffscore.lit.callbacks.sample_grid:SampleGrid",
}


def __getattr__(name: str) -> Any:
    if name not in LEGACY_NAMES:
        raise AttributeError(f"module 'diffscore.lit' has no attribute {name!r}")
    module, _, attr = LEGACY_NAMES[name].partition(":")
    return getattr(importlib.import_module(module), attr)
