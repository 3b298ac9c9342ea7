"""LatentDataModule: an EDM2-style latent dataset (`diffscore dataset --encode`; diffscore.data.latent_dataset) for
latent diffusion (Stable Diffusion fine-tuning).

Batches travel as the stored posterior statistics ``(float32 [B, 2C, h, w], captions list[str] | labels [B])``;
on the device each becomes one latent draw, scaled once by the VAE's scaling factor (diffscore.data.latents.
sample_latents: z = scaling_factor (mean + std n), n from the global RNG, which checkpoints restore), so the VAE
encoder never runs while training. The images the latents were encoded from serve the metrics (FID, FID-k,
memorization): ``reference_images``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffscore.data.latent_dataset import LatentDataset, read_meta
from diffscore.data.latents import sample_latents
from diffscore.errors import DiffscoreError
from diffscore.lit.datamodules.base import BaseDataModule, split_images


class LatentDataModule(BaseDataModule):
    """The splits of a latent dataset (train, and val / test when it has them, e.g. MusicScore's)."""

    def __init__(
        self,
        path: str,  # the latent ZIP or folder, e.g. datasets/musicscore-400-latents.zip
        batch_size: int = 32,  # total training batch (over all devices)
        batch_gpu: int | None = None,  # most latents per device at once; the rest is gradient accumulation
        eval_batch_size: int | None = None,  # validation/test batch per device (default: the training one)
        num_workers: int = 0,  # loader processes per device
        epoch_size: int | None = None,  # training samples per epoch (default: the training split once)
        pin_memory: bool = False,  # page-locked host memory for faster copies to the GPU
        seed: int = 0,  # seed of the training order
        scaling_factor: float | None = None,  # override the dataset's recorded VAE scaling factor
    ) -> None:
        super().__init__(batch_size, batch_gpu, eval_batch_size, num_workers, epoch_size, pin_memory)
        if read_meta(path) is None:
            raise DiffscoreError(
                f"data.path {path} is not a latent dataset; make one with "
                "`diffscore dataset --source SRC --dest out.zip --encode SD_FOLDER --resolution R`"
            )
        self.path = path
        self.datasets = {split: LatentDataset(path, split) for split in ("train", "val", "test")}
        train = self.datasets["train"]
        if not len(train):
            raise DiffscoreError(f"{path} has no training latents")
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else train.scaling_factor)
        if self.scaling_factor <= 0:
            raise DiffscoreError(f"data.scaling_factor must be positive, got {self.scaling_factor}")
        self.shuffle_seed = seed
        self.save_hyperparameters()

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.datasets["train"].latent_shape

    def dataset(self, split: str) -> Dataset | None:
        ds = self.datasets[split]
        return ds if len(ds) else None

    def captions(self, split: str = "train") -> list[str]:
        """The captions of a split ([] when the dataset has none)."""
        return list(self.datasets[split].captions or [])

    def images(self, split: str = "train", limit: int | None = None) -> Tensor | None:
        """The images a split's latents were encoded from, in [-1, 1]: [N, 3, H, W] (None: an empty split)."""
        ds = self.datasets[split]
        n = len(ds) if limit is None else min(limit, len(ds))
        if not n:
            return None
        return torch.stack([ds.image(i) for i in range(n)]).to(torch.float32) / 127.5 - 1

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        stats, cond = batch
        return sample_latents(stats, self.scaling_factor), cond  # [B, C, h, w]


def reference_images(dm, split: str = "train", limit: int | None = None) -> Tensor | None:
    """A split's images in data space, what samples are compared with: a latent data module's encoded images,
    any other module's own (diffscore.lit.datamodules.base.split_images)."""
    if isinstance(dm, LatentDataModule):
        return dm.images(split, limit)
    return split_images(dm, split, limit)


def train_reference(dm, limit: int | None = None) -> Tensor:
    """The training split's reference images (``reference_images(dm, "train", limit)``), which every data module
    has."""
    images = reference_images(dm, "train", limit)
    if images is None:
        raise DiffscoreError(f"{type(dm).__name__} has no training images")
    return images
