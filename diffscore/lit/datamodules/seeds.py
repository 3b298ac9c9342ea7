"""Integer seeds as a predict set: what `diffscore sample` / `evaluate` feed through Trainer.predict."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader


class SeedDataModule(LightningDataModule):
    """Seeds strided over ranks without padding: rank r of w takes seeds[r::w]."""

    def __init__(self, seeds: list[int], batch_size: int) -> None:
        super().__init__()
        self.seeds = seeds
        self.batch_size = batch_size

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = torch.tensor(self.seeds[rank::world], dtype=torch.long)
        return DataLoader(mine, batch_size=self.batch_size, shuffle=False)
