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
