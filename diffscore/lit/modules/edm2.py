"""EDM2Module: EDM2's training recipe (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", arXiv 2312.02696, config G; NVlabs/edm2 ``train_edm2.py`` and ``training/training_loop.py``) on the same
`diffscore fit` as EDM's.

- the denoiser is EDM2's preconditioning (EDM's with sigma_data 0.5) around the backbone (an EDM2UNet), with EDM2's
  uncertainty head u(sigma) beside it (diffscore.loading.denoiser: "edm2");
- the loss is the uncertainty-weighted one (Eq. 21; diffscore.core.losses.edm2_loss, augmented_edm2_loss under a
  training augmentation such as ScoreAug, whose label reaches the EDM2UNet through its augment embedding), summed
  over the pixels as EDM2 does (``loss.sum() / batch``): Adam's eps sees EDM2's gradient scale;
- sigma is lognormal with the preset's P_mean, P_std;
- the learning rate is EDM2's schedule (diffscore.core.schedules.edm2_learning_rate: ref_lr / sqrt(max(t / t_ref,
  1)) times a linear ramp-up over 10M images, evaluated at the images seen before each step), a per-step LambdaLR
  over the optimizer's lr (= ref_lr; EDM2's default optimizer: Adam, betas (0.9, 0.99), eps 1e-8, lr the preset's);
- forced weight normalisation (Eq. 66): every magnitude-preserving weight is renormalised after each optimizer step
  (and once before the first), which runs through the same weights as EDM2's in-forward copy;
- non-finite gradients are zeroed before each step (EDM2's ``force_finite``).

EDM2's post-hoc EMA is the PostHocEMA callback (tracking sigma_rel 0.05 and 0.10 in the EDM2 configs). Checkpoints
open as a LoadedModel (diffscore.loading.checkpoint knows this module's preconditioning), sample with EDM2's
generate_images.py settings (Heun, 32 steps) and resume with --ckpt_path.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor, nn

from diffscore.core.edm2_presets import edm2_preset
from diffscore.core.losses import augmented_edm2_loss
from diffscore.core.schedules import edm2_learning_rate
from diffscore.errors import DiffscoreError
from diffscore.lit.modules.diffusion import DEFAULT_VAL_SIGMAS, DiffusionModule, OptimizerCallable, optimizer_config
from diffscore.lit.modules.settings import NonFinitePolicy, TrainingSpeed
from diffscore.loading.denoiser import edm2_spec
from diffscore.networks.mp_layers import normalize_mp_weights_, set_forced_normalization
from diffscore.sampling.options import SamplerDefaults

# Without a preset: the defaults of EDM2's code (EDM2Loss, learning_rate_schedule).
EDM2_DEFAULTS = dict(P_mean=-0.4, P_std=1.0, lr=0.0100, decay=70000)
EDM2_SAMPLING = SamplerDefaults(steps=32)  # generate_images.py: Heun, 32 steps, sigma 0.002..80, rho 7


def edm2_optimizer(params, lr: float = EDM2_DEFAULTS["lr"]) -> torch.optim.Optimizer:
    """EDM2's optimizer: Adam(betas (0.9, 0.99), eps 1e-8); ``lr`` is ref_lr (the preset's when the config names
    no optimizer)."""
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), eps=1e-8)


def edm2_lr_factor(step: int, batch_size: int, ref_batches: float, rampup_images: float) -> float:
    """The factor on ref_lr of optimizer step ``step`` (zero-based): EDM2's schedule at the images seen before it,
    step * batch_size (so the first step runs at lr 0, as EDM2's)."""
    return edm2_learning_rate(step * batch_size, 1.0, ref_batches, batch_size, rampup_images)


class EDM2Module(DiffusionModule):
    """EDM2 training (Karras et al. 2024): EDM2Precond with the logvar head, the uncertainty-weighted loss, EDM2's
    learning-rate schedule and forced weight normalisation. Validation, sampling and the callbacks are the
    DiffusionModule's (the validation loss is EDM's plain weighted L2, comparable across modules)."""

    def __init__(
        self,
        backbone: nn.Module,  # F(x_in, c_noise, cond, aug_label): diffscore.networks.EDM2UNet
        preset: str | None = None,  # EDM2's training preset, e.g. "edm2-img64-s": P_mean, P_std, ref_lr, decay
        P_mean: float | None = None,  # ln(sigma) ~ N(P_mean, P_std^2) (None: the preset's; EDM2Loss: -0.4)
        P_std: float | None = None,  # (None: the preset's; EDM2Loss: 1.0)
        optimizer: OptimizerCallable = edm2_optimizer,  # its lr is ref_lr (default: Adam, the preset's lr)
        lr_decay_batches: float | None = None,  # t_ref: steps before the 1/sqrt decay (None: preset's; 0: off)
        lr_rampup_images: float = 10e6,  # linear learning-rate ramp-up over this many images (EDM2: 10M; 0: off)
        val_sigmas: list[float] = list(DEFAULT_VAL_SIGMAS),  # noqa: B006 - sigma buckets of the validation loss
        sampling: SamplerDefaults = EDM2_SAMPLING,  # sampler of sample grids and `diffscore sample` (EDM2's: Heun 32)
        augment: list[Any] | None = None,  # training augmenters (NonLeakyAugment / ScoreAugment), in label order
        nonfinite: NonFinitePolicy = NonFinitePolicy(),  # a non-finite loss: stop the run or skip the step
        speed: TrainingSpeed = TrainingSpeed(),  # GPU switches: compile, channels_last
    ) -> None:
        row = edm2_preset(preset) if preset is not None else None
        P_mean = _choose(P_mean, row.P_mean if row else EDM2_DEFAULTS["P_mean"])
        P_std = _choose(P_std, row.P_std if row else EDM2_DEFAULTS["P_std"])
        decay = _choose(lr_decay_batches, row.decay if row else EDM2_DEFAULTS["decay"])
        if not 0 <= decay < math.inf or not 0 <= lr_rampup_images < math.inf:
            raise DiffscoreError(
                f"model: lr_decay_batches ({decay}) and lr_rampup_images ({lr_rampup_images}) must be >= 0 and finite"
            )
        _check_width(row, preset, backbone)
        super().__init__(
            backbone,
            sigma_data=0.5,
            P_mean=P_mean,
            P_std=P_std,
            optimizer=optimizer,
            val_sigmas=val_sigmas,
            sampling=sampling,
            augment=augment,
            nonfinite=nonfinite,
            speed=speed,
            precond=edm2_spec(),
        )
        self.ref_lr = row.lr if row else EDM2_DEFAULTS["lr"]  # the default optimizer's lr
        self.lr_decay_batches, self.lr_rampup_images = float(decay), float(lr_rampup_images)
        # The saved settings are this module's own arguments (a resumed run rebuilds it from them); the
        # preconditioning is implied by the class (diffscore.loading.checkpoint).
        for key in ("sigma_data", "precond"):
            self.hparams.pop(key, None)
        self.hparams.update(preset=preset, lr_decay_batches=float(decay), lr_rampup_images=float(lr_rampup_images))

    # ----------------------------------------------------------------------------------------------------
    def _loss(self, x0: Tensor, sigma: Tensor, noise: Tensor, cond: Tensor | None) -> Tensor:
        """EDM2's per-sample loss [B], summed over the C*H*W elements as EDM2's loss.sum() / batch is."""
        per_element = augmented_edm2_loss(self.train_denoiser, x0, sigma, noise, self.augment, cond, 0.5)
        return per_element * math.prod(x0.shape[1:])

    def setup(self, stage: str) -> None:
        super().setup(stage)
        set_forced_normalization(self.denoiser, False)  # renormalised after each step instead (optimizer_step)

    def on_train_start(self) -> None:
        if self.global_step == 0:  # a fresh run (or --init_from); a resumed one continues from normalised weights
            normalize_mp_weights_(self.denoiser)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        for grad in grads:  # EDM2's force_finite
            torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        normalize_mp_weights_(self.denoiser)  # forced weight normalisation (EDM2 Eq. 66)

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer (EDM2's Adam with the preset's lr unless configured) and EDM2's schedule as a per-step
        LambdaLR on its lr, with the total batch of all devices and accumulation."""
        if self.optimizer_factory is edm2_optimizer:
            optimizer = edm2_optimizer(self.parameters(), self.ref_lr)
        else:
            optimizer = self.optimizer_factory(self.parameters())
        self.hparams["optimizer"] = optimizer_config(optimizer)
        batch = self.trainer.datamodule.batch_size
        factor = functools.partial(
            edm2_lr_factor, batch_size=batch, ref_batches=self.lr_decay_batches, rampup_images=self.lr_rampup_images
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _choose(given: float | None, default: float) -> float:
    return float(default if given is None else given)


def _check_width(row: Any, preset: str | None, backbone: nn.Module) -> None:
    """A training preset fixes the network's width: an EDM2UNet of another width is refused, naming both."""
    width = getattr(backbone, "model_channels", None)
    if row is not None and width is not None and width != row.channels:
        raise DiffscoreError(
            f"model.preset {preset} trains model_channels {row.channels}, but the backbone has {width}; set "
            f"model.backbone.init_args.preset to its size or leave model.preset out"
        )
