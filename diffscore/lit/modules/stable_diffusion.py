"""StableDiffusionModule: fine-tuning the U-Net of a Stable Diffusion folder on latents with captions, the text
encoder and the VAE frozen (MusicScore's system: SD 2 base fine-tuned on score pages with metadata captions, Lin,
Dai & Kong 2024, Sec. 4.2).

The network is the folder's U-Net + CLIP text encoder (diffscore.loading.sd_backbone.StableDiffusionFolder) inside
its discrete-DDPM preconditioning; the data are a latent dataset (diffscore.lit.datamodules.LatentDataModule) of
the folder's VAE. Captions are dropped (replaced by "") with probability ``caption_dropout``, so the model keeps an
unconditional mode for classifier-free guidance (Ho & Salimans 2022). Objective (``Objective.kind``):
- "ddpm" (default): Stable Diffusion's own loss, the MSE of the U-Net's epsilon (or v) prediction at timesteps
  drawn uniformly from the T trained ones (Ho et al. 2020, Algorithm 1; diffscore.core.discrete_ddpm.ddpm_loss).
  SD was trained with it, so fine-tuning keeps the weighting over noise levels that its weights were trained under.
- "edm": EDM's lognormal sigma law and weighting lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
  (Karras et al. 2022, Table 1), sigma clipped to the schedule's range [sigma_0, sigma_{T-1}].
Everything else is the DiffusionModule's: the EMA callback, DDP, bf16 (trainer.precision), sample grids (decoded
by the VAE). A checkpoint records the folder's path, not the frozen parts' weights' origin: it opens through
diffscore.loading.open_model (the folder's networks with the checkpoint's EMA weights) and resumes with --ckpt_path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffscore.core.discrete_ddpm import UniformTimesteps, ddpm_loss
from diffscore.core.losses import edm_loss
from diffscore.core.schedules import LogNormalSigma
from diffscore.errors import DiffscoreError
from diffscore.lit.modules.diffusion import DiffusionModule, OptimizerCallable, _group
from diffscore.lit.modules.settings import NonFinitePolicy, TrainingSpeed
from diffscore.loading.sd_backbone import Shared, StableDiffusionFolder
from diffscore.loading.sd_model import folder_defaults
from diffscore.networks.sd_unet import NULL_CAPTION
from diffscore.sampling.diffusion import DiffusionSampler
from diffscore.sampling.options import SamplerDefaults, SamplingOptions

OBJECTIVES = ("ddpm", "edm")
SD_VAL_SIGMAS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)  # inside SD's [0.029, 14.6]


def finetune_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW(lr 1e-5, betas (0.9, 0.999), weight decay 1e-2, eps 1e-8): diffusers' text-to-image fine-tuning
    example's settings at the learning rate of MusicScore's released run ("lr_1e-5")."""
    return torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)


@dataclass(frozen=True)
class Objective:
    """What fine-tuning minimises (module docstring).

    Args:
        kind: "ddpm" (Stable Diffusion's own epsilon/v loss at uniform timesteps) or "edm".
        P_mean: "edm": mean of ln(sigma) (EDM2's latent value -0.4; ours for SD).
        P_std: "edm": std of ln(sigma) (EDM2's latent value 1.0; ours for SD).
        sigma_data: "edm": the weighting's data std (SD's latents are scaled to about unit variance: 1; ours).
    """

    kind: str = "ddpm"
    P_mean: float = -0.4
    P_std: float = 1.0
    sigma_data: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise DiffscoreError(f"model.objective.kind must be one of {OBJECTIVES}, got {self.kind!r}")
        if not 0 < self.P_std < float("inf") or not 0 < self.sigma_data < float("inf"):
            raise DiffscoreError("model.objective: need P_std > 0 and sigma_data > 0")


class ClippedLogNormal(LogNormalSigma):
    """EDM's lognormal sigma, clipped to a denoiser's supported [sigma_min, sigma_max]."""

    def __init__(self, P_mean: float, P_std: float, sigma_min: float, sigma_max: float) -> None:
        super().__init__(P_mean, P_std)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, batch: int, **kwargs: Any) -> Tensor:
        return super().__call__(batch, **kwargs).clamp(self.sigma_min, self.sigma_max)


class StableDiffusionModule(DiffusionModule):
    """Fine-tunes the U-Net of the Stable Diffusion folder ``pretrained`` (text encoder and VAE frozen)."""

    def __init__(
        self,
        pretrained: str | None = None,  # the diffusers folder to fine-tune (MusicScore: stable-diffusion-2-base)
        objective: Objective = Objective(),  # "ddpm" (SD's own loss, the default) or "edm"
        caption_dropout: float = 0.1,  # replace a training caption by "" with this probability (guidance)
        gradient_checkpointing: bool = False,  # recompute the U-Net's activations in the backward pass
        trust_pretrained: bool = False,  # also read the folder's pickled *.bin weights (a folder you trust)
        optimizer: OptimizerCallable = finetune_optimizer,  # AdamW(lr 1e-5, weight decay 1e-2)
        lr_rampup_images: int = 0,  # linear learning-rate warm-up over this many images; 0 = off
        val_sigmas: list[float] = list(SD_VAL_SIGMAS),  # noqa: B006 - noise levels of the validation loss
        sampling: SamplerDefaults | None = None,  # sample grids and `diffscore sample` (default: the folder's)
        nonfinite: NonFinitePolicy = NonFinitePolicy(),  # a non-finite loss: stop the run or skip the step
        speed: TrainingSpeed = TrainingSpeed(),  # GPU switches: compile, channels_last
    ) -> None:
        if pretrained is None:
            raise DiffscoreError("model.init_args.pretrained is required: the Stable Diffusion folder to fine-tune")
        if not 0 <= caption_dropout < 1:
            raise DiffscoreError(f"model.caption_dropout must be in [0, 1), got {caption_dropout}")
        objective = _group(Objective, objective, "objective")
        backbone = StableDiffusionFolder(str(Path(pretrained).expanduser().resolve()), trust=trust_pretrained)
        if sampling is None:  # the folder's own settings; precision as the trainer's (set when fit starts)
            sampling = dataclasses.replace(folder_defaults(backbone), precision=None)
        super().__init__(
            backbone, objective.sigma_data, objective.P_mean, objective.P_std, optimizer, lr_rampup_images,
            val_sigmas, sampling, None, nonfinite, speed,
        )  # fmt: skip
        self.denoiser = backbone.denoiser()  # the folder's discrete-DDPM preconditioning, not EDM's
        self.objective, self.caption_dropout = objective, caption_dropout
        if objective.kind == "ddpm":
            self.sigma_law = UniformTimesteps(self.denoiser.sigmas)
        else:
            lo, hi = self.denoiser.sigma_min, self.denoiser.sigma_max
            self.sigma_law = ClippedLogNormal(objective.P_mean, objective.P_std, lo, hi)
        if gradient_checkpointing:
            backbone.unet.enable_gradient_checkpointing()
        self._decoder = Shared(backbone.decoder())  # the VAE: moved with the module, shared by copies, no state dict
        # the record of this module's own arguments (what a resumed run is rebuilt with), not DiffusionModule's
        own = {"pretrained": pretrained, "caption_dropout": caption_dropout, "trust_pretrained": trust_pretrained}
        own |= {"gradient_checkpointing": gradient_checkpointing, "lr_rampup_images": lr_rampup_images}
        own["val_sigmas"] = list(val_sigmas)
        groups = (("objective", objective), ("sampling", self.sampling), ("nonfinite", self.nonfinite))
        own |= {k: dataclasses.asdict(v) for k, v in (*groups, ("speed", self.speed))}
        self.hparams.clear()  # (save_hyperparameters adds to what DiffusionModule recorded)
        self.save_hyperparameters(own)
        self.hparams["_class_path"] = f"{type(self).__module__}.{type(self).__qualname__}"

    # ----------------------------------------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._decoder.module._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.text_encoder.eval()  # frozen: never in training mode (no dropout)
        return self

    def sampler(self, options: SamplingOptions | None = None, **resources: Any) -> DiffusionSampler:
        """A sampler of the current weights whose samples the folder's VAE decodes."""
        return super().sampler(options, **resources).with_decoder(self._decoder.module)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule if self._trainer is not None else None
        shape = tuple(getattr(dm, "data_shape", self.data_shape))
        if stage == "fit" and shape != tuple(self.data_shape):
            raise DiffscoreError(
                f"the data are {list(shape)} but {self.hparams.pretrained}'s U-Net takes {list(self.data_shape)} "
                "latents; encode the images with its VAE (`diffscore dataset --encode`) at the matching resolution"
            )

    # ----------------------------------------------------------------------------------------------------
    def _cond(self, labels: Any) -> list[str] | None:
        """Captions (a data set without captions trains the unconditional mode)."""
        return None if isinstance(labels, Tensor) else list(labels)

    def _drop_captions(self, cond: list[str] | None) -> list[str] | None:
        if cond is None or not self.caption_dropout:
            return cond
        drop = (torch.rand(len(cond)) < self.caption_dropout).tolist()  # the CPU RNG: restored on resume
        return [NULL_CAPTION if d else c for c, d in zip(cond, drop)]

    def _fixed_sigma_loss(self, x0: Tensor, sigma: Tensor, noise: Tensor, cond: Any) -> Tensor:
        if self.objective.kind == "ddpm":
            return ddpm_loss(self.train_denoiser, x0, sigma, noise, cond)
        return edm_loss(self.train_denoiser, x0, sigma, noise, cond, self.objective.sigma_data)

    def _loss(self, x0: Tensor, sigma: Tensor, noise: Tensor, cond: Any) -> Tensor:
        return self._fixed_sigma_loss(x0, sigma, noise, self._drop_captions(cond))
