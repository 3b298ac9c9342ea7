"""Callbacks that put a run's curves in one place: ``<run>/metrics.jsonl`` (read by `diffscore report`)
and the logger (wandb charts): losses, held-out/gap per sigma, learning rate, throughput, sample quality."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from diffscore.errors import DiffscoreError
from diffscore.lit.callbacks.ema import ema_module
from diffscore.lit.callbacks.sample_grid import CallbackGuide
from diffscore.lit.callbacks.status import say
from diffscore.lit.datamodules.latents import reference_images
from diffscore.lit.datamodules.tensor import heldout_images
from diffscore.lit.modules.diffusion import DiffusionModule
from diffscore.lit.run_dir import run_dir
from diffscore.metrics.suite import (
    INCEPTION_METRICS,
    auto_metrics,
    compute_metrics,
    reference_statistics,
    sample_features,
)


def append_jsonl(trainer: Trainer, record: dict[str, Any]) -> None:
    """Append one record to ``<run>/metrics.jsonl`` (rank zero only)."""
    if not trainer.is_global_zero:
        return
    path = run_dir(trainer) / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        cut = False
        if f.seek(0, os.SEEK_END) > 0:  # a kill mid-line left the last record cut: start a fresh line
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        f.write((("\n" if cut else "") + json.dumps(record) + "\n").encode())


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            out[k] = float(v)
        elif isinstance(v, int | float):
            out[k] = float(v)
    return out


class RunLog(Callback):
    """Every ``every_n_steps`` steps: step, images seen, img/s, learning rate and the ``train/`` scalars; after each
    validation: all logged scalars; into metrics.jsonl (img/s and lr also to the logger). Syncs the device only at
    those steps."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps
        self._t0: float | None = None
        self._step0 = 0
        self._images_per_step = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.ckpt_path:  # records after this step that an earlier, killed start wrote are superseded
            append_jsonl(trainer, {"step": trainer.global_step, "resumed_from": str(trainer.ckpt_path)})

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        x0 = batch[0]
        self._images_per_step = x0.shape[0] * trainer.world_size * trainer.accumulate_grad_batches
        step = trainer.global_step
        if self._t0 is None:
            self._t0, self._step0 = time.perf_counter(), step
            return
        if step % self.every_n_steps or step == self._step0:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        rate = (step - self._step0) * self._images_per_step / max(now - self._t0, 1e-9)
        self._t0, self._step0 = now, step
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        extra = {"perf/img_per_s": rate, "lr": lr}
        for logger in trainer.loggers:
            logger.log_metrics(extra, step=step)
        # training scalars only: validation values are recorded once, when validation ends (no stale repeats)
        train_scalars = {k: v for k, v in _scalars(trainer.callback_metrics).items() if k.startswith("train/")}
        append_jsonl(
            trainer,
            {"step": step, "images": step * self._images_per_step, **extra, **train_scalars},
        )

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        append_jsonl(
            trainer,
            {
                "step": trainer.global_step,
                "images": trainer.global_step * self._images_per_step,
                **_scalars(trainer.callback_metrics),
            },
        )


class SampleQuality(Callback):
    """Every ``every_n_steps`` steps, sample the EMA weights (fixed seeds) and log sample quality as ``eval/*``:
    FD-digits for 8x8 digits, FID when Inception weights are available, and the memorized fraction; with
    ``guidance`` (and a ``guide`` file: guidance by a second network) of the guided samples."""

    def __init__(
        self,
        every_n_steps: int = 1000,  # 0 = only at the end of fit
        num_samples: int = 500,  # samples per evaluation (FD depends on it: compare runs at equal N)
        num_steps: int | None = None,  # sampler steps (default: the module's)
        metrics: str = "auto",  # as `diffscore evaluate --metrics`
        inception_weights: str | None = None,  # needed for fid (else fid is skipped with a warning)
        seed: int = 1_000_000,  # first seed (apart from the grid's)
        batch_size: int = 500,
        guidance: float = 1.0,  # guidance scale w (1: none)
        guide: str | None = None,  # the guiding network's file (as --guide; None: classifier-free guidance)
    ) -> None:
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.num_steps = num_steps
        self.metrics = metrics
        self.inception_weights = inception_weights
        self.seed = seed
        self.batch_size = batch_size
        self.guiding = CallbackGuide(guide, guidance, steps=num_steps)
        self._ready = False
        self._last = -1

    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        shape = tuple(pl_module.data_shape)
        scoreaug = isinstance(pl_module, DiffusionModule) and pl_module.augment.noisy is not None
        metrics = auto_metrics(shape, scoreaug) if self.metrics == "auto" else self.metrics
        self.wanted = {m.strip() for m in metrics.split(",") if m.strip()}
        if len(shape) != 3:
            self.wanted.discard("memorization")
        self.inception = self.digits = None
        if self.wanted & INCEPTION_METRICS:
            from diffscore.metrics.inception import InceptionFeatures

            try:
                self.inception = InceptionFeatures(self.inception_weights).to(pl_module.device)
            except DiffscoreError as e:
                print(f"diffscore: SampleQuality skips {sorted(self.wanted & INCEPTION_METRICS)}: {e}", flush=True)
                self.wanted -= INCEPTION_METRICS
        if "fd_digits" in self.wanted:
            from diffscore.metrics.digits_classifier import load_classifier

            self.digits = load_classifier(device=pl_module.device)
        dm = trainer.datamodule
        self.train = reference_images(dm).to(pl_module.device) if len(shape) == 3 else None
        held = heldout_images(dm)
        self.reference = reference_statistics(self.wanted, None, self.train, held, self.inception, self.digits)
        self._ready = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a last evaluation at the end, unless the run was shorter than one interval (smoke tests, debugging)
        if trainer.global_step != self._last and trainer.global_step >= self.every_n_steps:
            self.run(trainer, pl_module)

    @torch.no_grad()
    def run(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float] | None:
        self._last = trainer.global_step
        if not trainer.is_global_zero:
            return None
        if not self._ready:
            self._prepare(trainer, pl_module)
        if not self.wanted:
            return None
        module = ema_module(trainer, pl_module)
        what = ", ".join(sorted(self.wanted))
        say(trainer, f"step {trainer.global_step}: sample quality of {self.num_samples} EMA samples ({what})")
        feats: dict[str, list] = {"seeds": []}
        sampler = self.guiding.sampler(module)
        for start in range(self.seed, self.seed + self.num_samples, self.batch_size):
            seeds = list(range(start, min(start + self.batch_size, self.seed + self.num_samples)))
            x = sampler.images(seeds).float()
            feats["seeds"].append(torch.tensor(seeds))
            memo = self.train if "memorization" in self.wanted else None
            for k, v in sample_features(x, self.inception, self.digits, memo, "leakage" in self.wanted).items():
                feats.setdefault(k, []).append(v.cpu())
        merged = {k: torch.cat(v) for k, v in feats.items()}
        result = compute_metrics(merged, self.wanted, self.reference, [])
        scalars = {f"eval/{k}": float(v) for k, v in result.items() if k != "num_samples"}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        append_jsonl(trainer, {"step": trainer.global_step, **scalars})
        return scalars


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``. A last line cut short (no newline: a kill mid-write) is skipped with
    one warning; any other line that is not a JSON object is an error naming the file and the line."""
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number == len(lines) and not text.endswith("\n"):
            print(f"diffscore: warning: {path} line {number} is cut short (a killed run?); skipped", file=sys.stderr)
        else:
            raise DiffscoreError(f"{path} line {number} is not a JSON record ({line[:40]!r}); repair or delete it")
    return records
