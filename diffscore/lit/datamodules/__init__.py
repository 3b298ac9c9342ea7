"""LightningDataModules: the embedded digits and gmm sets, image folders/ZIPs and CIFAR-10, MusicScore, latent
datasets (Stable Diffusion), and the data-free batches of distillation. Configs name them as
``diffscore.lit.datamodules.<Class>``."""

from diffscore.lit.datamodules.distill import DistillBatches
from diffscore.lit.datamodules.images import CIFAR10DataModule, ImageDataModule
from diffscore.lit.datamodules.latents import LatentDataModule
from diffscore.lit.datamodules.musicscore import MusicScoreDataModule
from diffscore.lit.datamodules.tensor import DigitsDataModule, GMMDataModule

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "DistillBatches",
    "GMMDataModule",
    "ImageDataModule",
    "LatentDataModule",
    "MusicScoreDataModule",
]
