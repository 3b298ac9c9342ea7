"""LightningDataModules: the embedded digits and gmm sets, image folders/ZIPs and CIFAR-10, MusicScore, and the
data-free batches of distillation. Configs name them as ``diffscore.lit.data.<Class>``."""

from diffscore.lit.data.distill import DistillBatches
from diffscore.lit.data.images import CIFAR10DataModule, ImageDataModule
from diffscore.lit.data.musicscore import MusicScoreDataModule
from diffscore.lit.data.tensor import DigitsDataModule, GMMDataModule

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "DistillBatches",
    "GMMDataModule",
    "ImageDataModule",
    "MusicScoreDataModule",
]
