import numpy as np
import pytest

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
