"""DiffusionModule: an EDM denoiser (EDMPrecond around an injected backbone) trained with the EDM loss."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric

from diffscore.core.augment import NonLeakyAugment, ScoreAugment
from diffscore.core.losses import edm_loss, scoreaug_loss
from diffscore.core.precond import EDMPrecond, Preconditioning, VEPrecond, VPPrecond, iDDPMPrecond
from diffscore.core.samplers import nfe
from diffscore.core.schedules import LogNormalSigma
from diffscore.errors import DiffscoreError
from diffscore.lit.modules.denoiser_sampling import DenoiserSampling
from diffscore.networks.backbone import Backbone
from diffscore.networks.backbone import config as backbone_config
from diffscore.networks.group_norm import set_fused_norm

# A config's `optimizer: {class_path: torch.optim.Adam, init_args: {lr: ...}}` becomes such a callable.
OptimizerCallable = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
DEFAULT_VAL_SIGMAS = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 80.0)
AUGMENT_ARMS = ("none", "nonleaky", "scoreaug", "nonleaky+scoreaug")


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """EDM's CIFAR-10 optimizer: Adam(lr 1e-3, betas (0.9, 0.999), eps 1e-8)."""
    return torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)


MODULE_ARGUMENTS = ("backbone", "optimizer", "nonleaky", "scoreaug")  # objects, not hyper-parameters
PRECONDS = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond, "iddpm": iDDPMPrecond}


def build_precond(name: str, backbone: nn.Module, sigma_data: float, kwargs: dict | None) -> Preconditioning:
    """The preconditioning ``name`` around ``backbone`` (EDM's takes sigma_data, the others their constants)."""
    if name not in PRECONDS:
        raise DiffscoreError(f"model.precond must be one of {sorted(PRECONDS)}, got {name!r}")
    kwargs = dict(kwargs or {})
    if name == "edm":
        kwargs.setdefault("sigma_data", sigma_data)
    try:
        return PRECONDS[name](backbone, **kwargs)
    except (TypeError, ValueError) as e:
        raise DiffscoreError(f"model.precond_kwargs for {name}: {e}") from None


def _check_settings(hp: Any) -> None:
    """Raise DiffscoreError, naming the option, for settings a DiffusionModule cannot train or sample with."""
    if not math.isfinite(hp.P_mean) or not 0 < hp.P_std < math.inf:
        raise DiffscoreError(f"model: need a finite P_mean and P_std > 0; got P_mean={hp.P_mean}, P_std={hp.P_std}")
    if hp.lr_rampup_images < 0:
        raise DiffscoreError(f"model.lr_rampup_images must be >= 0, got {hp.lr_rampup_images}")
    if not all(0 < s < math.inf for s in hp.val_sigmas):
        raise DiffscoreError(f"model.val_sigmas must be positive, got {hp.val_sigmas}")
    if not 0 < hp.sigma_min < hp.sigma_max < math.inf or not 0 < hp.rho < math.inf or not 0 < hp.sigma_data < math.inf:
        raise DiffscoreError(
            f"model: need 0 < sigma_min < sigma_max, rho > 0 and sigma_data > 0; got sigma_min={hp.sigma_min}, "
            f"sigma_max={hp.sigma_max}, rho={hp.rho}, sigma_data={hp.sigma_data}"
        )
    try:
        nfe(hp.sampler, hp.num_steps)  # validates the sampler name and the step count
    except ValueError as e:
        raise DiffscoreError(f"model.sampler/num_steps: {e}") from None
    if hp.nan_policy not in ("stop", "skip"):
        raise DiffscoreError(f"model.nan_policy must be 'stop' or 'skip', got {hp.nan_policy!r}")
    if hp.sampling_precision not in (None, "bf16", "32"):
        raise DiffscoreError(f"model.sampling_precision must be bf16, 32 or null, got {hp.sampling_precision!r}")


def optimizer_config(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": ...}`` of a built optimizer: its class and plain-valued defaults (lr,
    betas, momentum, ...), as a config would name them (``torch.optim.SGD``)."""
    cls = type(optimizer)
    public = getattr(torch.optim, cls.__name__, None) is cls
    path = f"torch.optim.{cls.__name__}" if public else f"{cls.__module__}.{cls.__qualname__}"
    plain = (bool, int, float, str, type(None))
    init = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in optimizer.defaults.items()
        if isinstance(v, plain) or (isinstance(v, tuple) and all(isinstance(x, plain) for x in v))
    }
    return {"class_path": path, "init_args": init}


def warmup_factor(step: int, images_per_step: int, rampup_images: int) -> float:
    """EDM's learning-rate warm-up: the factor for the optimizer step ``step`` (zero-based), after which
    (step + 1) * images_per_step images have been seen."""
    return min((step + 1) * images_per_step / rampup_images, 1.0)


class DiffusionModule(DenoiserSampling, LightningModule):
    """EDM training (Karras et al. 2022): lognormal sigma, preconditioned denoiser, weighted L2 loss.

    Logs ``train/loss`` every step (the progress bar's ``loss`` every ``log_every_n_steps``); on validation, the
    denoising loss at each of ``val_sigmas`` (fixed noise) on the held-out split (``heldout/``), on an equal-size
    subset of the training split (``train_eval/``), and their difference (``gap/``), plus ``val/loss``, the
    held-out mean over the buckets. Under an EMA callback every validation number is for the EMA weights.
    """

    def __init__(
        self,
        backbone: nn.Module,  # F(x_in, c_noise, cond, aug_label): e.g. diffscore.networks.UNet
        sigma_data: float = 0.5,  # standard deviation of the data
        P_mean: float = -1.2,  # ln(sigma) ~ N(P_mean, P_std^2) in training
        P_std: float = 1.2,
        optimizer: OptimizerCallable = default_optimizer,  # built on the parameters (Adam, lr 1e-3)
        lr_rampup_images: int = 0,  # linear learning-rate warm-up over this many images (EDM: 10M); 0 = off
        val_sigmas: list[float] = list(DEFAULT_VAL_SIGMAS),  # noqa: B006 - sigma buckets of the validation loss
        sampler: str = "heun",  # default sampler for sample grids and `predict`
        num_steps: int = 18,  # default sampler steps (Heun 18 -> 35 NFE)
        sampler_kwargs: dict | None = None,  # extra options of the default sampler (e.g. Heun's s_churn)
        sigma_min: float = 0.002,  # sampler grid (Karras et al. Eq. 5)
        sigma_max: float = 80.0,
        rho: float = 7.0,
        nan_check_every: int = 1,  # "stop" policy: check the loss is finite every N steps (N > 1: no per-step sync)
        nan_policy: str = "stop",  # non-finite loss: "stop" the run, or "skip" the step (a host sync per step)
        max_bad_steps: int = 10,  # "skip": stop after this many consecutive skipped steps
        augment: str = "none",  # training augmentation arm: none | nonleaky | scoreaug | nonleaky+scoreaug
        nonleaky: NonLeakyAugment | None = None,  # EDM's clean-data augmentation (default p=0.12) for its arms
        scoreaug: ScoreAugment | None = None,  # ScoreAug's noisy-data transforms (default: all, one-of) for its arms
        compile: bool = False,  # torch.compile the denoiser for training and validation on CUDA (GPU configs: on)
        channels_last: bool = False,  # channels-last memory for the backbone and the images (GPU configs: on)
        fused_norm: bool = False,  # on CUDA, channels-last: group norm (+ shift, SiLU) as Triton kernels (experimental)
        precond: str = "edm",  # preconditioning (Karras et al. Table 1): edm, or vp / ve / iddpm (EDM's baselines)
        precond_kwargs: dict | None = None,  # its constants, e.g. VP's beta_d/beta_min, VE's sigma_min/sigma_max
        sampling_precision: str | None = None,  # on CUDA: "bf16" or "32" (None: set from the trainer's at fit)
    ) -> None:
        settings = {k: v for k, v in locals().items() if k not in ("self", "__class__", *MODULE_ARGUMENTS)}
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise DiffscoreError(
                f"model.backbone must be a diffscore.networks.backbone.Backbone (it declares data_shape, label_dim, "
                f"augment_dim and text_encoder), got {type(backbone).__name__}"
            )
        # The hyper-parameters are this module's own arguments (also when it is built while LightningCLI builds
        # another module, e.g. a DisBack teacher). Modules are not hyper-parameters: the backbone is saved as the
        # record of how it was built (diffscore.networks.backbone), so a checkpoint rebuilds it without pickled code.
        self.save_hyperparameters(settings)
        self.hparams["_class_path"] = f"{type(self).__module__}.{type(self).__qualname__}"
        recorded = backbone_config(backbone)  # None: a backbone built in Python from objects, not from a config
        if recorded is not None:
            self.hparams["backbone"] = recorded
        _check_settings(self.hparams)
        self.nonleaky, self.scoreaug = _augment_arm(augment, nonleaky, scoreaug, backbone)
        self.denoiser = build_precond(precond, backbone, sigma_data, precond_kwargs)
        set_fused_norm(backbone, fused_norm)
        self._compile, self.channels_last = compile, channels_last  # (nn.Module has a .compile method)
        self._compiled = None  # the compiled denoiser: a plain attribute, so state_dict keys stay unchanged
        self.sigma_law = LogNormalSigma(P_mean, P_std)
        self.optimizer_factory: Callable = optimizer
        self.lr_rampup_images = lr_rampup_images
        self.val_sigmas = list(val_sigmas)
        self.nan_check_every, self.nan_policy, self.max_bad_steps = nan_check_every, nan_policy, max_bad_steps
        self._bad_steps = 0
        self.val_metrics = nn.ModuleDict(
            {f"{split}_{i}": MeanMetric() for split in ("heldout", "train_eval") for i in range(len(val_sigmas))}
        )
        self.register_buffer("_nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)

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
        if self.nan_policy == "skip":
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
                if self._bad_steps >= self.max_bad_steps:
                    raise DiffscoreError(
                        f"{self._bad_steps} consecutive non-finite steps up to step {self.global_step}; stopping. "
                        "The last checkpoint holds the last good weights; lower the learning rate or check the data."
                    )
                return None
            self._bad_steps = 0
        self._nonfinite |= ~torch.isfinite(loss.detach())
        if self.nan_check_every and self.global_step % self.nan_check_every == 0:
            self._raise_if_nonfinite()
        self.log("train/loss", loss)
        every = self.trainer.log_every_n_steps  # 0: Lightning logs nothing, and the bar shows no loss
        if every and self.global_step % every == 0:
            # The progress bar's copy, on the host. Lightning turns every prog_bar value into a Python number
            # after every step, a device->host read (a GPU sync per step); this one is read every N steps.
            self.log("loss", loss.detach().float().cpu(), prog_bar=True, logger=False)
        return loss

    def on_fit_start(self) -> None:
        if self.hparams.sampling_precision is None:  # sample as trained: bf16 if it trained in bf16
            self.hparams.sampling_precision = "bf16" if "bf16" in str(self.trainer.precision) else "32"

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    @property
    def train_denoiser(self) -> nn.Module:
        """The denoiser that training and validation call: compiled once if ``compile`` (same weights)."""
        if not self._compile or self.device.type != "cuda":  # CPU runs (tests, smoke runs) stay eager
            return self.denoiser
        if self._compiled is None:  # set past nn.Module's registry: not a submodule, not in state_dict
            object.__setattr__(self, "_compiled", torch.compile(self.denoiser))
        return self._compiled

    def _images(self, x0: Tensor) -> Tensor:
        return x0.contiguous(memory_format=torch.channels_last) if self.channels_last and x0.ndim == 4 else x0

    def _loss(self, x0: Tensor, sigma: Tensor, noise: Tensor, cond: Tensor | None) -> Tensor:
        """The arm's per-sample loss [B]: EDM's, on non-leaky-augmented x0 if enabled, or ScoreAug's on top.
        The augmentation label is [nonleaky (9) | scoreaug (11)] for the enabled ones, zero-padded to the
        backbone's augment_dim (so every arm can share one network shape)."""
        B, device = x0.shape[0], x0.device
        labels = []
        if self.nonleaky is not None:
            params = self.nonleaky.sample_params(B, device=device)
            x0 = self.nonleaky.apply(x0, params)
            labels.append(self.nonleaky.label(params))
        sa_params = None
        if self.scoreaug is not None:
            sa_params = self.scoreaug.sample_params(B, device=device)
            labels.append(self.scoreaug.label(sa_params))
        aug_label = None
        if labels:
            aug_label = torch.cat(labels, dim=1)  # [B, A']
            aug_label = torch.nn.functional.pad(aug_label, (0, self.backbone.augment_dim - aug_label.shape[1]))
        sd, denoiser = self.hparams.sigma_data, self.train_denoiser
        if sa_params is not None:
            return scoreaug_loss(denoiser, x0, sigma, noise, self.scoreaug, sa_params, cond, sd, aug_label)
        return edm_loss(denoiser, x0, sigma, noise, cond, sd, aug_label)

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
        state.pop("_sampling_fns", None)
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
            loss = edm_loss(self.train_denoiser, x0, sigma, noise, self._cond(labels), self.hparams.sigma_data)
            self.val_metrics[f"{split}_{i}"].update(loss)

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


def _augment_arm(
    arm: str, nonleaky: NonLeakyAugment | None, scoreaug: ScoreAugment | None, backbone: nn.Module
) -> tuple[NonLeakyAugment | None, ScoreAugment | None]:
    """The augmenters an arm uses (defaults where the config gives none), checked against the backbone."""
    if arm not in AUGMENT_ARMS:
        raise DiffscoreError(f"model.augment must be one of {', '.join(AUGMENT_ARMS)}; got {arm!r}")
    parts = arm.split("+")
    nonleaky = (nonleaky or NonLeakyAugment()) if "nonleaky" in parts else None
    scoreaug = (scoreaug or ScoreAugment()) if "scoreaug" in parts else None
    needed = sum(a.label_dim for a in (nonleaky, scoreaug) if a is not None)
    have = backbone.augment_dim
    if have < needed:
        raise DiffscoreError(
            f"model.augment={arm!r} conditions on a {needed}-dimensional augmentation label (non-leaky 9, "
            f"ScoreAug 11); set model.backbone.init_args.augment_dim to {needed} or more (it is {have})"
        )
    if needed and len(backbone.data_shape) != 3:
        raise DiffscoreError(f"model.augment={arm!r} needs image data [C, H, W]; the backbone makes vectors")
    return nonleaky, scoreaug
