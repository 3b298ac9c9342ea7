"""DiffusionModule: an EDM denoiser (a preconditioning around an injected backbone) trained with the EDM loss,
optionally on augmented data (EDM's non-leaky augmentation, ScoreAug)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric

from diffscore.core.augment import NonLeakyAugment, ScoreAugment
from diffscore.core.augment_pipeline import AugmentPipeline
from diffscore.core.losses import augmented_loss, edm_loss
from diffscore.core.precond import PrecondSpec
from diffscore.core.recorded import config as recorded_config
from diffscore.core.schedules import LogNormalSigma
from diffscore.errors import DiffscoreError
from diffscore.lit.modules.settings import NonFinitePolicy, TrainingSpeed
from diffscore.loading.denoiser import build_denoiser
from diffscore.networks.backbone import Backbone, BackboneFacts
from diffscore.networks.group_norm import set_fused_norm
from diffscore.sampling.diffusion import DiffusionSampler
from diffscore.sampling.options import SamplerDefaults, SamplingOptions
from diffscore.sampling.speed import Speed

# A config's `optimizer: {class_path: torch.optim.Adam, init_args: {lr: ...}}` becomes such a callable.
OptimizerCallable = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
DEFAULT_VAL_SIGMAS = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 80.0)


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """EDM's CIFAR-10 optimizer: Adam(lr 1e-3, betas (0.9, 0.999), eps 1e-8)."""
    return torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)


def _check_settings(hp: Any) -> None:
    """Raise DiffscoreError, naming the option, for settings a DiffusionModule cannot train with."""
    if not math.isfinite(hp.P_mean) or not 0 < hp.P_std < math.inf:
        raise DiffscoreError(f"model: need a finite P_mean and P_std > 0; got P_mean={hp.P_mean}, P_std={hp.P_std}")
    if hp.lr_rampup_images < 0:
        raise DiffscoreError(f"model.lr_rampup_images must be >= 0, got {hp.lr_rampup_images}")
    if not all(0 < s < math.inf for s in hp.val_sigmas):
        raise DiffscoreError(f"model.val_sigmas must be positive, got {hp.val_sigmas}")
    if not 0 < hp.sigma_data < math.inf:
        raise DiffscoreError(f"model.sigma_data must be positive, got {hp.sigma_data}")


def _group(cls: type, value: Any, option: str) -> Any:
    """A settings group given as its dataclass or as a mapping (a saved checkpoint's, a Python caller's)."""
    if isinstance(value, cls):
        return value
    try:
        return cls(**(value or {}))
    except TypeError as e:
        raise DiffscoreError(f"model.{option}: {e}") from None


def optimizer_config(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": ...}`` of a built optimizer: its class and plain-valued defaults (lr,
    betas, momentum, ...), as a config would name them (``torch.optim.SGD``)."""
    cls = type(optimizer)
    public = getattr(torch.optim, cls.__name__, None) is cls
    path = f"torch.optim.{cls.__name__}" if public else f"{cls.__module__}.{cls.__qualname__}"
    plain = (bool, int, float, str, type(None))
    accepted = inspect.signature(cls.__init__).parameters  # (AdamW's defaults hold a key its constructor refuses)
    init = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in optimizer.defaults.items()
        if k in accepted and (isinstance(v, plain) or (isinstance(v, tuple) and all(isinstance(x, plain) for x in v)))
    }
    return {"class_path": path, "init_args": init}


def warmup_factor(step: int, images_per_step: int, rampup_images: int) -> float:
    """EDM's learning-rate warm-up: the factor for the optimizer step ``step`` (zero-based), after which
    (step + 1) * images_per_step images have been seen."""
    return min((step + 1) * images_per_step / rampup_images, 1.0)


class DiffusionModule(BackboneFacts, LightningModule):
    """EDM training (Karras et al. 2022): lognormal sigma, preconditioned denoiser, weighted L2 loss.

    Logs ``train/loss`` every step (the progress bar's ``loss`` every ``log_every_n_steps``); on validation, the
    denoising loss at each of ``val_sigmas`` (fixed noise) on the held-out split (``heldout/``), on an equal-size
    subset of the training split (``train_eval/``), and their difference (``gap/``), plus ``val/loss``, the
    held-out mean over the buckets. Under an EMA callback every validation number is for the EMA weights.
    ``sampler(options)`` draws samples (diffscore.sampling.DiffusionSampler) from the current weights.
    """

    def __init__(
        self,
        backbone: nn.Module,  # F(x_in, c_noise, cond, aug_label): e.g. diffscore.networks.UNet
        sigma_data: float = 0.5,  # standard deviation of the data (EDM's preconditioning and loss weight)
        P_mean: float = -1.2,  # ln(sigma) ~ N(P_mean, P_std^2) in training
        P_std: float = 1.2,
        optimizer: OptimizerCallable = default_optimizer,  # built on the parameters (Adam, lr 1e-3)
        lr_rampup_images: int = 0,  # linear learning-rate warm-up over this many images (EDM: 10M); 0 = off
        val_sigmas: list[float] = list(DEFAULT_VAL_SIGMAS),  # noqa: B006 - sigma buckets of the validation loss
        sampling: SamplerDefaults = SamplerDefaults(),  # sampler, steps, ... of sample grids and `diffscore sample`
        augment: list[NonLeakyAugment | ScoreAugment] | None = None,  # training augmenters, in label order
        nonfinite: NonFinitePolicy = NonFinitePolicy(),  # a non-finite loss: stop the run or skip the step
        speed: TrainingSpeed = TrainingSpeed(),  # GPU switches: compile, channels_last, fused_norm
        precond: PrecondSpec = PrecondSpec(),  # preconditioning (Karras et al. Table 1): edm, vp / ve / iddpm, edm2
    ) -> None:
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise DiffscoreError(
                f"model.backbone must be a diffscore.networks.backbone.Backbone (it declares data_shape, label_dim, "
                f"augment_dim and text_encoder), got {type(backbone).__name__}"
            )
        self.sampling = _group(SamplerDefaults, sampling, "sampling")
        self.nonfinite = _group(NonFinitePolicy, nonfinite, "nonfinite")
        self.speed = _group(TrainingSpeed, speed, "speed")
        precond = _group(PrecondSpec, precond, "precond")
        try:
            self.augment = AugmentPipeline(augment or [], backbone.augment_dim, len(backbone.data_shape) == 3)
            self.denoiser = build_denoiser(precond, backbone, sigma_data)
        except ValueError as e:
            raise DiffscoreError(f"model: {e} (set model.backbone.init_args.augment_dim / model.precond)") from None
        # The hyper-parameters are this module's own arguments as plain data (also when it is built while
        # LightningCLI builds another module, e.g. a DisBack teacher); the backbone and the augmenters are saved as
        # the records of how they were built, so a checkpoint rebuilds them without pickled code.
        records = [recorded_config(a) for a in self.augment.augmenters]
        self.save_hyperparameters(
            {
                **dict(sigma_data=sigma_data, P_mean=P_mean, P_std=P_std, lr_rampup_images=lr_rampup_images),
                "val_sigmas": list(val_sigmas),
                **{k: dataclasses.asdict(v) for k, v in (("sampling", self.sampling), ("nonfinite", self.nonfinite))},
                **{k: dataclasses.asdict(v) for k, v in (("speed", self.speed), ("precond", precond))},
                "augment": records,
            }
        )
        self.hparams["_class_path"] = f"{type(self).__module__}.{type(self).__qualname__}"
        recorded = recorded_config(backbone)  # None: a backbone built in Python from objects, not from a config
        if recorded is not None:
            self.hparams["backbone"] = recorded
        _check_settings(self.hparams)
        set_fused_norm(backbone, self.speed.fused_norm)
        self._compiled = None  # the compiled denoiser: a plain attribute, so state_dict keys stay unchanged
        self.sigma_law = LogNormalSigma(P_mean, P_std)
        self.optimizer_factory: Callable = optimizer
        self.lr_rampup_images = lr_rampup_images
        self.val_sigmas = list(val_sigmas)
        self._bad_steps = 0
        self.val_metrics = nn.ModuleDict(
            {f"{split}_{i}": MeanMetric() for split in ("heldout", "train_eval") for i in range(len(val_sigmas))}
        )
        self.register_buffer("_nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)

    @property
    def backbone(self) -> nn.Module:
        return self.denoiser.backbone

    @property
    def sigma_data(self) -> float:
        """The data's standard deviation of the loss weight (a subclass may fix it rather than save it)."""
        return float(self.hparams.get("sigma_data", 0.5))

    def sampler(self, options: SamplingOptions | None = None, **resources: Any) -> DiffusionSampler:
        """A sampler of the current weights (diffscore.sampling.DiffusionSampler) under ``options``."""
        trained = Speed(self.sampling.precision == "bf16", self.speed.channels_last, self.speed.compile)
        return DiffusionSampler(self.denoiser, self.sampling, options, trained=trained, **resources)

    # ----------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, aug_label: Tensor | None = None):
        return self.denoiser(x, sigma, cond, aug_label)

    def _cond(self, labels: Tensor) -> Tensor | None:
        return labels if self.conditional else None

    # ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        x0 = self._images(x0)
        sigma = self.sigma_law(x0.shape[0], device=x0.device)  # [B]
        noise = torch.randn_like(x0)
        per_sample = self._loss(x0, sigma, noise, self._cond(labels))  # [B]
        loss = per_sample.mean()
        if self.nonfinite.policy == "skip":
            bad = ~torch.isfinite(per_sample.detach())
            if bool(bad.any()):  # one host sync per step: the price of skipping
                self._bad_steps += 1
                sigmas = ", ".join(f"{s:.3g}" for s in sigma[bad].tolist()[:8])
                print(
                    f"diffscore: skipped step {self.global_step}: non-finite loss at sigma {sigmas} "
                    f"({self._bad_steps} in a row)",
                    flush=True,
                )
                self.log("train/skipped_steps", float(self._bad_steps))
                if self._bad_steps >= self.nonfinite.max_bad_steps:
                    raise DiffscoreError(
                        f"{self._bad_steps} consecutive non-finite steps up to step {self.global_step}; stopping. "
                        "The last checkpoint holds the last good weights; lower the learning rate or check the data."
                    )
                return None
            self._bad_steps = 0
        self.check_finite(loss)
        self.log("train/loss", loss)
        every = self.trainer.log_every_n_steps  # 0: Lightning logs nothing, and the bar shows no loss
        if every and self.global_step % every == 0:
            # The progress bar's copy, on the host. Lightning turns every prog_bar value into a Python number
            # after every step, a device->host read (a GPU sync per step); this one is read every N steps.
            self.log("loss", loss.detach().float().cpu(), prog_bar=True, logger=False)
        return loss

    def check_finite(self, loss: Tensor) -> None:
        """Note a non-finite loss on the device; raise (one host sync) every ``nonfinite.check_every`` steps."""
        self._nonfinite |= ~torch.isfinite(loss.detach())
        every = self.nonfinite.check_every
        if every and self.global_step % every == 0:
            self._raise_if_nonfinite()

    def on_fit_start(self) -> None:
        if self.sampling.precision is None:  # sample as trained: bf16 if it trained in bf16
            precision = "bf16" if "bf16" in str(self.trainer.precision) else "32"
            self.sampling = dataclasses.replace(self.sampling, precision=precision)
            self.hparams["sampling"]["precision"] = precision

    def setup(self, stage: str) -> None:
        if self.speed.channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    @property
    def train_denoiser(self) -> nn.Module:
        """The denoiser that training and validation call: compiled once if ``compile`` (same weights)."""
        if not self.speed.compile or self.device.type != "cuda":  # CPU runs (tests, smoke runs) stay eager
            return self.denoiser
        if self._compiled is None:  # set past nn.Module's registry: not a submodule, not in state_dict
            object.__setattr__(self, "_compiled", torch.compile(self.denoiser))
        return self._compiled

    def _images(self, x0: Tensor) -> Tensor:
        channels_last = self.speed.channels_last and x0.ndim == 4
        return x0.contiguous(memory_format=torch.channels_last) if channels_last else x0

    def _loss(self, x0: Tensor, sigma: Tensor, noise: Tensor, cond: Tensor | None) -> Tensor:
        """The per-sample loss [B]: EDM's, on augmented data if the module has augmenters (core.losses)."""
        return augmented_loss(self.train_denoiser, x0, sigma, noise, self.augment, cond, self.sigma_data)

    def _fixed_sigma_loss(self, x0: Tensor, sigma: Tensor, noise: Tensor, cond: Tensor | None) -> Tensor:
        """The per-sample loss [B] that validation and test report at each of ``val_sigmas``: EDM's."""
        return edm_loss(self.train_denoiser, x0, sigma, noise, cond, self.sigma_data)

    def _raise_if_nonfinite(self) -> None:
        if bool(self._nonfinite):
            raise DiffscoreError(
                f"non-finite training loss at or before step {self.global_step}; the run stopped before "
                "saving bad weights, the last checkpoint is the last good one. Lower the learning rate "
                "(model.optimizer) or check the data for NaN/Inf values."
            )

    def has_nonfinite(self) -> bool:
        return bool(self._nonfinite)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._raise_if_nonfinite()  # never write weights that a non-finite step may have touched
        # the global RNG drives sigma, noise and dropout: restoring it makes a resumed run continue exactly
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if states and self._trainer is not None and self._trainer.state.fn == "fit":
            torch.set_rng_state(states["torch"])
            if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states["cuda"])

    def configure_optimizers(self) -> dict[str, Any]:
        """The configured optimizer, and EDM's warm-up as a per-step LambdaLR (so LearningRateMonitor sees it):
        the step taken after images_seen images uses lr = base_lr * min(images_seen / lr_rampup_images, 1)."""
        optimizer = self.optimizer_factory(self.parameters())
        self.hparams["optimizer"] = optimizer_config(optimizer)  # what was built, for the checkpoint's record
        if not self.lr_rampup_images:
            return {"optimizer": optimizer}
        images_per_step = self.trainer.datamodule.batch_size  # the total batch: all devices and accumulation
        ramp = functools.partial(warmup_factor, images_per_step=images_per_step, rampup_images=self.lr_rampup_images)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, ramp)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def __getstate__(self) -> dict:
        # Copies (the EMA's deepcopy, pickles) never build an optimizer, and the CLI's optimizer factory can hold
        # a lock under DDP, which cannot be copied.
        state = super().__getstate__()
        state["optimizer_factory"] = None
        state["_compiled"] = None  # recompiled on first use
        return state

    # ----------------------------------------------------------------------------------------------------
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x0, labels = batch
        x0 = self._images(x0)
        split = "heldout" if dataloader_idx == 0 else "train_eval"
        g = torch.Generator(device=x0.device).manual_seed(batch_idx)  # the same noise at every validation
        noise = torch.randn(x0.shape, generator=g, device=x0.device)
        for i, s in enumerate(self.val_sigmas):
            sigma = torch.full((x0.shape[0],), s, device=x0.device)
            self.val_metrics[f"{split}_{i}"].update(self._fixed_sigma_loss(x0, sigma, noise, self._cond(labels)))

    def on_validation_epoch_end(self) -> None:
        # The MeanMetrics already reduce over ranks; sync_dist=True averages equal values (and keeps Lightning from
        # warning once per key under DDP).
        heldout, gaps = [], []
        for i, s in enumerate(self.val_sigmas):
            h = self.val_metrics[f"heldout_{i}"]
            t = self.val_metrics[f"train_eval_{i}"]
            if not h.update_called:  # a sanity check over loader 0 only, or no validation data
                continue
            h_val = h.compute()
            self.log(f"heldout/loss_s{s:g}", h_val, sync_dist=True)
            heldout.append(h_val)
            if t.update_called:
                t_val = t.compute()
                self.log(f"train_eval/loss_s{s:g}", t_val, sync_dist=True)
                self.log(f"gap/loss_s{s:g}", h_val - t_val, sync_dist=True)
                gaps.append(h_val - t_val)
            h.reset()
            t.reset()
        if heldout:
            self.log("val/loss", torch.stack(heldout).mean(), prog_bar=True, sync_dist=True)
        if gaps:
            self.log("gap/loss_mean", torch.stack(gaps).mean(), sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """`diffscore test`: the test split's denoising loss at each of ``val_sigmas``, with validation's noise."""
        self.validation_step(batch, batch_idx, dataloader_idx=0)

    def on_test_epoch_end(self) -> None:
        losses = []
        for i, s in enumerate(self.val_sigmas):
            metric = self.val_metrics[f"heldout_{i}"]
            if metric.update_called:
                losses.append(metric.compute())
                self.log(f"test/loss_s{s:g}", losses[-1], sync_dist=True)
                metric.reset()
        if losses:
            self.log("test/loss", torch.stack(losses).mean(), sync_dist=True)
