import pytest
import torch

from diffscore.lit.datamodules import DigitsDataModule
from diffscore.metrics.leakage import TRANSFORMS, leaked, transform_class


@pytest.fixture(scope="module")
def heldout():
    dm = DigitsDataModule(seed=0)
    dm.setup("fit")
    return torch.cat([dm.splits["val"][0], dm.splits["test"][0]])  # never seen by the shipped classifier


def test_shipped_orientation_classifier_tells_transformed_digits_from_real_ones(heldout):
    assert leaked(heldout).float().mean() < 0.15  # upright real digits: rarely flagged (6 vs 9, 0, 8 ...)
    for k, (name, t) in enumerate(TRANSFORMS.items()):
        if name == "identity":
            continue
        assert leaked(t(heldout)).float().mean() > 0.85, name
        assert (transform_class(t(heldout)) == k).float().mean() > 0.6, name  # and mostly names the transform


def test_a_mixture_with_leaked_samples_scores_higher(heldout):
    half = len(heldout) // 2
    mixed = torch.cat([heldout[:half], torch.rot90(heldout[half:], 1, dims=(-2, -1))])
    assert leaked(mixed).float().mean() > leaked(heldout).float().mean() + 0.4


def test_leakage_needs_8x8_digits():
    with pytest.raises(ValueError, match="8x8"):
        leaked(torch.zeros(2, 3, 8, 8))
