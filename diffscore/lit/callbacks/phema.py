"""EDM2's power-function EMA, tracked during training and stored as snapshots for the post-hoc EMA.

Karras et al. 2024 (EDM2, Sec. 3.1-3.2 and Appendix C) track two power-function EMA profiles (sigma_rel 0.05 and
0.10) and save both every few million images; afterwards `diffscore phema` combines the snapshots into the EMA of
any sigma_rel by least squares (diffscore.core.phema). Time is counted in training images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from diffscore.core.phema import power_beta, sigma_rel_to_gamma
from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write
from diffscore.lit.run_dir import run_dir

SNAPSHOT_FORMAT = "diffscore-phema-1"
SNAPSHOT_DIR = "phema"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def snapshot_name(images: int) -> str:
    """The file name of the snapshot taken after ``images`` training images."""
    return f"phema-{images:012d}.pt"


class PostHocEMA(Callback):
    """Power-function EMAs of the parameters (EDM2 Sec. 3.1, Eq. 127: beta = (1 - dt/t)^(gamma + 1), t = images
    seen) for each of ``sigma_rels``, with snapshots of all of them every ``snapshot_every_images`` images and at
    the end of fit in ``<run>/phema/phema-<images>.pt`` (rank zero writes, atomically).

    No host sync per step: the betas are host floats from the image count, and one fused ``_foreach_lerp_``
    updates every profile. The averages (float32, the parameters' dtype) live in the callback's state in Lightning
    checkpoints, so ``--ckpt_path`` resumes them exactly. Beside ``EDMEMA`` nothing else changes; alone, the
    checkpoint's ``state_dict`` keeps the raw weights (so sampling and validation during and after fit use them)
    and `diffscore phema --run RUN` writes EMA checkpoints. Parameters only: buffers come from the checkpoint.
    """

    def __init__(
        self,
        sigma_rels: list[float] = (0.05, 0.10),  # relative widths to track (EDM2 tracks 0.05 and 0.10)
        snapshot_every_images: int = 1_000_000,  # images between snapshots (EDM2: 8 Mimg on ImageNet)
        snapshot_dtype: str = "float16",  # float16 | bfloat16 | float32 storage of the snapshots
        device: str | None = None,  # keep the averages on another device (e.g. "cpu") to save GPU memory
    ) -> None:
        self.sigma_rels = [float(s) for s in sigma_rels]
        if not self.sigma_rels or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise DiffscoreError(f"PostHocEMA.sigma_rels must be distinct values, got {list(sigma_rels)}")
        self.gammas = [float(g) for g in sigma_rel_to_gamma(torch.tensor(self.sigma_rels))]
        if int(snapshot_every_images) != snapshot_every_images or snapshot_every_images <= 0:
            raise DiffscoreError(
                f"PostHocEMA.snapshot_every_images must be a positive number of images, got {snapshot_every_images}"
            )
        if snapshot_dtype not in DTYPES:
            raise DiffscoreError(f"PostHocEMA.snapshot_dtype must be one of {', '.join(DTYPES)}, got {snapshot_dtype}")
        self.snapshot_every_images = int(snapshot_every_images)
        self.snapshot_dtype = snapshot_dtype
        self.device = device
        self.images = 0  # images seen by the updates so far (EDM2's t)
        self.last_snapshot_images = 0
        self.snapshots_written: list[Path] = []
        self._latest_update_step = 0
        self._names: list[str] = []
        self._averages: list[list[Tensor]] | None = None  # [profile][parameter]
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if sum(isinstance(cb, PostHocEMA) for cb in trainer.callbacks) > 1:
            raise DiffscoreError("trainer.callbacks holds more than one PostHocEMA; list all sigma_rels in one")

    # ------------------------------------------------------------------------------------------------ tracking
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._names = [n for n, _ in pl_module.named_parameters()]
        params = [p.detach() for p in pl_module.parameters()]
        if self._pending is not None:
            saved = self._pending
            if saved["names"] != self._names:
                raise DiffscoreError("PostHocEMA: the checkpoint's averages name other parameters than the model's")
            self._averages = [
                [a.to(self.device or p.device, p.dtype, copy=True) for a, p in zip(avg, params, strict=True)]
                for avg in saved["ema"]
            ]
            self._pending = None
        else:  # overwritten by the first update (beta = 0); a run resumed without our state starts here
            self._averages = [[p.to(self.device or p.device, copy=True) for p in params] for _ in self.gammas]

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step <= self._latest_update_step:  # accumulating gradients: no optimizer step yet
            return
        x0 = batch[0] if isinstance(batch, list | tuple) else batch
        images_per_step = int(x0.shape[0]) * trainer.world_size * trainer.accumulate_grad_batches
        if self.images == 0 and trainer.global_step > 1:
            self._start_late(trainer, images_per_step)
        self.images += images_per_step
        weights = [1.0 - power_beta(g, self.images, images_per_step) for g in self.gammas]  # host floats
        assert self._averages is not None  # built in on_train_start
        current = [p.detach() for p in pl_module.parameters()]
        averaged = [a for avg in self._averages for a in avg]
        targets = [c.to(a.device) for avg in self._averages for a, c in zip(avg, current)]
        steps = [w for w in weights for _ in current]
        torch._foreach_lerp_(averaged, targets, steps)  # averaged <- averaged + (1 - beta) (current - averaged)
        self._latest_update_step = trainer.global_step
        if self.images // self.snapshot_every_images > self.last_snapshot_images // self.snapshot_every_images:
            self.write_snapshot(trainer)

    def _start_late(self, trainer: Trainer, images_per_step: int) -> None:
        print(
            f"diffscore: PostHocEMA starts at step {trainer.global_step} (the checkpoint holds no PostHocEMA state): "
            "its profiles count the weights of the earlier steps as equal to the current ones",
            flush=True,
        )
        self.images = (trainer.global_step - 1) * images_per_step
        self.last_snapshot_images = self.images

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.images > self.last_snapshot_images:
            self.write_snapshot(trainer)

    # ------------------------------------------------------------------------------------------------ snapshots
    def snapshot(self) -> dict[str, Any]:
        """The averages now, in ``snapshot_dtype`` on the CPU, with their sigma_rel, gamma and time."""
        assert self._averages is not None
        dtype = DTYPES[self.snapshot_dtype]
        return {
            "format": SNAPSHOT_FORMAT,
            "images": self.images,
            "step": self._latest_update_step,
            "sigma_rels": list(self.sigma_rels),
            "gammas": list(self.gammas),
            "dtype": self.snapshot_dtype,
            "ema": [{n: a.detach().to("cpu", dtype) for n, a in zip(self._names, avg)} for avg in self._averages],
        }

    def write_snapshot(self, trainer: Trainer) -> Path | None:
        """Write ``<run>/phema/phema-<images>.pt`` on rank zero (atomically); returns its path there."""
        self.last_snapshot_images = self.images
        if not trainer.is_global_zero:
            return None
        path = run_dir(trainer) / SNAPSHOT_DIR / snapshot_name(self.images)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            torch.save(self.snapshot(), tmp)
        self.snapshots_written.append(path)
        return path

    # ------------------------------------------------------------------------------------------------ resuming
    def state_dict(self) -> dict[str, Any]:
        ema = None
        if self._averages is not None:
            ema = [[a.detach().clone() for a in avg] for avg in self._averages]
        elif self._pending is not None:
            ema = self._pending["ema"]
        return {
            "sigma_rels": list(self.sigma_rels),
            "images": self.images,
            "last_snapshot_images": self.last_snapshot_images,
            "latest_update_step": self._latest_update_step,
            "names": list(self._names) if self._averages is not None else (self._pending or {}).get("names", []),
            "ema": ema,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if [float(s) for s in state_dict["sigma_rels"]] != self.sigma_rels:
            raise DiffscoreError(
                f"PostHocEMA: the checkpoint tracked sigma_rels {state_dict['sigma_rels']}, the config asks for "
                f"{self.sigma_rels}; resume with the same PostHocEMA.sigma_rels"
            )
        self.images = int(state_dict["images"])
        self.last_snapshot_images = int(state_dict["last_snapshot_images"])
        self._latest_update_step = int(state_dict["latest_update_step"])
        if state_dict.get("ema") is not None:
            self._pending = {"names": list(state_dict["names"]), "ema": state_dict["ema"]}
