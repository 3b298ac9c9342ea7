"""The Frechet distance between Gaussians fitted to features (the FID formula, on any feature space)."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write, open_user_file


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


MAX_STATISTICS_BYTES = 1 << 30  # Inception's: mu 16 KB, sigma 32 MB, 10,000 KID features 82 MB
ROUND_OFF_EPS = 1e-10  # relative round-off allowed in a float64 covariance (see check_statistics)


@contextmanager
def open_statistics(path: str | Path) -> Iterator[np.lib.npyio.NpzFile]:
    """The .npz at ``path`` (numpy's NpzFile) read through diffscore.io's bounded reader: a regular file of at most
    MAX_STATISTICS_BYTES, each member's inflated size checked before it is read."""
    path = Path(path)
    if not path.exists():
        raise DiffscoreError(f"reference statistics {path} do not exist; make them with `diffscore refstats`")
    with open_user_file(path, f"reference statistics {path}", MAX_STATISTICS_BYTES) as f:
        try:
            data = np.load(f, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an .npz archive")
            big = next((i for i in data.zip.infolist() if i.file_size > MAX_STATISTICS_BYTES), None)
            if big is not None:
                raise ValueError(f"member {big.filename} declares {big.file_size:,} bytes")
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise DiffscoreError(f"{path} is not a statistics file with 'mu' and 'sigma' ({e})") from None
        with data:
            yield data


def check_statistics(mu: np.ndarray, sigma: np.ndarray, where: str, dim: int | None = None) -> None:
    """Refuse statistics that would give a silently wrong Frechet distance: shapes other than mu [D], sigma [D, D]
    (D = ``dim`` when given: the features they are compared with), NaN/Inf, a covariance that is not symmetric or
    has a negative eigenvalue beyond round-off.

    Round-off, relative to the largest |entry| (symmetry) or eigenvalue: D eps, eps = max(the stored dtype's
    epsilon, ROUND_OFF_EPS). Entries off by eps relative move eigenvalues by at most ||E||_2 <= D eps max|S_ij|
    <= D eps lambda_max (Weyl); ROUND_OFF_EPS bounds the relative error of a float64 covariance summed over up to
    ~450,000 samples (N eps64). A negative eigenvalue below that changes the FID (which clips it) by < D tol."""
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size) or mu.size == 0:
        raise DiffscoreError(f"{where}: mu is {list(mu.shape)} and sigma {list(sigma.shape)}; expected [D] and [D, D]")
    if dim is not None and mu.size != dim:
        raise DiffscoreError(
            f"{where} holds statistics of {mu.size}-dimensional features, but they are compared with {dim}-dimensional "
            "ones; pass statistics that `diffscore refstats` wrote for these features"
        )
    for name, value in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(value).all():
            raise DiffscoreError(f"{where}: {name} holds NaN or Inf values; the file is damaged, make it again")
    eps = max(float(np.finfo(sigma.dtype).eps) if sigma.dtype.kind == "f" else 0.0, ROUND_OFF_EPS)
    tol = mu.size * eps
    s64 = sigma.astype(np.float64)
    asym = float(np.abs(s64 - s64.T).max())
    if asym > tol * float(np.abs(s64).max()):
        raise DiffscoreError(f"{where}: sigma is not symmetric (|S - S^T| up to {asym:.3g}); it is no covariance")
    lam = np.linalg.eigvalsh((s64 + s64.T) / 2)  # ascending
    if lam[0] < -tol * max(float(lam[-1]), 0.0) or lam[-1] < 0:
        raise DiffscoreError(
            f"{where}: sigma has the eigenvalue {lam[0]:.4g} (largest {lam[-1]:.4g}), negative beyond round-off; "
            "it is no covariance"
        )


def load_statistics(path: str | Path, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 from an .npz with keys ``mu`` and ``sigma`` (ours or EDM's reference files), checked
    (check_statistics; ``dim`` = the dimension of the features they will be compared with) as they are read."""
    path = Path(path)
    with open_statistics(path) as data:
        try:
            mu, sigma = data["mu"], data["sigma"]
        except (KeyError, ValueError, OSError, MemoryError, zipfile.BadZipFile) as e:
            raise DiffscoreError(f"{path} is not a statistics file with 'mu' and 'sigma' ({e})") from None
    if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu":
        raise DiffscoreError(f"{path}: mu and sigma must be real numbers, got {mu.dtype} and {sigma.dtype}")
    check_statistics(mu, sigma, str(path), dim)
    return mu.astype(np.float64), sigma.astype(np.float64)
