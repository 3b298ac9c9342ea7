"""DiffusionModule: an EDM denoiser (EDMPrecond around an injected backbone) trained with the EDM loss."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric

from diffscore.core.augment import NonLeakyAugment, ScoreAugment
from diffscore.core.gaussian import skip_for_sigma, teleport
from diffscore.core.guidance import guided_denoiser
from diffscore.core.losses import edm_loss, scoreaug_loss
from diffscore.core.precond import EDMPrecond
from diffscore.core.samplers import get_sampler, nfe
from diffscore.core.schedules import LogNormalSigma, karras_sigmas
from diffscore.errors import DiffscoreError

# A config's `optimizer: {class_path: torch.optim.Adam, init_args: {lr: ...}}` becomes such a callable.
OptimizerCallable = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
DEFAULT_VAL_SIGMAS = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 80.0)
AUGMENT_ARMS = ("none", "nonleaky", "scoreaug", "nonleaky+scoreaug")


def _built_from_config() -> bool:
    """True while LightningCLI instantiates this module (it hands over the config as hyper-parameters)."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    return _given_hyperparameters.get() is not None


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """EDM's CIFAR-10 optimizer: Adam(lr 1e-3, betas (0.9, 0.999), eps 1e-8)."""
    return torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device) -> Tensor:
    """One N(0, I) draw of ``shape`` per seed, [len(seeds), *shape]: a sample depends on its seed only,
    not on the batch or the device count it was drawn in."""
    out = []
    for s in seeds:
        g = torch.Generator(device=device).manual_seed(int(s))
        out.append(torch.randn(tuple(shape), generator=g, device=device))
    return torch.stack(out)


def seeded_labels(seeds: Sequence[int], label_dim: int, device: torch.device) -> Tensor:
    """One class label per seed [len(seeds)], drawn like the noise: it depends on its seed only."""
    return torch.stack(
        [torch.randint(label_dim, (), generator=torch.Generator().manual_seed(int(s) + 1)) for s in seeds]
    ).to(device)


class DiffusionModule(LightningModule):
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
    ) -> None:
        super().__init__()
        # Built by the CLI, the hyper-parameters are the config itself (backbone and optimizer as class_path
        # dicts), so load_from_checkpoint rebuilds everything; built in Python, the modules are not saved and
        # load_from_checkpoint(path, backbone=...) needs the backbone again.
        in_python = ["backbone", "optimizer", "nonleaky", "scoreaug"]
        self.save_hyperparameters(ignore=[] if _built_from_config() else in_python)
        if lr_rampup_images < 0:
            raise DiffscoreError(f"model.lr_rampup_images must be >= 0, got {lr_rampup_images}")
        if any(s <= 0 for s in val_sigmas):
            raise DiffscoreError(f"model.val_sigmas must be positive, got {val_sigmas}")
        if not 0 < sigma_min < sigma_max or rho <= 0 or sigma_data <= 0:
            raise DiffscoreError(
                f"model: need 0 < sigma_min < sigma_max, rho > 0 and sigma_data > 0; got sigma_min={sigma_min}, "
                f"sigma_max={sigma_max}, rho={rho}, sigma_data={sigma_data}"
            )
        try:
            nfe(sampler, num_steps)  # validates the sampler name and the step count
        except ValueError as e:
            raise DiffscoreError(f"model.sampler/num_steps: {e}") from None
        self.nonleaky, self.scoreaug = _augment_arm(augment, nonleaky, scoreaug, backbone)
        self.denoiser = EDMPrecond(backbone, sigma_data)
        self._compile, self.channels_last = compile, channels_last  # (nn.Module has a .compile method)
        self._compiled = None  # the compiled denoiser: a plain attribute, so state_dict keys stay unchanged
        self.sigma_law = LogNormalSigma(P_mean, P_std)
        self.optimizer_factory: Callable = optimizer
        self.lr_rampup_images = lr_rampup_images
        self.val_sigmas = list(val_sigmas)
        self.nan_check_every = nan_check_every
        if nan_policy not in ("stop", "skip"):
            raise DiffscoreError(f"model.nan_policy must be 'stop' or 'skip', got {nan_policy!r}")
        self.nan_policy = nan_policy
        self.max_bad_steps = max_bad_steps
        self._bad_steps = 0
        self.val_metrics = nn.ModuleDict(
            {f"{split}_{i}": MeanMetric() for split in ("heldout", "train_eval") for i in range(len(val_sigmas))}
        )
        self.register_buffer("_nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)

    # ----------------------------------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        return self.denoiser.backbone

    @property
    def conditional(self) -> bool:
        """Conditioned on class labels (label_dim > 0) or on captions (a backbone with a text encoder)."""
        return getattr(self.backbone, "label_dim", 0) > 0 or getattr(self.backbone, "text_encoder", None) is not None

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, aug_label: Tensor | None = None):
        return self.denoiser(x, sigma, cond, aug_label)

    def _cond(self, labels: Tensor) -> Tensor | None:
        return labels if self.conditional else None

    # ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        x0 = self._images(x0)
        self._ramp_learning_rate(x0.shape[0])
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
            sa_params = self.scoreaug.sample_params(B, device=device, image_size=tuple(x0.shape[-2:]))
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

    def _ramp_learning_rate(self, local_batch: int) -> None:
        """EDM's warm-up: lr = base_lr * min(images_seen / lr_rampup_images, 1), set before each step."""
        if not self.lr_rampup_images:
            return
        images_per_step = local_batch * self.trainer.world_size * self.trainer.accumulate_grad_batches
        images_seen = (self.global_step + 1) * images_per_step
        factor = min(images_seen / self.lr_rampup_images, 1.0)
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])
                group["lr"] = group["base_lr"] * factor

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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())

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
            loss = edm_loss(self.train_denoiser, x0, sigma, noise, self._cond(labels), self.hparams.sigma_data)
            self.val_metrics[f"{split}_{i}"].update(loss)

    def on_validation_epoch_end(self) -> None:
        heldout, gaps = [], []
        for i, s in enumerate(self.val_sigmas):
            h = self.val_metrics[f"heldout_{i}"]
            t = self.val_metrics[f"train_eval_{i}"]
            if not h.update_called:  # a sanity check over loader 0 only, or no validation data
                continue
            h_val = h.compute()
            self.log(f"heldout/loss_s{s:g}", h_val)
            heldout.append(h_val)
            if t.update_called:
                t_val = t.compute()
                self.log(f"train_eval/loss_s{s:g}", t_val)
                self.log(f"gap/loss_s{s:g}", h_val - t_val)
                gaps.append(h_val - t_val)
            h.reset()
            t.reset()
        if heldout:
            self.log("val/loss", torch.stack(heldout).mean(), prog_bar=True)
        if gaps:
            self.log("gap/loss_mean", torch.stack(gaps).mean())

    # ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        seeds: Sequence[int],
        num_steps: int | None = None,
        sampler: str | None = None,
        cond: Tensor | None = None,
        data_shape: Sequence[int] | None = None,
        teleport_skip: int = 0,
        teleport_sigma: float | None = None,
        guidance: float = 1.0,
    ) -> Tensor:
        """Samples x0 [len(seeds), *data_shape] from the current weights; noise drawn per seed.

        ``cond``: class labels [B], or captions (a list of str) for a text backbone (None: the empty caption).
        ``guidance`` w != 1 applies classifier-free guidance against the null condition (diffscore.core.guidance).

        ``teleport_skip`` (or ``teleport_sigma``) replaces the first steps by the closed-form flow of
        ``self.teleport_gaussian`` (a GaussianDenoiser of the training data; Wang & Vastola 2024).
        """
        num_steps = num_steps or self.hparams.num_steps
        name = sampler or self.hparams.sampler
        sampler_fn = get_sampler(name)
        extra = (self.hparams.get("sampler_kwargs") or {}) if name == self.hparams.sampler else {}
        shape = tuple(data_shape) if data_shape is not None else self.data_shape
        sigmas = karras_sigmas(num_steps, self.hparams.sigma_min, self.hparams.sigma_max, self.hparams.rho)
        x = seeded_noise(seeds, shape, self.device) * float(sigmas[0])
        if teleport_sigma is not None:
            teleport_skip = skip_for_sigma(sigmas, teleport_sigma)
        if teleport_skip:
            gaussian = getattr(self, "teleport_gaussian", None)
            if gaussian is None:
                raise DiffscoreError("teleportation needs model.teleport_gaussian (a GaussianDenoiser of the data)")
            x, sigmas = teleport(gaussian.to(self.device), x, sigmas, teleport_skip)
        if getattr(self.backbone, "label_dim", 0) > 0 and cond is None:  # a seeded label per sample, like the noise
            cond = seeded_labels(seeds, self.backbone.label_dim, self.device)
        denoiser = self.denoiser if guidance == 1.0 else guided_denoiser(self.denoiser, guidance)
        was_training = self.training
        self.eval()
        try:
            return sampler_fn(denoiser, x, sigmas, cond, **extra)
        finally:
            self.train(was_training)

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The backbone's data_shape: [C, H, W] for a U-Net, [D] for an MLP."""
        shape = getattr(self.backbone, "data_shape", None)
        if shape is None:
            raise DiffscoreError(f"backbone {type(self.backbone).__name__} has no data_shape; pass data_shape")
        return tuple(shape)

    def predict_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        """``batch`` holds integer seeds [B]; returns {"seeds": [B], "samples": [B, ...]}."""
        opts = dict(getattr(self, "predict_options", {}))  # set by `diffscore sample`
        label = opts.pop("class_label", None)
        prompt, prompts = opts.pop("prompt", None), opts.pop("prompts", None)
        cond = None if label is None else torch.full((len(batch),), label, dtype=torch.long, device=self.device)
        if prompt is not None:
            cond = [prompt] * len(batch)
        if prompts is not None:  # one caption per seed (evaluate --prompts): independent of the batching
            cond = [prompts[s % len(prompts)] for s in batch.tolist()]
        samples = self.generate(batch.tolist(), cond=cond, **opts)
        return {"seeds": batch.cpu(), "samples": samples.float().cpu()}


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
    have = getattr(backbone, "augment_dim", 0)
    if have < needed:
        raise DiffscoreError(
            f"model.augment={arm!r} conditions on a {needed}-dimensional augmentation label (non-leaky 9, "
            f"ScoreAug 11); set model.backbone.init_args.augment_dim to {needed} or more (it is {have})"
        )
    if needed and len(getattr(backbone, "data_shape", ())) != 3:
        raise DiffscoreError(f"model.augment={arm!r} needs image data [C, H, W]; the backbone makes vectors")
    return nonleaky, scoreaug
