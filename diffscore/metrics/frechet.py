"""The Frechet distance between Gaussians fitted to features (the FID formula, on any feature space)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    lam, u = np.linalg.eigh((a + a.T) / 2)
    return (u * np.sqrt(np.clip(lam, 0, None))) @ u.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), computed in float64.

    tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the inner matrix is symmetric PSD, so one
    eigen-decomposition of each gives the trace without the complex round-off of a general sqrtm.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    root1 = _psd_sqrt(s1)
    inner = root1 @ s2 @ root1
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_cross)
    return max(value, 0.0)


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray, **extra) -> None:
    """Write (mu, sigma) as EDM-style .npz (keys ``mu``, ``sigma``), via a temporary file."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, **extra)


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an .npz with keys ``mu`` and ``sigma`` (ours or EDM's reference files)."""
    path = Path(path)
    if not path.is_file():
        raise DiffscoreError(f"reference statistics {path} do not exist; make them with `diffscore refstats`")
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except (KeyError, ValueError, OSError) as e:
        raise DiffscoreError(f"{path} is not a statistics file with 'mu' and 'sigma' ({e})") from None
