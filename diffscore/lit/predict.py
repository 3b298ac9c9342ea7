"""Drawing samples over devices: ``predict_over_seeds`` runs a diffscore.sampling.Sampler over seeds on all devices
with Lightning's predict loop (rank r takes seeds r, r + world, ...; no padding, no duplicates) and gathers the
results in seed order. Sample s depends on seed s only (diffscore.sampling.seeds), so the output is the same on
any number of devices and at any batch size.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from diffscore.errors import DiffscoreError, Stopped
from diffscore.lit.datamodules.seeds import SeedDataModule
from diffscore.sampling.base import Sampler


class SeedSampler(LightningModule):
    """Trainer.predict over integer seeds: each batch of seeds [B] -> {"seeds": [B], "samples": [B, ...] (in data
    space), "noise": [B, *data_shape] (the unit initial draws), and "latents" for a latent model}.

    On a GPU a batch smaller than the first (the last one) is padded with throwaway seeds to the first's size, so a
    compiled denoiser sees one shape and compiles once; the padding's samples are dropped."""

    def __init__(self, sampler: Sampler) -> None:
        super().__init__()
        self.sampler = sampler
        self.networks = sampler.networks  # registered here, so the trainer moves them to the device
        self._full = 0  # the largest batch seen

    def on_predict_start(self) -> None:
        """A channels-last run converts the weights it samples with too (they are the command's own copy, loaded
        for it; a training module converts its backbone itself when it trains channels-last)."""
        if self.sampler.speed().channels_last:
            self.networks.to(memory_format=torch.channels_last)

    def predict_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        seeds = batch.tolist()
        self._full = max(self._full, len(seeds))
        pad = self._full - len(seeds) if self.device.type == "cuda" else 0
        padded = seeds + [max(seeds) + 1 + i for i in range(pad)]
        if not self.trainer.is_global_zero:
            self.sampler.progress = False  # one bar, on rank zero
        drawn = self.sampler.draw(padded)  # samples (decoded), noise, and a latent model's latents
        return {"seeds": batch.cpu(), **{k: v[: len(seeds)].float().cpu() for k, v in drawn.items()}}


class ShardWriter(BasePredictionWriter):
    """Keeps ``reduce(prediction)`` of every batch and saves the rank's part to ``parts_dir/rank<r>.pt``.

    The default keeps seeds and samples; evaluation overrides ``reduce`` to keep features instead.
    """

    def __init__(self, parts_dir: Path) -> None:
        super().__init__(write_interval="batch_and_epoch")
        self.parts_dir = parts_dir
        self.kept: list[dict[str, Tensor]] = []
        self.batch_ends: list[tuple[float, int]] = []  # (time, samples so far) after each batch, this rank
        self.interrupted = False  # set by Ctrl-C (predict_over_seeds); checked after every batch

    def rate(self) -> float | None:
        """Samples per second on this rank after its first batch (start-up and compilation excluded)."""
        if len(self.batch_ends) < 2:
            return None
        (t0, n0), (t1, n1) = self.batch_ends[0], self.batch_ends[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)

    def reduce(self, prediction: dict[str, Tensor], pl_module: LightningModule) -> dict[str, Tensor]:
        return prediction

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.kept.append({k: v.cpu() for k, v in self.reduce(prediction, pl_module).items()})
        done = (self.batch_ends[-1][1] if self.batch_ends else 0) + len(prediction["seeds"])
        self.batch_ends.append((time.perf_counter(), done))
        if self.interrupted or trainer.received_sigterm:  # (Lightning's prediction loop never checks SIGTERM)
            raise Stopped("Ctrl-C" if self.interrupted else "SIGTERM")

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        part = {k: torch.cat([b[k] for b in self.kept]) for k in self.kept[0]} if self.kept else {}
        torch.save(part, self.parts_dir / f"rank{trainer.global_rank}.pt")
        self.kept = []


@dataclass(frozen=True)
class Devices:
    """Where sampling runs, as for Lightning's Trainer.

    Args:
        accelerator: "cpu", "gpu" or "auto".
        devices: number of devices, or "auto"; the seeds are split across them.
        strategy: Lightning strategy ("auto", "ddp", ...).
    """

    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"


def devices_in_use(devices: Devices) -> int:
    """How many devices a run will split its seeds over (before the trainer starts): the number given, or every GPU
    for "auto" on a GPU machine, else 1."""
    if isinstance(devices.devices, int) and devices.devices > 0:
        return devices.devices
    gpu = torch.cuda.is_available() and devices.accelerator in ("auto", "gpu", "cuda")
    return max(1, torch.cuda.device_count()) if gpu and devices.devices in ("auto", -1) else 1


def predict_over_seeds(
    sampler: Sampler, seeds: list[int], writer: ShardWriter, batch_size: int, devices: Devices
) -> dict[str, Tensor] | None:
    """Run ``sampler`` over ``seeds`` on all devices; rank 0 gets the parts merged in seed order (checked: each
    seed exactly once), other ranks None. The parts folder is removed whatever happens."""
    with _quiet_lightning():  # the "GPU available" lines: the command says what it uses
        trainer = _trainer(writer, devices)
    parts = writer.parts_dir
    if trainer.is_global_zero:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir()
    previous = _stop_on_ctrl_c(writer)  # installed right before the try whose finally gives it back
    try:
        trainer.strategy.barrier()
        trainer.predict(SeedSampler(sampler), datamodule=SeedDataModule(seeds, batch_size), return_predictions=False)
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return None
        shards = [torch.load(p, weights_only=True) for p in sorted(parts.glob("rank*.pt"))]
        shards = [s for s in shards if s]
        merged = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
        order = merged["seeds"].argsort()
        merged = {k: v[order] for k, v in merged.items()}
        if merged["seeds"].tolist() != sorted(seeds):
            raise DiffscoreError(f"internal: gathered {len(merged['seeds'])} results for {len(seeds)} seeds")
        return merged
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if trainer.is_global_zero:
            shutil.rmtree(parts, ignore_errors=True)


def _stop_on_ctrl_c(writer: ShardWriter):
    """Ctrl-C stops the prediction after the batch in flight (a second one at once); returns the handler it
    replaced (None off the main thread, where signals cannot be caught)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_sigint(signum, frame) -> None:
        writer.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    return signal.signal(signal.SIGINT, on_sigint)


def parts_folder(out: Path) -> Path:
    """A temporary folder beside ``out`` for the ranks' parts, unique to this command (two identical commands in
    one folder do not collide) and the same on every rank (DDP ranks inherit the launcher's environment)."""
    token = os.environ.setdefault("DIFFSCORE_RUN_TOKEN", secrets.token_hex(4))
    return out.with_name(f".{out.name}.parts-{token}")


@contextmanager
def _quiet_lightning():
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _trainer(writer: ShardWriter, devices: Devices) -> Trainer:
    """Lightning's predict loop over seeds: no logger, checkpoints or progress bar (the sampler shows its own)."""
    return Trainer(
        accelerator=devices.accelerator,
        devices=devices.devices,
        strategy=devices.strategy,
        benchmark=True,  # cuDNN picks the fastest convolutions for the one batch shape (as the GPU configs train)
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[writer],
    )
