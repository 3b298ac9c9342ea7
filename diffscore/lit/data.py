"""The 2026-11/12 name of diffscore.lit.datamodules: configs that name ``diffscore.lit.data.<Class>`` keep working.

New configs name ``diffscore.lit.datamodules.<Class>``; nothing else lives here.
"""

from diffscore.lit.datamodules import (  # noqa: F401
    CIFAR10DataModule,
    DigitsDataModule,
    DistillBatches,
    GMMDataModule,
    ImageDataModule,
    MusicScoreDataModule,
)
