"""The batches of a data-free distillation run: no images, only the batch size and the length of an epoch."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from diffscore.errors import DiffscoreError


class DistillBatches(LightningDataModule):
    """Batches ``(indices,)`` of ``batch_size`` sample indices [B] per device, ``batches_per_epoch`` per epoch.

    A distillation module draws its own noise and only reads the batch's length. The data a distilled
    generator models are the teacher's: `diffscore evaluate` finds them through the teacher (DisBackModule
    writes the teacher's data configuration into its checkpoints).
    """

    def __init__(
        self,
        batch_size: int = 128,  # generator samples per step, per device
        batches_per_epoch: int = 1000,  # steps per epoch (progress bars and epoch-end hooks only)
    ) -> None:
        super().__init__()
        if batch_size < 1 or batches_per_epoch < 1:
            raise DiffscoreError(
                f"data: batch_size and batches_per_epoch must be >= 1, got {batch_size} and {batches_per_epoch}"
            )
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        indices = torch.arange(self.batch_size * self.batches_per_epoch)
        return DataLoader(TensorDataset(indices), batch_size=self.batch_size, shuffle=False)
