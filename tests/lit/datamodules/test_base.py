import itertools
from types import SimpleNamespace

import pytest
import torch

from diffscore.errors import DiffscoreError
from diffscore.lit.datamodules import DigitsDataModule, GMMDataModule


def test_digits_module_splits_and_loaders():
    dm = DigitsDataModule(batch_size=100, num_train=300)
    dm.setup("fit")
    assert dm.data_shape == (1, 8, 8) and dm.num_classes == 10
    assert len(dm.splits["train"][0]) == 300 and len(dm.splits["val"][0]) == 180
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 1, 8, 8) and x.min() >= -1 and x.max() <= 1 and y.dtype == torch.long
    heldout, train_eval = dm.val_dataloader()
    n_eval = sum(len(b[0]) for b in train_eval)
    assert n_eval == 180  # as many training images as held-out ones
    train_set = {row.numpy().tobytes() for row in dm.splits["train"][0]}
    assert all(img.numpy().tobytes() in train_set for b in train_eval for img in b[0])


def test_epoch_size_makes_epochs_of_back_to_back_permutations():
    dm = DigitsDataModule(batch_size=100, num_train=300, epoch_size=1200)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 12
    seen = torch.cat([b[0] for b in batches[:3]]).flatten(1)
    assert len({r.numpy().tobytes() for r in seen}) == len(torch.unique(dm.splits["train"][0].flatten(1), dim=0))


def resumed_indices(state: dict, world: int, rank: int, count: int) -> list[int]:
    """The first ``count`` training indices rank ``rank`` of ``world`` devices reads after loading ``state``."""
    dm = DigitsDataModule(batch_size=48, num_train=300, epoch_size=960)
    dm.trainer = SimpleNamespace(world_size=world, global_rank=rank, accumulate_grad_batches=1)
    dm.setup("fit")
    dm.load_state_dict(state)
    return list(itertools.islice(iter(dm.train_dataloader().sampler), count))


def test_a_checkpoint_resumes_the_data_stream_on_any_number_of_devices():
    """Saved after 5 steps on 2 devices (total batch 48), resumed on 1 to 4 devices: together the devices read the
    stream from sample 240 on, exactly as one device running straight through does."""
    straight = resumed_indices({"stream_consumed": 0}, 1, 0, 240 + 96)[240:]
    writer = DigitsDataModule(batch_size=48, num_train=300, epoch_size=960)
    writer.trainer = SimpleNamespace(world_size=2, global_rank=0, accumulate_grad_batches=1, global_step=5)
    state = writer.state_dict()
    for world in (1, 2, 3, 4):
        per_rank = [resumed_indices(state, world, r, 96 // world) for r in range(world)]
        assert [per_rank[p % world][p // world] for p in range(96)] == straight, f"{world} devices"
    # a checkpoint from before this format held one rank's position (120 of 240 on 2 devices)
    legacy = [resumed_indices({"stream_position": 120}, 2, r, 48) for r in range(2)]
    assert [legacy[p % 2][p // 2] for p in range(96)] == straight


def test_gmm_module_exposes_its_mixture_and_is_seeded():
    a, b = GMMDataModule(dim=3, seed=1, num_train=64), GMMDataModule(dim=3, seed=1, num_train=64)
    a.setup(), b.setup()
    assert torch.equal(a.splits["train"][0], b.splits["train"][0])
    assert a.mixture.dim == 3 and a.data_shape == (3,)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=64, epoch_size=10), "epoch_size"),
        (dict(batch_size=64, num_train=5000), "num_train"),
        (dict(batch_size=64, val_fraction=0.7, test_fraction=0.5), "val_fraction"),
    ],
)
def test_digits_bad_options(kwargs, needle):
    with pytest.raises(DiffscoreError, match=needle):
        DigitsDataModule(**kwargs).setup("fit")
