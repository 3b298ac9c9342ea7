"""A Stable Diffusion folder's U-Net and text encoder as a backbone that a checkpoint records by the folder's path.

``StableDiffusionFolder(folder)`` reads the folder (diffscore.loading.stable_diffusion: checked, safetensors only
unless trusted, nothing downloaded, no code from the folder run) and is a StableDiffusionUNet around its U-Net and
frozen text encoder, remembering what else the folder says: the DDPM schedule and prediction type (its denoiser,
diffscore.core.discrete_ddpm.DiscreteDDPMPrecond) and the VAE (its decoder, diffscore.data.latents.LatentDecoder).
Its record is plain data (``{"folder": ..., "trust": ..., ...}``), so a fine-tuned or distilled checkpoint names
the folder and rebuilds the networks from it before loading its own weights. The VAE is frozen and shared by
every copy of the backbone (an EMA copy, DisBack's generator and fake score): it is never in a state dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from diffscore.core.discrete_ddpm import DiscreteDDPMPrecond
from diffscore.data.latents import LatentDecoder
from diffscore.errors import DiffscoreError
from diffscore.loading.stable_diffusion import read_stable_diffusion
from diffscore.networks.sd_unet import StableDiffusionUNet

PRECOND_NAME = "discrete_ddpm"  # the name a checkpoint records for DiscreteDDPMPrecond
CLASS_PATH = "diffscore.loading.sd_backbone.StableDiffusionFolder"
ARGUMENTS = ("folder", "trust", "variant", "clip_skip")


class Shared:
    """A module that every deep copy of its owner shares (``copy.deepcopy`` returns the same holder)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict) -> Shared:
        return self


class StableDiffusionFolder(StableDiffusionUNet):
    """The U-Net + CLIP text encoder of the diffusers folder ``folder`` (a StableDiffusionUNet), with its schedule,
    prediction type and VAE; ``denoiser()`` and ``decoder()`` build what a model of the folder samples with."""

    def __init__(
        self,
        folder: str,  # the diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)
        trust: bool = False,  # also read pickled *.bin weights (a file you trust)
        variant: str | None = None,  # weights named *.{variant}.safetensors (e.g. "fp16")
        clip_skip: int | None = None,  # condition on the text encoder's hidden state this many layers earlier
    ) -> None:
        parts = read_stable_diffusion(folder, trust=trust, variant=variant, clip_skip=clip_skip)
        bb = parts.backbone
        super().__init__(bb.unet, bb.text_encoder, bb.tokenizer, clip_skip=clip_skip)
        self.folder = str(folder)
        self.schedule = dict(parts.schedule)  # DiscreteDDPMPrecond's schedule arguments
        self.prediction_type = parts.prediction_type  # "epsilon" or "v_prediction"
        self.scaling_factor = parts.scaling_factor  # the U-Net sees scaling_factor * VAE latents
        self._vae = Shared(parts.vae.eval().requires_grad_(False))  # outside the module tree: no state dict

    @property
    def vae(self) -> nn.Module:
        return self._vae.module

    def denoiser(self, quantize: bool = False) -> DiscreteDDPMPrecond:
        """D(x; sigma, captions) of this U-Net (``quantize``: integer timesteps, as diffusers' DPM-Solver)."""
        return DiscreteDDPMPrecond(self, **self.schedule, prediction_type=self.prediction_type, quantize=quantize)

    def precond_record(self) -> dict[str, Any]:
        """How a checkpoint names the preconditioning (plain data)."""
        return {"name": PRECOND_NAME, "kwargs": {**self.schedule, "prediction_type": self.prediction_type}}

    def decoder(self) -> LatentDecoder:
        """Latents -> images through the folder's VAE (shared: moving the decoder moves this backbone's VAE)."""
        return LatentDecoder(self.vae, self.scaling_factor)


def is_folder_record(record: Any) -> bool:
    """Whether a backbone record (``{"class_path", "init_args"}``) names a Stable Diffusion folder."""
    return isinstance(record, dict) and record.get("class_path") == CLASS_PATH


def folder_backbone(record: Any, trust: bool, where: Path | str) -> StableDiffusionFolder:
    """The backbone a record names, read with the user's ``trust`` (never the file's own), one error line naming
    ``where`` (the checkpoint) when the folder it names cannot be read."""
    init = dict(record.get("init_args") or {}) if isinstance(record, dict) else {}
    unknown = set(init) - set(ARGUMENTS)
    if unknown or not isinstance(init.get("folder"), str):
        raise DiffscoreError(f"{where}: its Stable Diffusion backbone record {record!r:.160} is damaged")
    init["trust"] = trust
    try:
        return StableDiffusionFolder(**init)
    except DiffscoreError as e:
        raise DiffscoreError(f"{where} was trained from {init['folder']}, which cannot be read: {e}") from None
