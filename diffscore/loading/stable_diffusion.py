"""Read a local diffusers Stable Diffusion folder (SD 1.x / 2.x text-to-image) into diffscore parts, safely.

The folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``; FACTS.md,
"Stable Diffusion family") is checked before anything is built: model_index.json must name the allowed classes
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer and a discrete-DDPM scheduler); the classes are
diffscore's choice, never looked up from the folder, so no code the folder names or holds runs (no custom pipeline,
no ``trust_remote_code``). The scheduler is read as plain data from scheduler_config.json, never instantiated.
Weights must be ``*.safetensors``; pickled ``*.bin`` weights are refused unless ``trust=True``. Every
``from_pretrained`` call reads local files only (``local_files_only=True``; HF_HUB_OFFLINE is set when unset),
so nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffscore.core.discrete_ddpm import BETA_SCHEDULES, PREDICTION_TYPES, DiscreteDDPMPrecond
from diffscore.errors import DiffscoreError
from diffscore.io import check_finite_weights, read_user_file
from diffscore.networks.sd_unet import StableDiffusionUNet

PIPELINES = ("StableDiffusionPipeline",)
SCHEDULERS = (  # diffusers schedulers of a discrete DDPM: their config describes the trained betas
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
)
REQUIRED = {  # component -> (library, allowed classes)
    "unet": ("diffusers", ("UNet2DConditionModel",)),
    "vae": ("diffusers", ("AutoencoderKL",)),
    "text_encoder": ("transformers", ("CLIPTextModel",)),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
    "scheduler": ("diffusers", SCHEDULERS),
}
IGNORED = {  # components a pipeline may list that diffscore never loads
    "safety_checker": ("stable_diffusion", ("StableDiffusionSafetyChecker",)),
    "feature_extractor": ("transformers", ("CLIPImageProcessor", "CLIPFeatureExtractor")),
    "image_encoder": ("transformers", ("CLIPVisionModelWithProjection",)),
}
SCHEDULE_DEFAULTS = {  # diffusers' scheduler defaults: what a config that omits a key means
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
}
UNET_UNSUPPORTED = ("class_embed_type", "addition_embed_type", "time_cond_proj_dim", "encoder_hid_dim_type")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
LAYOUT = "a diffusers folder holds model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/"
MAX_JSON_BYTES = 16 << 20  # a config or model_index.json (SD's are a few KiB)


@dataclass
class StableDiffusionParts:
    """What a Stable Diffusion folder holds, as diffscore uses it."""

    folder: Path  # the folder read
    backbone: StableDiffusionUNet  # U-Net + frozen CLIP text encoder + tokenizer
    vae: nn.Module  # diffusers AutoencoderKL (latents <-> images in [-1, 1])
    schedule: dict[str, Any]  # DiscreteDDPMPrecond's beta_schedule, num_train_timesteps, beta_start, beta_end
    prediction_type: str  # what the U-Net predicts: "epsilon" or "v_prediction"
    scaling_factor: float  # the VAE's latent scale: the U-Net sees scaling_factor * VAE latents (SD: 0.18215)
    latent_shape: tuple[int, int, int]  # [C, h, w] of the U-Net's latents (SD 2 base: 4 x 64 x 64)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; DiffscoreError naming the file when it is missing or not a JSON object."""
    if not (path.exists() or path.is_symlink()):
        raise DiffscoreError(f"{path}: missing; {LAYOUT}")
    raw = read_user_file(path, max_bytes=MAX_JSON_BYTES)  # a FIFO, device or huge file: one line, never a hang
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffscoreError(f"{path}: not valid JSON ({e}); restore the file from the model's release") from None
    if not isinstance(data, dict):
        raise DiffscoreError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_model_index(folder: Path) -> dict[str, Any]:
    """model_index.json of ``folder`` after checking every component against the allow-lists."""
    if not folder.is_dir():
        raise DiffscoreError(f"{folder}: not a folder; pass the Stable Diffusion folder ({LAYOUT})")
    path = folder / "model_index.json"
    if not path.is_file():
        raise DiffscoreError(f"{folder}: no model_index.json, so not a diffusers model folder; {LAYOUT}")
    index = _read_json(path)
    pipeline = index.get("_class_name")
    if pipeline not in PIPELINES:
        raise DiffscoreError(f"{path}: pipeline {pipeline!r} is not one diffscore reads; it reads {PIPELINES}")
    for name, entry in index.items():
        if name.startswith("_") or (name not in REQUIRED and not isinstance(entry, list)):
            continue  # metadata and flags such as requires_safety_checker
        entry = entry if isinstance(entry, list) else [entry]
        if name in IGNORED and (entry in ([None, None], []) or _allowed(entry, *IGNORED[name])):
            continue
        if name not in REQUIRED:
            raise DiffscoreError(f"{path}: component {name!r} = {entry} is not part of a Stable Diffusion folder")
        if not _allowed(entry, *REQUIRED[name]):
            library, classes = REQUIRED[name]
            raise DiffscoreError(f"{path}: {name} = {entry}; diffscore reads only {library} {list(classes)} there")
    missing = [name for name in REQUIRED if name not in index]
    if missing:
        raise DiffscoreError(f"{path}: no {', '.join(missing)} component; {LAYOUT}")
    return index


def _allowed(entry: list, library: str, classes: tuple[str, ...]) -> bool:
    return len(entry) == 2 and entry[0] == library and entry[1] in classes


def read_schedule(folder: Path) -> tuple[dict[str, Any], str]:
    """(schedule kwargs of DiscreteDDPMPrecond, prediction_type) from scheduler/scheduler_config.json, read as
    plain data (diffusers' defaults fill omitted keys)."""
    path = folder / "scheduler" / "scheduler_config.json"
    config = _read_json(path)
    if config.get("_class_name", SCHEDULERS[0]) not in SCHEDULERS:
        raise DiffscoreError(f"{path}: scheduler {config['_class_name']!r} is not a discrete DDPM scheduler")
    if config.get("trained_betas") is not None or config.get("rescale_betas_zero_snr"):
        raise DiffscoreError(f"{path}: trained_betas / rescale_betas_zero_snr schedules are not supported")
    if config.get("timestep_type", "discrete") != "discrete":
        raise DiffscoreError(f"{path}: timestep_type {config['timestep_type']!r} is not supported (only discrete)")
    schedule = {key: config.get(key, default) for key, default in SCHEDULE_DEFAULTS.items()}
    if schedule["beta_schedule"] not in BETA_SCHEDULES:
        raise DiffscoreError(f"{path}: beta_schedule {schedule['beta_schedule']!r} is not one of {BETA_SCHEDULES}")
    T, lo, hi = schedule["num_train_timesteps"], schedule["beta_start"], schedule["beta_end"]
    if not isinstance(T, int) or isinstance(T, bool) or T < 2 or not all(isinstance(b, int | float) for b in (lo, hi)):
        raise DiffscoreError(f"{path}: num_train_timesteps must be an integer >= 2 and the betas numbers")
    if not 0 < lo < hi < 1:
        raise DiffscoreError(f"{path}: need 0 < beta_start < beta_end < 1, got {lo}, {hi}")
    schedule["beta_start"], schedule["beta_end"] = float(lo), float(hi)
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise DiffscoreError(f"{path}: prediction_type {prediction_type!r} is not supported; use {PREDICTION_TYPES}")
    return schedule, prediction_type


def _component_config(folder: Path, name: str) -> dict[str, Any]:
    config = _read_json(folder / name / "config.json")
    declared = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if declared is not None and declared not in REQUIRED[name][1]:
        raise DiffscoreError(f"{folder / name / 'config.json'}: a {declared}, not one of {list(REQUIRED[name][1])}")
    return config


def check_configs(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(unet config, vae config) after checking that the parts fit together as a text-to-image model."""
    unet, vae = _component_config(folder, "unet"), _component_config(folder, "vae")
    text = _component_config(folder, "text_encoder")
    where = folder / "unet" / "config.json"
    extra = [key for key in UNET_UNSUPPORTED if unet.get(key) is not None]
    if extra:
        raise DiffscoreError(f"{where}: {extra} need inputs a text-to-image SD U-Net does not take; not supported")
    channels = (unet.get("in_channels", 4), unet.get("out_channels", 4), vae.get("latent_channels", 4))
    if len(set(channels)) != 1:
        raise DiffscoreError(
            f"{where}: in_channels {channels[0]} / out_channels {channels[1]} do not match "
            f"vae/config.json latent_channels {channels[2]}; use a text-to-image folder (not inpainting/upscaling)"
        )
    if unet.get("cross_attention_dim") != text.get("hidden_size"):
        raise DiffscoreError(
            f"{where}: cross_attention_dim {unet.get('cross_attention_dim')} does not match "
            f"text_encoder/config.json hidden_size {text.get('hidden_size')}; the parts are of different models"
        )
    if vae.get("shift_factor") is not None or vae.get("latents_mean") is not None:
        raise DiffscoreError(f"{folder / 'vae' / 'config.json'}: shifted/normalised latents are not supported")
    return unet, vae


def check_weights(directory: Path, trust: bool = False, variant: str | None = None) -> None:
    """Raise DiffscoreError unless ``directory`` holds safetensors weights (of ``variant``), or pickled ones and
    ``trust`` is set."""
    files = [p.name for p in directory.iterdir()] if directory.is_dir() else []
    if variant is not None:
        files = [f for f in files if f".{variant}." in f]
    if any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files):
        return
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES) or f.endswith(".bin.index.json")]
    if pickles and not trust:
        raise DiffscoreError(
            f"{directory / pickles[0]}: pickled weights can run code when loaded; convert them to .safetensors, "
            "or pass --trust_checkpoint true (trust=True) if you trust the file's source"
        )
    if not pickles:
        what = f"{variant!r} " if variant else ""
        raise DiffscoreError(f"{directory}: no {what}weights (*.safetensors); {LAYOUT}")


def _offline() -> None:
    """Never reach the Hugging Face Hub from this process (set before diffusers / transformers are imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _load(component: Path, loader: Any, **kwargs: Any) -> Any:
    """``loader(folder, subfolder=..., local_files_only=True, **kwargs)``, its failure as one DiffscoreError line."""
    try:
        return loader(str(component.parent), subfolder=component.name, local_files_only=True, **kwargs)
    except Exception as e:  # the libraries' readers raise many types (OSError, SafetensorError, ValueError, ...)
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffscoreError(f"{component}: could not be loaded ({message}); restore it from the release") from e


def load_modules(folder: Path, trust: bool, variant: str | None, dtype: torch.dtype) -> tuple[Any, Any, Any, Any]:
    """(unet, vae, text_encoder, tokenizer) through the libraries' own readers, local files only."""
    _offline()
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as e:
        raise DiffscoreError(
            f"{folder}: reading Stable Diffusion needs diffusers and transformers ({e}); pip install 'diffscore[sd]'"
        ) from None
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar per small component read would bury diffscore's lines

    for name in ("unet", "vae", "text_encoder"):
        check_weights(folder / name, trust, variant)
    safe = None if trust else True  # None: safetensors first, then (trusted) pickles
    weights = {"use_safetensors": safe, "variant": variant}
    lazy_init = importlib.util.find_spec("accelerate") is not None  # diffusers' low_cpu_mem_usage needs accelerate
    diffusers_kwargs = {"torch_dtype": dtype, "low_cpu_mem_usage": lazy_init, **weights}
    unet = _load(folder / "unet", UNet2DConditionModel.from_pretrained, **diffusers_kwargs)
    vae = _load(folder / "vae", AutoencoderKL.from_pretrained, **diffusers_kwargs)
    text_encoder = _load(
        folder / "text_encoder", CLIPTextModel.from_pretrained, dtype=dtype, trust_remote_code=False, **weights
    )
    tokenizer = _load(folder / "tokenizer", CLIPTokenizer.from_pretrained, trust_remote_code=False)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        check_finite_weights(module.state_dict(), folder / name)  # NaN weights would give NaN images, exit 0
    positions = text_encoder.config.max_position_embeddings
    if tokenizer.model_max_length > positions:
        raise DiffscoreError(
            f"{folder / 'tokenizer'}: model_max_length {tokenizer.model_max_length} exceeds the text encoder's "
            f"{positions} positions; set model_max_length in tokenizer_config.json (CLIP: 77)"
        )
    return unet, vae, text_encoder, tokenizer


def read_stable_diffusion(
    folder: str | os.PathLike,
    *,
    trust: bool = False,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    clip_skip: int | None = None,
) -> StableDiffusionParts:
    """The parts of a local Stable Diffusion folder (checked as the module docstring says), on the CPU in ``dtype``.

    ``trust``: also read pickled ``*.bin`` weights (torch.load with weights_only=True); ``variant``: weights named
    ``*.{variant}.safetensors`` (e.g. "fp16"); ``clip_skip``: condition on an earlier text-encoder layer.
    """
    folder = Path(folder).expanduser()
    check_model_index(folder)
    schedule, prediction_type = read_schedule(folder)
    unet_config, vae_config = check_configs(folder)
    unet, vae, text_encoder, tokenizer = load_modules(folder, trust, variant, dtype)
    backbone = StableDiffusionUNet(unet, text_encoder, tokenizer, clip_skip=clip_skip)
    return StableDiffusionParts(
        folder=folder,
        backbone=backbone,
        vae=vae,
        schedule=schedule,
        prediction_type=prediction_type,
        scaling_factor=float(vae_config.get("scaling_factor", 0.18215)),
        latent_shape=backbone.data_shape,
    )


def stable_diffusion_denoiser(parts: StableDiffusionParts, quantize: bool = False) -> DiscreteDDPMPrecond:
    """The EDM denoiser D(x; sigma, captions) of the folder's U-Net: DiscreteDDPMPrecond around the backbone, with
    the folder's schedule and prediction type (``quantize``: integer timesteps, as diffusers' DPM-Solver feeds)."""
    return DiscreteDDPMPrecond(
        parts.backbone, **parts.schedule, prediction_type=parts.prediction_type, quantize=quantize
    )


def read_vae(folder: str | os.PathLike, trust: bool = False) -> tuple[nn.Module, float, Path]:
    """(AutoencoderKL, scaling_factor, the vae/ folder read) of a Stable Diffusion folder (its ``vae/``) or of a
    folder holding one AutoencoderKL (config.json + weights); checked and read as ``read_stable_diffusion`` does."""
    folder = Path(folder).expanduser()
    if (folder / "model_index.json").is_file():
        check_model_index(folder)
        folder = folder / "vae"
    config = _read_json(folder / "config.json")
    if config.get("_class_name") != "AutoencoderKL":
        raise DiffscoreError(f"{folder / 'config.json'}: a {config.get('_class_name')}, not an AutoencoderKL; {LAYOUT}")
    if config.get("shift_factor") is not None or config.get("latents_mean") is not None:
        raise DiffscoreError(f"{folder / 'config.json'}: shifted/normalised latents are not supported")
    _offline()
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise DiffscoreError(f"{folder}: reading a VAE needs diffusers ({e}); pip install 'diffscore[sd]'") from None
    check_weights(folder, trust)
    lazy_init = importlib.util.find_spec("accelerate") is not None
    kwargs = {"use_safetensors": None if trust else True, "low_cpu_mem_usage": lazy_init}
    vae = _load(folder, AutoencoderKL.from_pretrained, **kwargs)
    check_finite_weights(vae.state_dict(), folder)
    return vae.eval().requires_grad_(False), float(config.get("scaling_factor", 0.18215)), folder
