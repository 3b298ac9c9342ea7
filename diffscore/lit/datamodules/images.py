"""DataModules for image data sets: EDM's ZIP/folder format (FFHQ, AFHQv2, ImageNet, ...) and CIFAR-10.

Both support the data-limited regime ScoreAug studies: ``num_train`` or ``fraction`` picks a seeded subset of
the training images; the chosen indices travel in every checkpoint (``state_dict``) and are written to
``<run>/data_subset.json``, so a run can always be traced back to the exact images it saw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from diffscore.data.cifar10 import read_cifar10
from diffscore.data.image_folder import ImageFolderDataset
from diffscore.data.splits import holdout, subset
from diffscore.errors import DiffscoreError
from diffscore.lit.datamodules.base import BaseDataModule
from diffscore.lit.run_dir import run_dir


class SubsetImageDataModule(BaseDataModule):
    """Shared held-out/subset bookkeeping over ``self.num_images`` training candidates."""

    def _choose(self, n: int, val_size: int, num_train: int | None, fraction: float | None, seed: int) -> None:
        try:
            pool, held = holdout(n, val_size, seed)
            self.train_indices: Tensor = subset(pool, num_train, seed, fraction)
        except ValueError as e:
            raise DiffscoreError(f"data: {e}") from None
        self.heldout_indices: Tensor = held

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "train_indices": self.train_indices.tolist(),
            "heldout_indices": self.heldout_indices.tolist(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = torch.tensor(state_dict["train_indices"], dtype=torch.long)
        if not torch.equal(saved, self.train_indices):
            raise DiffscoreError(
                "the checkpoint was trained on a different subset of the data (data.num_train/fraction/seed/"
                "val_size or the data set changed); restore those options to resume"
            )

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage == "fit" and self.trainer is not None and self.trainer.is_global_zero:
            if len(self.train_indices) < self.num_candidates or len(self.heldout_indices):
                path = run_dir(self.trainer) / "data_subset.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                subset = {k: v for k, v in self.state_dict().items() if k.endswith("_indices")}
                path.write_text(json.dumps(subset))


class ImageDataModule(SubsetImageDataModule):
    """A folder or uncompressed ZIP of PNGs in EDM's format (``diffscore dataset`` makes one)."""

    def __init__(
        self,
        path: str,  # the ZIP or folder, e.g. datasets/ffhq-64x64.zip
        batch_size: int = 256,  # total training batch (over all devices), EDM's --batch
        batch_gpu: int | None = None,  # most images per device at once (EDM's --batch-gpu); rest: accumulation
        cond: bool = False,  # condition on the labels of dataset.json
        xflip: bool = False,  # add a mirrored copy of every training image (EDM's --xflip)
        num_train: int | None = None,  # train on a seeded subset of this many images (data-limited regime)
        fraction: float | None = None,  # ... or on this fraction of the images
        val_size: int = 0,  # hold this many images out for the held-out loss (0 = no validation)
        seed: int = 0,  # seed of the held-out split and of the subset
        num_workers: int = 4,  # loader processes per device
        pin_memory: bool = True,  # page-locked host memory for faster copies to the GPU
        verify: bool = True,  # read every image header at start-up (sizes, channels) instead of the first
        eval_batch_size: int | None = None,  # validation/test batch per device (default: the training one)
        epoch_size: int | None = None,  # training samples per epoch (default: the training set once)
    ) -> None:
        super().__init__(batch_size, batch_gpu, eval_batch_size, num_workers, epoch_size, pin_memory)
        self.path = path
        self.cond = cond
        self.xflip = xflip
        self.images = ImageFolderDataset(path, use_labels=cond, xflip=True, verify=verify)
        self.num_candidates = self.images.num_images
        self._choose(self.images.num_images, val_size, num_train, fraction, seed)
        self.shuffle_seed = seed
        self.save_hyperparameters()

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.images.shape

    @property
    def label_dim(self) -> int:
        return self.images.num_classes if self.cond else 0

    def dataset(self, split: str) -> Dataset | None:
        if split == "train":
            idx = self.train_indices.tolist()
            if self.xflip:  # the dataset maps index i + N to the mirrored image i
                idx = idx + [i + self.images.num_images for i in idx]
            return Subset(self.images, idx)
        if split in ("val", "test"):  # the held-out images serve both
            return Subset(self.images, self.heldout_indices.tolist()) if len(self.heldout_indices) else None
        raise ValueError(split)


class CIFAR10DataModule(SubsetImageDataModule):
    """CIFAR-10 (50k train / 10k test, 32x32 RGB, 10 classes) from a local copy; nothing is downloaded."""

    def __init__(
        self,
        root: str = "datasets",  # folder holding cifar-10-python.tar.gz or cifar-10-batches-py/ (or the archive)
        batch_size: int = 512,  # total training batch (over all devices), EDM's --batch
        batch_gpu: int | None = None,  # most images per device at once; the rest is gradient accumulation
        cond: bool = False,  # condition on the 10 classes
        xflip: bool = False,  # add a mirrored copy of every training image
        num_train: int | None = None,  # train on a seeded subset of this many images (data-limited regime)
        fraction: float | None = None,  # ... or on this fraction of the images
        val_size: int = 0,  # held-out images for validation, taken from the official test set (0 = none)
        seed: int = 0,  # seed of the subset
        eval_batch_size: int | None = None,  # validation/test batch per device (default: the training one)
        epoch_size: int | None = None,  # training samples per epoch (default: the training set once)
        pin_memory: bool = True,  # page-locked host memory for faster copies to the GPU
    ) -> None:
        super().__init__(batch_size, batch_gpu, eval_batch_size, 0, epoch_size, pin_memory)
        self.root = root
        self.cond = cond
        self.xflip = xflip
        self.data = read_cifar10(Path(root))  # uint8 [N, 3, 32, 32] in memory (150 MB)
        n_test = len(self.data["test"][0])
        if not 0 <= val_size <= n_test:
            raise DiffscoreError(f"data.val_size must be in 0..{n_test} (the test set), got {val_size}")
        self.num_candidates = len(self.data["train"][0])
        self._choose(self.num_candidates, 0, num_train, fraction, seed)
        self.shuffle_seed = seed
        self.heldout_indices = torch.arange(val_size)
        self.save_hyperparameters()

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (3, 32, 32)

    @property
    def label_dim(self) -> int:
        return 10 if self.cond else 0

    def dataset(self, split: str) -> Dataset | None:
        if split == "train":
            x, y = (t[self.train_indices] for t in self.data["train"])
            if self.xflip:
                x, y = torch.cat([x, x.flip(-1)]), torch.cat([y, y])
            return TensorDataset(x, y)
        if split == "val":
            return (
                TensorDataset(*(t[self.heldout_indices] for t in self.data["test"]))
                if len(self.heldout_indices)
                else None
            )
        if split == "test":
            return TensorDataset(*self.data["test"])
        raise ValueError(split)
