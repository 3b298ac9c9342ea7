import os
import re

import numpy as np
import pytest

from diffscore.errors import DiffscoreError
from diffscore.metrics.frechet import feature_statistics, frechet_distance, load_statistics, save_statistics


def test_fd_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(0).normal(size=(500, 16))
    mu, sigma = feature_statistics(f)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_fd_between_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(1)
    d = 6
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # independent: scipy's general matrix square root
    from scipy.linalg import sqrtm

    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # commuting (diagonal) covariances: sum (sqrt(a) - sqrt(b))^2
    da, db = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 9.0])
    assert frechet_distance(np.zeros(3), da, np.ones(3), db) == pytest.approx(3 + 1 + 1 + 0)


def test_statistics_round_trip_and_errors(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    save_statistics(tmp_path / "r.npz", mu, sigma)
    m2, s2 = load_statistics(tmp_path / "r.npz")
    assert np.array_equal(m2, mu) and np.array_equal(s2, sigma)
    from diffscore.errors import DiffscoreError

    with pytest.raises(DiffscoreError, match="refstats"):
        load_statistics(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", x=1)
    with pytest.raises(DiffscoreError, match="mu"):
        load_statistics(tmp_path / "bad.npz")


def _cov(d: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(n, d)) @ np.diag(np.linspace(0.1, 2, d))
    return x.mean(0), np.cov(x, rowvar=False)


BAD_STATISTICS = {  # name: (edit (mu, sigma) -> (mu, sigma), the one-line error after the file name)
    "NaN mean": (lambda m, s: (np.where(np.arange(m.size) == 2, np.nan, m), s), "mu holds NaN or Inf values"),
    "Inf covariance": (lambda m, s: (m, np.where(np.eye(m.size) > 0, np.inf, s)), "sigma holds NaN or Inf values"),
    "negative covariance": (lambda m, s: (m, -s), r"sigma has the eigenvalue -\S+ \(largest -\S+\), negative beyond"),
    "one negative direction": (lambda m, s: (m, s + _rank_one_dip(s)), r"sigma has the eigenvalue -0\.01 \(largest"),
    "not symmetric": (lambda m, s: (m, s + np.triu(np.full_like(s, 0.01), 1)), "sigma is not symmetric"),
    "mu of another size": (lambda m, s: (m[:-1], s), r"mu is \[5\] and sigma \[6, 6\]; expected \[D\] and \[D, D\]"),
    "sigma not square": (lambda m, s: (m, s[:, :-1]), r"expected \[D\] and \[D, D\]"),
    "no numbers": (lambda m, s: (m.astype(str), s), "mu and sigma must be real numbers"),
}


def _rank_one_dip(s: np.ndarray) -> np.ndarray:
    """A change of s that makes its smallest eigenvalue exactly -0.01."""
    lam, u = np.linalg.eigh(s)
    return -(lam[0] + 0.01) * np.outer(u[:, 0], u[:, 0])


@pytest.mark.parametrize("case", list(BAD_STATISTICS))
def test_statistics_that_give_a_wrong_fid_are_refused_when_read(tmp_path, case):
    edit, pattern = BAD_STATISTICS[case]
    mu, sigma = edit(*_cov(6, 200))
    path = tmp_path / "ref.npz"
    np.savez(path, mu=mu, sigma=sigma)
    with pytest.raises(DiffscoreError) as err:
        load_statistics(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message and re.search(pattern, message), message


def test_the_feature_dimension_is_checked_and_round_off_is_accepted(tmp_path):
    mu, sigma = _cov(64, 40)  # rank 39 < 64: the null directions come out of np.cov as round-off, some negative
    assert np.linalg.eigvalsh(sigma)[0] < 0
    for dtype in (np.float64, np.float32):
        np.savez(tmp_path / "digits.npz", mu=mu.astype(dtype), sigma=sigma.astype(dtype))
        m, s = load_statistics(tmp_path / "digits.npz", dim=64)
        assert m.dtype == s.dtype == np.float64 and np.array_equal(s, sigma.astype(dtype).astype(np.float64))
    with pytest.raises(DiffscoreError) as err:
        load_statistics(tmp_path / "digits.npz", dim=2048)
    assert str(err.value) == (
        f"{tmp_path / 'digits.npz'} holds statistics of 64-dimensional features, but they are compared with "
        "2048-dimensional ones; pass statistics that `diffscore refstats` wrote for these features"
    )
    np.save(tmp_path / "array.npy", mu)
    with pytest.raises(DiffscoreError, match=r"array\.npy is not a statistics file .*not an \.npz archive"):
        load_statistics(tmp_path / "array.npy")
    os.mkfifo(tmp_path / "fifo.npz")
    with pytest.raises(DiffscoreError, match=r"fifo\.npz is a FIFO \(named pipe\), not a regular file"):
        load_statistics(tmp_path / "fifo.npz")
