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


class RunsCode:
    """Unpickled fully (weights_only=False), this touches ``marker``: a file that would run code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_the_weights_file_is_read_once_and_never_unpickled_fully(random_inception, tmp_path, monkeypatch):
    """The file is swapped for one that runs code right after the first load: nothing may read it again."""
    marker, path = tmp_path / "ran", tmp_path / "weights.pth"
    path.write_bytes(random_inception.read_bytes())
    real_load, calls = torch.load, []

    def load_then_swap(f, *args, **kwargs):
        calls.append((f, kwargs.get("weights_only")))
        result = real_load(f, *args, **kwargs)
        if len(calls) == 1:
            torch.save(RunsCode(marker), path)  # swapped in between
        return result

    monkeypatch.setattr(torch, "load", load_then_swap)
    InceptionFeatures(path)
    assert not marker.exists()
    assert calls[0][1] is True and not any(isinstance(f, (str, type(path))) for f, _ in calls)
    with pytest.raises(DiffscoreError, match=r"weights\.pth is not a plain weights file \(UnpicklingError\)"):
        InceptionFeatures(path)  # the swapped file itself is refused
    assert not marker.exists()


def test_features_equal_torch_fidelitys_own_loading_of_the_same_file(random_inception):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    ours = InceptionFeatures(random_inception)
    theirs = FeatureExtractorInceptionV3(  # the test's own file: safe to unpickle fully
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(random_inception)
    )
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pool, logits = ours(images)
    ref_pool, ref_logits = theirs((images * 127.5 + 128).clamp(0, 255).to(torch.uint8))
    assert torch.equal(pool, ref_pool.double()) and torch.equal(logits, ref_logits.double())


def test_non_finite_or_foreign_weights_are_refused(random_inception, tmp_path):
    state = torch.load(random_inception, weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone().view(-1).index_fill(0, torch.tensor([3]), float("nan")).view(state[key].shape)
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(DiffscoreError, match=rf"nan\.pth: weight {key} holds 1 non-finite value \(NaN/Inf\)"):
        InceptionFeatures(tmp_path / "nan.pth")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(DiffscoreError, match=r"other\.pth does not hold Inception-v3 weights \(Error"):
        InceptionFeatures(tmp_path / "other.pth")
