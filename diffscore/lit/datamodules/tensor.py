"""The embedded data sets, held in memory: scikit-learn's real 8x8 digits and seeded Gaussian mixtures."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from diffscore.data.digits import digits_splits
from diffscore.data.gmm import random_gmm
from diffscore.errors import DiffscoreError
from diffscore.io import check_memory
from diffscore.lit.datamodules.base import BaseDataModule, split_images


class TensorDataModule(BaseDataModule):
    """Data held in memory as ``self.splits[name] = (x [N, ...], labels [N])``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def _ensure(self) -> None:
        if not self.splits:
            self.splits = self.load_splits()

    @property
    def data_shape(self) -> tuple[int, ...]:
        self._ensure()
        return tuple(self.splits["train"][0].shape[1:])

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self._ensure()

    def dataset(self, split: str) -> Dataset | None:
        self._ensure()
        if split not in self.splits:
            return None
        return TensorDataset(*self.splits[split])


class DigitsDataModule(TensorDataModule):
    """scikit-learn's 1,797 real 8x8 digits as [B, 1, 8, 8] in [-1, 1] with labels 0-9; seeded splits."""

    def __init__(
        self,
        batch_size: int = 256,  # total training batch (over all devices)
        batch_gpu: int | None = None,  # most images per device at once; the rest is gradient accumulation
        cond: bool = False,  # condition the model on the digit class (10 labels)
        num_train: int | None = None,  # use a seeded subset of this many training digits (data-limited runs)
        val_fraction: float = 0.1,  # share of the 1,797 digits held out for validation
        test_fraction: float = 0.1,  # share held out for testing
        seed: int = 0,  # seed of the split and of the subset
        eval_batch_size: int | None = None,  # validation/test batch per device (default: the training one)
        num_workers: int = 0,  # loader processes (0: in-process; the data are 50 KB)
        epoch_size: int | None = None,  # training samples per epoch (default: the training split once)
    ) -> None:
        super().__init__(batch_size, batch_gpu, eval_batch_size, num_workers, epoch_size)
        self.cond = cond
        self.num_train = num_train
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = self.shuffle_seed = seed
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def label_dim(self) -> int:
        return 10 if self.cond else 0

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        try:
            return digits_splits(self.val_fraction, self.test_fraction, self.seed, self.num_train)
        except ValueError as e:
            raise DiffscoreError(f"data: {e}") from None


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
        batch_size: int = 512,  # total training batch (over all devices)
        eval_batch_size: int | None = None,  # validation/test batch per device (default: the training one)
        epoch_size: int | None = None,  # training samples per epoch (default: the training split once)
    ) -> None:
        super().__init__(batch_size, None, eval_batch_size, 0, epoch_size)
        try:
            self.mixture = random_gmm(dim, num_components, seed, mean_scale, component_scale)
        except ValueError as e:
            raise DiffscoreError(f"data: {e}") from None
        for name, n in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if n < 1:
                raise DiffscoreError(f"data.{name} must be >= 1, got {n}")
        total = num_train + num_val + num_test
        check_memory(total * dim * 4, f"data: {total:,} GMM samples of dimension {dim}", "lower data.num_train")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.seed = self.shuffle_seed = seed
        self.save_hyperparameters()

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        out = {}
        for i, (name, n) in enumerate(self.sizes.items()):
            g = torch.Generator().manual_seed(self.seed * 1000 + i + 1)
            x = self.mixture.sample(n, generator=g).float()  # [n, dim]
            out[name] = (x, torch.zeros(n, dtype=torch.long))  # unlabelled
        return out


def heldout_images(dm: object) -> Tensor | None:
    """The held-out images (val, then test) of a data module holding its splits in memory, else None."""
    if not isinstance(dm, TensorDataModule):
        return None
    return torch.cat([split_images(dm, "val"), split_images(dm, "test")])
