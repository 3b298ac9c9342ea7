"""MusicScore's FID-k (diffscore.metrics.suite.fid_k_values): k samples against the k real images they pair with,
by seed, each side's statistics from its own k images, as the paper's script feeds pytorch-fid two folders."""

import numpy as np
import pytest
from scipy import linalg

from diffscore.errors import DiffscoreError
from diffscore.metrics.suite import fid_k_values


def pytorch_fid_reference(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's calculate_frechet_distance, written out: scipy's sqrtm with its eps offset when singular."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_k_pairs_each_sample_with_its_real_image_by_seed():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(10, 6))  # the split's 10 real images (features)
    seeds = np.arange(12)  # seeds 10, 11 reuse captions 0, 1
    samples = real[seeds % 10] + 0.0  # a perfect model: sample s looks exactly like its page
    assert fid_k_values(samples, seeds, real, [4, 8]) == {"fid_4": pytest.approx(0, abs=1e-9),
                                                         "fid_8": pytest.approx(0, abs=1e-9)}  # fmt: skip
    shifted = fid_k_values(np.roll(samples, 3, axis=0), seeds, real, [4])["fid_4"]  # paired with the wrong pages
    assert shifted > 0.1


def test_fid_k_equals_the_frechet_distance_of_the_two_k_sets():
    rng = np.random.default_rng(1)
    real, samples = rng.normal(size=(20, 5)), rng.normal(0.3, 1.2, size=(20, 5))
    seeds = np.arange(100, 120)  # later seeds pair with pages s mod 20
    got = fid_k_values(samples, seeds, real, [16])["fid_16"]
    assert got == pytest.approx(pytorch_fid_reference(samples[:16], real[seeds[:16] % 20]), rel=1e-6)
    with pytest.raises(DiffscoreError, match="fid_32 needs at least 32 samples"):
        fid_k_values(samples, seeds, real, [32])
