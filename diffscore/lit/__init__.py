"""The only package that imports Lightning: LightningModules, DataModules, callbacks and the CLI."""

from diffscore.lit.datamodules import DigitsDataModule, GMMDataModule
from diffscore.lit.diffusion import DiffusionModule
from diffscore.lit.ema import EDMEMA
from diffscore.lit.gaussian_probe import GaussianScoreProbe
from diffscore.lit.image_data import CIFAR10DataModule, ImageDataModule
from diffscore.lit.musicscore_data import MusicScoreDataModule
from diffscore.lit.ntk_probe import NTKProbe
from diffscore.lit.run_log import RunLog, SampleQuality
from diffscore.lit.sample_grid import SampleGrid
from diffscore.lit.score_regression import RegressionDiffusionModule

__all__ = [
    "CIFAR10DataModule",
    "DiffusionModule",
    "DigitsDataModule",
    "EDMEMA",
    "GMMDataModule",
    "GaussianScoreProbe",
    "ImageDataModule",
    "MusicScoreDataModule",
    "NTKProbe",
    "RegressionDiffusionModule",
    "RunLog",
    "SampleGrid",
    "SampleQuality",
]
