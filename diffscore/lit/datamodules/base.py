"""The shared batching/validation logic of every DataModule, and the training images of one.

Batching follows EDM: ``batch_size`` is the *total* batch over all devices; ``batch_gpu`` caps what one device
takes at once, the rest is gradient accumulation. The same YAML therefore trains with the same effective batch
on 1 or 8 GPUs. Validation has two loaders: 0 = the held-out split, 1 = an equal-size fixed subset of the
training split, so the DiffusionModule can log the held-out minus train loss (the overfitting gap).
Images may travel as uint8 and are mapped to [-1, 1] on the device (4x less host-to-device traffic).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from diffscore.errors import DiffscoreError


class StreamSampler(DistributedSampler):
    """An endless, seeded stream of permutations of the data, cut into epochs of ``epoch_len`` indices per rank.

    Rank r of w takes stream positions r, r + w, ...; block b of the stream is permutation b of
    torch.randperm(n) with seed (seed, b). The stream continues across epochs and can start anywhere, so a resumed
    run sees exactly the batches the uninterrupted run would have seen. (A DistributedSampler subclass, so
    Lightning leaves it in place under DDP.)
    """

    def __init__(self, n: int, epoch_len: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.epoch_len, self.seed = n, epoch_len, seed
        self.rank, self.world_size = rank, world_size
        self.next_position = 0  # this rank's next position in its stream
        self._block, self._perm = -1, None

    def _index(self, p: int) -> int:
        block, offset = divmod(p * self.world_size + self.rank, self.n)
        if block != self._block:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + block)
            self._block, self._perm = block, torch.randperm(self.n, generator=g).tolist()
        return self._perm[offset]

    def __iter__(self):
        start = self.next_position
        self.next_position += self.epoch_len
        return (self._index(p) for p in range(start, start + self.epoch_len))

    def __len__(self) -> int:
        return self.epoch_len

    def set_epoch(self, epoch: int) -> None:  # the stream position, not the epoch, decides the order
        pass


class StreamLoader(DataLoader):
    """The training loader. Its state is the stream position, kept by the DataModule (``stream_consumed``: samples
    all devices consumed, from the global step), so Lightning knows a run resumed mid-epoch continues exactly."""

    def __init__(self, *args, datamodule: BaseDataModule, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.datamodule = datamodule

    def state_dict(self) -> dict:
        return {"stream_consumed": BaseDataModule.state_dict(self.datamodule)["stream_consumed"]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.sampler.next_position = int(state_dict["stream_consumed"]) // self.sampler.world_size


def split_batch(total: int, batch_gpu: int | None, world_size: int) -> tuple[int, int]:
    """(per-device batch, accumulation steps) with total = per-device * accumulation * world_size (EDM)."""
    if total % world_size:
        raise DiffscoreError(f"data.batch_size={total} (the total batch) is not divisible by {world_size} devices")
    per_device = total // world_size
    if batch_gpu is None or batch_gpu >= per_device:
        return per_device, 1
    if batch_gpu < 1 or per_device % batch_gpu:
        raise DiffscoreError(
            f"data.batch_gpu={batch_gpu} must divide the per-device batch {per_device} "
            f"(batch_size {total} over {world_size} devices)"
        )
    return batch_gpu, per_device // batch_gpu


class BaseDataModule(LightningDataModule):
    """Loaders over ``dataset(split)`` for split in train/val/test; subclasses provide the datasets."""

    # Constructor arguments that make the module write files, with the value that writes nothing: a data section
    # read from an untrusted checkpoint is built with these (diffscore.lit.datamodules.from_file).
    WRITE_ARGS: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        batch_size: int,
        batch_gpu: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        epoch_size: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DiffscoreError(f"data.batch_size must be >= 1, got {batch_size}")
        if batch_gpu is not None and batch_gpu < 1:
            raise DiffscoreError(f"data.batch_gpu must be >= 1 or null, got {batch_gpu}")
        if epoch_size is not None and epoch_size < batch_size:
            raise DiffscoreError(f"data.epoch_size must be >= batch_size ({batch_size}), got {epoch_size}")
        if num_workers < 0:
            raise DiffscoreError(f"data.num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.batch_gpu = batch_gpu
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.epoch_size = epoch_size
        self.pin_memory = pin_memory
        self.device_batch, self.accumulate = split_batch(batch_size, batch_gpu, 1)
        self.shuffle_seed = 0  # seed of the training order (StreamSampler)
        self._resume_consumed = 0  # samples of the whole stream consumed before this run (from a checkpoint)

    # Facts the model side needs (linked into the backbone by the CLI).
    @property
    def data_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def label_dim(self) -> int:
        """Number of classes the model is conditioned on (0 = unconditional)."""
        return 0

    def dataset(self, split: str) -> Dataset | None:
        """The "train", "val" (held-out) or "test" dataset; None when there is none."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        world = self.trainer.world_size if self.trainer is not None else 1
        self.device_batch, self.accumulate = split_batch(self.batch_size, self.batch_gpu, world)
        if self.trainer is not None and stage == "fit":
            if self.trainer.accumulate_grad_batches not in (1, self.accumulate):
                raise DiffscoreError(
                    "set the total batch with data.batch_size and the per-device cap with data.batch_gpu, "
                    "not trainer.accumulate_grad_batches"
                )
            self.trainer.accumulate_grad_batches = self.accumulate

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        if len(dataset) == 0:
            raise DiffscoreError(f"a {'training' if train else 'evaluation'} set of {type(self).__name__} is empty")
        batch = min(self.device_batch if train else (self.eval_batch_size or self.device_batch), len(dataset))
        sampler = None
        if train:  # a resumable stream; an epoch is epoch_size samples (default: the data once), whole batches
            world = self.trainer.world_size if self.trainer is not None else 1
            rank = self.trainer.global_rank if self.trainer is not None else 0
            per_rank = (self.epoch_size or len(dataset)) // world
            sampler = StreamSampler(len(dataset), max(batch, per_rank // batch * batch), self.shuffle_seed, rank, world)
            sampler.next_position = self._resume_consumed // world  # rank r reads stream positions p * world + r
        loader, extra = (StreamLoader, {"datamodule": self}) if train else (DataLoader, {})
        return loader(
            dataset,
            batch_size=batch,
            shuffle=False,
            sampler=sampler,
            generator=torch.Generator(),  # worker seeds never draw from the global RNG (exact resume)
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            **extra,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("train"), train=True)

    def val_dataloader(self) -> list[DataLoader]:
        heldout = self.dataset("val")
        if heldout is None or len(heldout) == 0:
            return []
        train = self.dataset("train")
        n = min(len(heldout), len(train))
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n].sort().values
        return [self._loader(heldout, train=False), self._loader(Subset(train, pick.tolist()), train=False)]

    def test_dataloader(self) -> DataLoader:
        test = self.dataset("test")
        if test is None:
            raise DiffscoreError(f"{type(self).__name__} has no test split")
        return self._loader(test, train=False)

    def state_dict(self) -> dict:
        """The training stream's position: samples consumed by all devices together (global step x total batch),
        so a run resumes on any number of devices where it stopped."""
        consumed = 0 if self.trainer is None else self.trainer.global_step * self.batch_size
        return {"stream_consumed": consumed}

    def load_state_dict(self, state_dict: dict) -> None:
        if "stream_position" in state_dict:  # older checkpoints: one rank's position, assumed on this many devices
            world = self.trainer.world_size if self.trainer is not None else 1
            self._resume_consumed = int(state_dict["stream_position"]) * world
        else:
            self._resume_consumed = int(state_dict.get("stream_consumed", 0))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, labels = batch
        if x.dtype == torch.uint8:
            x = x.to(torch.float32) / 127.5 - 1  # [0, 255] -> [-1, 1], on the device
        return x, labels


@runtime_checkable
class Captioned(Protocol):
    """A data module whose images have captions (MusicScore): the prompts of text-conditioned sampling."""

    def captions(self, split: str = "train") -> list[str]: ...


def split_images(dm: LightningDataModule, split: str = "train", limit: int | None = None) -> Tensor | None:
    """The images (or vectors) of a DataModule's split in [-1, 1], uint8 data mapped exactly as on the device in
    training: [N, ...]; None when the module has no such split."""
    dm.setup("fit")
    ds = dm.dataset(split)
    if ds is None:
        return None
    n = len(ds) if limit is None else min(limit, len(ds))
    loader = DataLoader(Subset(ds, range(n)), batch_size=512)
    batches = [dm.on_after_batch_transfer(batch, 0)[0].float() for batch in loader]
    return torch.cat(batches) if batches else None


def train_images(dm: LightningDataModule, limit: int | None = None) -> Tensor:
    """The training split's images (``split_images(dm, "train")``), which every data module has."""
    images = split_images(dm, "train", limit)
    if images is None:
        raise DiffscoreError(f"{type(dm).__name__} has no training images")
    return images
