"""Stable Diffusion models as LoadedModels: a diffusers folder itself (kind "stable-diffusion") and a checkpoint of
a fine-tuning run (diffscore.lit.modules.StableDiffusionModule; kind "diffscore"), which names its folder.

Both sample in latent space with the folder's U-Net through DiscreteDDPMPrecond and decode with its VAE at the
end (``LoadedModel.decoder``). A folder's own sampler settings: Heun (Karras et al. 2022, Algorithm 2) with 25
steps (49 U-Net evaluations, about the 50 of diffusers' StableDiffusionPipeline default) on Karras' grid (rho 7)
over the schedule's own [sigma_0, sigma_{T-1}] (SD 1/2: ~0.029 .. ~14.6), in fp32 unless --precision bf16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffscore.errors import DiffscoreError
from diffscore.loading.model import LoadedModel
from diffscore.loading.sd_backbone import StableDiffusionFolder
from diffscore.sampling.options import SamplerDefaults
from diffscore.sampling.speed import Speed

SAMPLER, STEPS, RHO = "heun", 25, 7.0


def folder_defaults(backbone: StableDiffusionFolder) -> SamplerDefaults:
    """A folder's own sampler settings (module docstring): the schedule's whole range, rho 7."""
    denoiser = backbone.denoiser()
    lo, hi = denoiser.sigma_min, denoiser.sigma_max
    return SamplerDefaults(sampler=SAMPLER, steps=STEPS, sigma_min=lo, sigma_max=hi, rho=RHO, precision="32")


def stable_diffusion_model(backbone: StableDiffusionFolder, path: Path, kind: str, **fields: Any) -> LoadedModel:
    """The LoadedModel of a folder's backbone: its denoiser, its VAE as the decoder, and ``fields`` (defaults,
    trained, trusted, settings, data_config, step, info)."""
    fields.setdefault("defaults", folder_defaults(backbone))
    return LoadedModel(path, kind, backbone.denoiser(), decoder=backbone.decoder(), **fields)


def open_stable_diffusion(folder: str | Path, trust: bool = False) -> LoadedModel:
    """The model of a diffusers Stable Diffusion folder (``trust``: also read pickled *.bin weights)."""
    folder = Path(folder).expanduser().resolve()
    backbone = StableDiffusionFolder(str(folder), trust=trust)
    info = {"network": f"Stable Diffusion ({backbone.prediction_type}) from {folder}", "folder": str(folder)}
    return stable_diffusion_model(backbone, folder, "stable-diffusion", trusted=trust, info=info)


def finetuned_backbone(settings: dict[str, Any], path: Path, trust: bool) -> StableDiffusionFolder:
    """The pretrained folder's backbone a StableDiffusionModule checkpoint names (its weights not yet loaded); a
    folder of pickled weights needs the user's ``trust`` again."""
    folder = settings.get("pretrained")
    if not isinstance(folder, str):
        raise DiffscoreError(f"{path}: its StableDiffusionModule settings name no pretrained folder (damaged)")
    try:
        return StableDiffusionFolder(folder, trust=trust)  # the user's trust, never the file's own
    except DiffscoreError as e:
        raise DiffscoreError(f"{path} was fine-tuned from {folder}, which cannot be read: {e}") from None


def finetuned_stable_diffusion(settings: dict[str, Any], path: Path, trust: bool, **facts: Any) -> LoadedModel:
    """A StableDiffusionModule checkpoint's model, the folder's weights in place (the caller loads the
    checkpoint's EMA weights into ``network``); ``facts``: data_config and step."""
    backbone = finetuned_backbone(settings, path, trust)
    try:
        defaults = SamplerDefaults(**(settings.get("sampling") or {}))
    except (TypeError, DiffscoreError) as e:
        raise DiffscoreError(f"{path}: its sampling settings are not diffscore's ({e})") from None
    speed = settings.get("speed") or {}
    trained = Speed(defaults.precision == "bf16", bool(speed.get("channels_last")), bool(speed.get("compile")))
    fields = {"defaults": defaults, "trained": trained, "trusted": trust, "settings": settings, **facts}
    return stable_diffusion_model(backbone, path, "diffscore", **fields)
