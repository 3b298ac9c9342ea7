"""scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download), as [N, 1, 8, 8] in [-1, 1]."""

from __future__ import annotations

import torch
from torch import Tensor


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1,797 digits: images [N, 1, 8, 8] float32 in [-1, 1] (pixel values 0..16 mapped linearly), labels [N]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # [N, 1, 8, 8]
    labels = torch.as_tensor(bunch.target, dtype=torch.long)  # [N]
    return images, labels


def digits_splits(
    val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0, num_train: int | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """The seeded train/val/test split of the digits, {name: (images [N, 1, 8, 8], labels [N])}; ``num_train``
    keeps a seeded subset of the training split (data-limited runs). Raises ValueError on bad fractions/sizes."""
    from diffscore.data.splits import split_indices, subset

    images, labels = load_digits_tensors()
    idx = split_indices(len(images), val_fraction, test_fraction, seed)
    idx["train"] = subset(idx["train"], num_train, seed)
    return {name: (images[i], labels[i]) for name, i in idx.items()}
