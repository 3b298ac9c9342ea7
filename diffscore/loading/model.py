"""A model file, opened once: diffscore.loading.open_model reads any file a `--ckpt_path` may name and returns one
``LoadedModel``, which every command and DisBack's teacher take.

Kinds: a `diffscore fit` checkpoint of a diffusion model ("diffscore"; its EMA weights), of a DisBack run
("one-step"; the generator), an NVlabs/edm network pickle ("edm-pickle"), an NVlabs/edm2 one ("edm2-pickle"),
both read without running their code, and a diffusers Stable Diffusion folder ("stable-diffusion";
diffscore.loading.sd_model). A latent model (Stable Diffusion, and checkpoints fine-tuned or distilled from one) has
a ``decoder`` (its VAE) that its samplers apply at the end. The
loaded model holds the network, its own sampler settings, the data section it names (plain data; the data module
is built by diffscore.lit.datamodules.from_file), its saved settings and where it came from; ``sampler(options)``
makes the sampler that draws from it (``guide=`` another LoadedModel: guidance by a second network).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from diffscore.core.precond import Preconditioning
from diffscore.errors import DiffscoreError
from diffscore.networks.backbone import BackboneFacts
from diffscore.networks.backbone import config as backbone_config
from diffscore.sampling.diffusion import DiffusionSampler
from diffscore.sampling.one_step import OneStepSampler
from diffscore.sampling.options import SamplerDefaults, SamplingOptions
from diffscore.sampling.speed import Speed

KINDS = ("diffscore", "one-step", "edm-pickle", "edm2-pickle", "stable-diffusion")


@dataclass
class LoadedModel(BackboneFacts):
    """What one model file holds, ready to sample (eval mode, fp32, on the CPU)."""

    path: Path  # the file
    kind: str  # one of KINDS
    network: Preconditioning  # the denoiser D(x; sigma, cond), or the one-step generator's preconditioned network
    defaults: SamplerDefaults | None = None  # the model's sampler settings (None for a one-step generator)
    trained: Speed = field(default_factory=Speed)  # how it trained (the GPU sampling default)
    sigma_init: float | None = None  # a one-step generator's input scale: x = D_G(sigma_init z; sigma_init)
    trusted: bool = False  # read with full unpickling, as the user allowed
    data_config: dict[str, Any] | None = None  # the data section it names (None: a network pickle names none)
    settings: dict[str, Any] = field(default_factory=dict)  # the module's saved settings (plain data)
    step: int = 0  # the training step it was saved at
    info: dict[str, Any] = field(default_factory=dict)  # provenance (an imported pickle's network, ...)
    decoder: nn.Module | None = None  # latents -> images (a latent model's VAE); None: samples are images

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DiffscoreError(f"internal: unknown model kind {self.kind!r}")
        self.network.eval().requires_grad_(False)
        if self.decoder is not None:
            self.decoder.eval().requires_grad_(False)

    @property
    def one_step(self) -> bool:
        return self.kind == "one-step"

    @property
    def backbone(self) -> nn.Module:
        return self.network.backbone

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one sample in data space: the decoded image's for a latent model, else data_shape."""
        if self.decoder is None:
            return self.data_shape
        return tuple(self.decoder.image_shape(self.data_shape))

    @property
    def backbone_config(self) -> dict[str, Any] | None:
        """How the backbone was built (class path and plain arguments), as a checkpoint records it."""
        return backbone_config(self.backbone)

    @property
    def trained_with_scoreaug(self) -> bool:
        """Whether its training augmentation included ScoreAug (its samples are checked for leakage)."""
        augmenters = self.settings.get("augment") or []
        return any(isinstance(a, dict) and str(a.get("class_path", "")).endswith("ScoreAugment") for a in augmenters)

    def denoiser(self, what: str) -> Preconditioning:
        """The diffusion model's denoiser; ``what`` names the use in the error for a one-step generator."""
        if self.one_step:
            raise DiffscoreError(f"{self.path} is a one-step generator, not a diffusion model; {what} needs one")
        return self.network

    def sampler(self, options: SamplingOptions | None = None, **resources: Any) -> DiffusionSampler | OneStepSampler:
        """The sampler of this model under ``options``; ``resources``: prompts, gaussian, progress, guide (the
        opened --guide: a LoadedModel or a denoiser) of a diffusion model."""
        if isinstance(resources.get("guide"), LoadedModel):
            resources["guide"] = resources["guide"].denoiser(f"--guide ({resources['guide'].path})")
        if self.one_step:
            resources.pop("progress", None)
            sampler = OneStepSampler(self.network, self.sigma_init, options, **resources)
        else:
            sampler = DiffusionSampler(self.network, self.defaults, options, trained=self.trained, **resources)
        return sampler.with_decoder(self.decoder)
