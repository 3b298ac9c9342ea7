"""Everything built on Lightning (with diffscore.commands, the only code that imports it).

modules/ (LightningModules), datamodules/ (DataModules, and building one from a file's data section), callbacks/,
and beside them predict.py (drawing samples over devices), loggers.py, run_dir.py. See docs/architecture.md.

Names of the 2026-11 flat layout (``diffscore.lit.DiffusionModule``, ``diffscore.lit.DigitsDataModule``, ...) and the
2026-12 ``diffscore.lit.data.<Class>`` (lit/data.py) still resolve, so configs written then keep working; nothing is
imported until one is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

# old name -> "new.module:Class"
LEGACY_NAMES = {
    "DiffusionModule": "diffscore.lit.modules.diffusion:DiffusionModule",
    "RegressionDiffusionModule": "diffscore.lit.modules.regression:RegressionDiffusionModule",
    "DigitsDataModule": "diffscore.lit.datamodules.tensor:DigitsDataModule",
    "GMMDataModule": "diffscore.lit.datamodules.tensor:GMMDataModule",
    "ImageDataModule": "diffscore.lit.datamodules.images:ImageDataModule",
    "CIFAR10DataModule": "diffscore.lit.datamodules.images:CIFAR10DataModule",
    "MusicScoreDataModule": "diffscore.lit.datamodules.musicscore:MusicScoreDataModule",
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
