import pytest
import torch

from diffscore.errors import DiffscoreError
from diffscore.metrics.inception import WEIGHTS_NAME, InceptionFeatures, find_inception_weights


def test_missing_weights_say_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.delenv("DIFFSCORE_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(DiffscoreError) as err:
        find_inception_weights()
    msg = str(err.value)
    assert WEIGHTS_NAME in msg and str(tmp_path / "hub") in msg and "DIFFSCORE_INCEPTION_WEIGHTS" in msg
    assert "github.com/toshas/torch-fidelity" in msg
    with pytest.raises(DiffscoreError, match="nope.pth .from --inception_weights. do not exist"):
        find_inception_weights(tmp_path / "nope.pth")


def test_random_weights_run_end_to_end(random_inception):
    net = InceptionFeatures(random_inception)
    pool, logits = net(torch.rand(3, 3, 16, 16) * 2 - 1)
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008) and torch.isfinite(pool).all()
    gray_pool, _ = net(torch.zeros(2, 1, 8, 8))
    assert gray_pool.shape == (2, 2048)


def test_kid_is_unbiased_on_sets_from_one_distribution():
    from torch_fidelity.metric_kid import kid_features_to_metric

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2000, 64, generator=g), torch.randn(2000, 64, generator=g)
    kid = kid_features_to_metric(
        a,
        b,
        kid_subsets=100,
        kid_subset_size=500,
        kid_degree=3,
        kid_gamma=None,
        kid_coef0=1,
        rng_seed=2020,
        verbose=False,
    )
    assert abs(kid["kernel_inception_distance_mean"]) < 4 * kid["kernel_inception_distance_std"] / 10
    shifted = kid_features_to_metric(
        a,
        b + 0.5,
        kid_subsets=100,
        kid_subset_size=500,
        kid_degree=3,
        kid_gamma=None,
        kid_coef0=1,
        rng_seed=2020,
        verbose=False,
    )
    assert shifted["kernel_inception_distance_mean"] > 10 * kid["kernel_inception_distance_std"]
