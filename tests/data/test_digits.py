import pytest
import torch

from diffscore.data.digits import load_digits_tensors
from diffscore.data.splits import holdout, split_indices, subset


def test_digits_are_the_real_bundled_set_in_range():
    images, labels = load_digits_tensors()
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    assert set(labels.tolist()) == set(range(10))
    # pixel values are sixteenths: (v / 8 - 1) * 8 is an integer
    assert torch.equal(((images + 1) * 8).round(), (images + 1) * 8)


def test_splits_are_disjoint_cover_and_seeded():
    a = split_indices(1797, 0.1, 0.1, seed=0)
    b = split_indices(1797, 0.1, 0.1, seed=0)
    c = split_indices(1797, 0.1, 0.1, seed=1)
    allidx = torch.cat([a["train"], a["val"], a["test"]])
    assert len(allidx) == 1797 and len(set(allidx.tolist())) == 1797
    assert len(a["val"]) == 180 and len(a["test"]) == 180
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["val"], c["val"])


def test_subset_is_nested_in_train_and_seeded():
    train = split_indices(1797, 0.1, 0.1, seed=0)["train"]
    s = subset(train, 300, seed=0)
    assert len(s) == 300 and set(s.tolist()) <= set(train.tolist())
    assert torch.equal(s, subset(train, 300, seed=0))
    assert torch.equal(subset(train, None, 0), train)
    with pytest.raises(ValueError, match="num_train"):
        subset(train, 5000, 0)
    with pytest.raises(ValueError):
        split_indices(100, 0.6, 0.5, 0)


def test_fraction_and_holdout():
    idx = torch.arange(1000)
    assert len(subset(idx, None, 0, fraction=0.25)) == 250
    assert set(subset(idx, 100, 3).tolist()) <= set(subset(idx, 300, 3).tolist())  # nested
    with pytest.raises(ValueError, match="not both"):
        subset(idx, 10, 0, fraction=0.5)
    train, held = holdout(50, 10, seed=1)
    assert len(held) == 10 and len(train) == 40 and not set(train.tolist()) & set(held.tolist())
