import torch

from diffscore.data.digits import load_digits_tensors
from diffscore.metrics.memorization import copy_ratio, memorized_fraction, nearest_neighbours


def test_ratio_is_zero_for_copies_and_large_for_noise():
    train = load_digits_tensors()[0][:500]
    copies = train[:50].clone()
    assert copy_ratio(copies, train).max().item() == 0.0
    assert memorized_fraction(copy_ratio(copies, train)) == 1.0
    noise = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ratio = copy_ratio(noise, train)
    assert ratio.min().item() > 0.8 and memorized_fraction(ratio) == 0.0


def test_nearest_neighbours_match_brute_force_across_chunks():
    g = torch.Generator().manual_seed(1)
    train, x = torch.randn(300, 5, generator=g), torch.randn(7, 5, generator=g)
    d1, d2 = nearest_neighbours(x, train, chunk=64)
    full = torch.cdist(x, train).sort(dim=1).values
    torch.testing.assert_close(d1, full[:, 0])
    torch.testing.assert_close(d2, full[:, 1])
