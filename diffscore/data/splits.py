"""Seeded, reproducible index splits: held-out sets and data-limited training subsets."""

from __future__ import annotations

import torch
from torch import Tensor


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Tensor]:
    """A seeded, disjoint train/val/test partition of range(n)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum below 1"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return {"val": perm[:n_val], "test": perm[n_val : n_val + n_test], "train": perm[n_val + n_test :]}


def holdout(n: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """(train, held-out) indices of range(n) with ``size`` held out at random; both sorted."""
    if not 0 <= size < n:
        raise ValueError(f"val_size must be in 0..{n - 1} for {n} items, got {size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[size:].sort().values, perm[:size].sort().values


def subset(indices: Tensor, num: int | None, seed: int, fraction: float | None = None) -> Tensor:
    """A seeded subset of ``indices``: ``num`` of them, or ``fraction`` of them, or all (both None); sorted.

    Subsets of one seed are nested: the first 100 are among the first 300.
    """
    if num is not None and fraction is not None:
        raise ValueError("give num_train or fraction, not both")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        num = max(1, round(fraction * len(indices)))
    if num is None:
        return indices
    if not 0 < num <= len(indices):
        raise ValueError(f"num_train must be in 1..{len(indices)}, got {num}")
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed + 1))
    return indices[perm[:num]].sort().values
