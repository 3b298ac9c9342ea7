"""DataModules over in-memory tensors: the embedded `digits` and `gmm` data sets (no download needed).

Validation has two loaders: 0 = the held-out split, 1 = a fixed subset of the training split of the
same size, so the DiffusionModule can log the held-out minus train denoising loss (the overfitting gap).
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from diffscore.core.gaussian import GMMDenoiser
from diffscore.data.digits import load_digits_tensors, split_indices, subset
from diffscore.data.gmm import random_gmm
from diffscore.errors import DiffscoreError


class TensorDataModule(LightningDataModule):
    """Shared loaders for data held as tensors: ``self.splits[name] = (x [N, ...], labels [N])``."""

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        epoch_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DiffscoreError(f"data.batch_size must be >= 1, got {batch_size}")
        if epoch_size is not None and epoch_size < batch_size:
            raise DiffscoreError(f"data.epoch_size must be >= batch_size ({batch_size}), got {epoch_size}")
        self.batch_size = batch_size
        self.epoch_size = epoch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    # Facts about the data that the model side needs.
    @property
    def data_shape(self) -> tuple[int, ...]:
        self._ensure()
        return tuple(self.splits["train"][0].shape[1:])

    @property
    def num_classes(self) -> int:
        return 0

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def _ensure(self) -> None:
        if not self.splits:
            self.splits = self.load_splits()

    def setup(self, stage: str | None = None) -> None:
        self._ensure()

    def _loader(self, split: str, shuffle: bool, batch_size: int, x: Tensor | None = None) -> DataLoader:
        self._ensure()
        data, labels = self.splits[split]
        if x is not None:
            data, labels = data[x], labels[x]
        if len(data) == 0:
            raise DiffscoreError(f"the {split} split of {type(self).__name__} is empty; enlarge it")
        dataset = TensorDataset(data, labels)
        # An epoch of epoch_size samples is a run of back-to-back permutations of the data (one progress bar
        # for a short run instead of hundreds of 5-step epochs).
        sampler = RandomSampler(dataset, num_samples=self.epoch_size) if shuffle and self.epoch_size else None
        return DataLoader(
            dataset,
            batch_size=min(batch_size, len(data)),
            shuffle=shuffle if sampler is None else None,
            sampler=sampler,
            drop_last=shuffle,  # training batches all have the full size (after the min above)
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> list[DataLoader]:
        self._ensure()
        n_val = len(self.splits["val"][0])
        n_train = len(self.splits["train"][0])
        train_eval = torch.randperm(n_train, generator=torch.Generator().manual_seed(0))[: min(n_val, n_train)]
        return [
            self._loader("val", False, self.eval_batch_size),
            self._loader("train", False, self.eval_batch_size, x=train_eval.sort().values),
        ]

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)


class DigitsDataModule(TensorDataModule):
    """scikit-learn's 1,797 real 8x8 digits as [B, 1, 8, 8] in [-1, 1] with labels 0-9; seeded splits."""

    def __init__(
        self,
        batch_size: int = 256,  # training batch per device
        num_train: int | None = None,  # use a seeded subset of this many training digits (data-limited runs)
        val_fraction: float = 0.1,  # share of the 1,797 digits held out for validation
        test_fraction: float = 0.1,  # share held out for testing
        seed: int = 0,  # seed of the split and of the subset
        eval_batch_size: int | None = None,  # validation/test batch (default: batch_size)
        num_workers: int = 0,  # loader processes (0: in-process; the data are 50 KB)
        epoch_size: int | None = None,  # training samples per epoch (default: the training split once)
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, epoch_size)
        self.num_train = num_train
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        return 10

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        images, labels = load_digits_tensors()
        try:
            idx = split_indices(len(images), self.val_fraction, self.test_fraction, self.seed)
            idx["train"] = subset(idx["train"], self.num_train, self.seed)
        except ValueError as e:
            raise DiffscoreError(f"data: {e}") from None
        return {name: (images[i], labels[i]) for name, i in idx.items()}


class GMMDataModule(TensorDataModule):
    """Samples of a seeded random Gaussian mixture in R^dim; ``mixture`` is its exact denoiser."""

    def __init__(
        self,
        dim: int = 2,  # data dimension
        num_components: int = 8,  # mixture components
        seed: int = 0,  # seed of the mixture and of the samples
        num_train: int = 8192,  # training samples (a fixed finite set, as in practice)
        num_val: int = 1024,  # held-out samples
        num_test: int = 1024,  # test samples
        mean_scale: float = 0.5,  # std of the component means
        component_scale: float = 0.1,  # typical std inside a component
        batch_size: int = 512,  # training batch per device
        eval_batch_size: int | None = None,  # validation/test batch (default: batch_size)
        epoch_size: int | None = None,  # training samples per epoch (default: the training split once)
    ) -> None:
        super().__init__(batch_size, eval_batch_size, 0, epoch_size)
        try:
            self.mixture: GMMDenoiser = random_gmm(dim, num_components, seed, mean_scale, component_scale)
        except ValueError as e:
            raise DiffscoreError(f"data: {e}") from None
        for name, n in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if n < 1:
                raise DiffscoreError(f"data.{name} must be >= 1, got {n}")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.seed = seed
        self.save_hyperparameters()

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        out = {}
        for i, (name, n) in enumerate(self.sizes.items()):
            g = torch.Generator().manual_seed(self.seed * 1000 + i + 1)
            x = self.mixture.sample(n, generator=g).float()  # [n, dim]
            out[name] = (x, torch.zeros(n, dtype=torch.long))  # unlabelled
        return out
