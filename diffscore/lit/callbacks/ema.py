"""EDM's exponential moving average, on Lightning's WeightAveraging callback.

beta = 0.5 ** (images_per_step / halflife), halflife = min(halflife_images, rampup_ratio * images_seen), with
images_seen counted before the step, so the first update copies the weights (Karras et al. 2022, Appendix F.3:
half-life 0.5 Mimg, ramp-up ratio 0.05). The ramp-up matters on short runs: a fixed decay of 0.999 after 900
steps still holds 40% of the random initial weights.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

from diffscore.errors import DiffscoreError


class EDMEMA(WeightAveraging):
    """EMA of the weights with a half-life counted in training images, ramped up from the start of training.

    Checkpoints hold the EMA weights in ``state_dict`` (so ``load_from_checkpoint`` gives the EMA model) and
    the raw weights in ``current_model_state``; validation runs on the EMA weights.
    """

    def __init__(
        self,
        halflife_images: float = 500_000,  # EMA half-life in images (EDM CIFAR-10: 0.5 Mimg)
        rampup_ratio: float | None = 0.05,  # half-life <= this * images seen so far; None = no ramp-up
        device: str | None = None,  # keep the average on another device (e.g. "cpu") to save GPU memory
    ) -> None:
        if not 0 < halflife_images < math.inf:  # (NaN fails every comparison)
            raise DiffscoreError(f"EDMEMA.halflife_images must be a positive finite number, got {halflife_images}")
        if rampup_ratio is not None and not 0 < rampup_ratio < math.inf:
            raise DiffscoreError(f"EDMEMA.rampup_ratio must be positive or null, got {rampup_ratio}")
        super().__init__(device=device, use_buffers=False, multi_avg_fn=self._lerp)
        self.halflife_images = halflife_images
        self.rampup_ratio = rampup_ratio
        self.beta = 0.0
        self._raw_state: dict[str, Tensor] | None = None

    def decay(self, images_seen: float, images_per_step: float) -> float:
        """The EMA decay beta after ``images_seen`` images in steps of ``images_per_step``."""
        halflife = self.halflife_images
        if self.rampup_ratio is not None:
            halflife = min(halflife, images_seen * self.rampup_ratio)
        return 0.5 ** (images_per_step / max(halflife, 1e-8))

    def _lerp(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        # averaged <- beta * averaged + (1 - beta) * current, in place, one fused kernel per dtype/device
        torch._foreach_lerp_(averaged, [c.to(a.device) for a, c in zip(averaged, current)], 1.0 - self.beta)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning's version calls AveragedModel.update_parameters, which reads the update count back from the
        # GPU twice: a host sync every step (the H100 fit loop ran 23% below its training step). Here every
        # decision is made on the host; beta = 0 on the first update takes the weights as they are (EDM).
        step_idx = trainer.global_step - 1  # the optimizer step just taken, zero-based
        if trainer.global_step <= self._latest_update_step or not self.should_update(step_idx=step_idx):
            return
        x0 = batch[0] if isinstance(batch, list | tuple) else batch
        images_per_step = x0.shape[0] * trainer.world_size * trainer.accumulate_grad_batches
        self.beta = self.decay(step_idx * images_per_step, images_per_step)  # images seen before this step
        average = self._average_model
        assert average is not None  # built in setup("fit")
        averaged = [p.detach() for p in average.module.parameters()]
        self._lerp(averaged, [p.detach() for p in pl_module.parameters()], average.n_averaged)
        average.n_averaged += 1  # on its device, no read back
        self._latest_update_step = trainer.global_step

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._raw_state = None
        super().setup(trainer, pl_module, stage)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning copies the EMA into the model here, and ModelCheckpoint may save "last" right after:
        # keep the raw weights so that checkpoint still resumes from them, not from the EMA.
        self._raw_state = {  # non-tensor entries: extra states such as a text encoder's vocabulary
            k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
            for k, v in pl_module.state_dict().items()
        }
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._raw_state is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._raw_state

    def averaged_module(self) -> LightningModule | None:
        """The LightningModule holding the EMA weights (outside validation), or None before fit."""
        return None if self._average_model is None else self._average_model.module


def ema_module(trainer: Trainer, pl_module: LightningModule) -> LightningModule:
    """The module holding the EMA weights when an EDMEMA callback runs (outside validation), else ``pl_module``."""
    for cb in trainer.callbacks:
        if isinstance(cb, EDMEMA) and cb.averaged_module() is not None:
            return cb.averaged_module()
    return pl_module
