"""scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download), as [N, 1, 8, 8] in [-1, 1]."""

from __future__ import annotations

import torch
from torch import Tensor

SPLITS = ("train", "val", "test")


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1,797 digits: images [N, 1, 8, 8] float32 in [-1, 1] (pixel values 0..16 mapped linearly), labels [N]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # [N, 1, 8, 8]
    labels = torch.as_tensor(bunch.target, dtype=torch.long)  # [N]
    return images, labels


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Tensor]:
    """A seeded, disjoint train/val/test partition of range(n)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum below 1"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return {"val": perm[:n_val], "test": perm[n_val : n_val + n_test], "train": perm[n_val + n_test :]}


def subset(indices: Tensor, num: int | None, seed: int) -> Tensor:
    """The first ``num`` of a seeded shuffle of ``indices`` (all of them if num is None)."""
    if num is None:
        return indices
    if not 0 < num <= len(indices):
        raise ValueError(f"num_train must be in 1..{len(indices)}, got {num}")
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed + 1))
    return indices[perm[:num]].sort().values
