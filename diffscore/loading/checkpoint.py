"""A `diffscore fit` checkpoint as a LoadedModel: the diffusion model's EMA denoiser, or a DisBack run's one-step
generator, built from the checkpoint's own record (classes from the allowed tables, plain arguments, weights
loaded strictly). The file is read once (diffscore.loading.files); everything the commands need from it (the data
section, the saved settings, the step) comes from that one read.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from diffscore.core.precond import PrecondSpec
from diffscore.errors import DiffscoreError
from diffscore.io import check_finite_weights
from diffscore.loading.classes import BACKBONES, build
from diffscore.loading.denoiser import build_denoiser, edm2_spec, spec_record
from diffscore.loading.files import read_torch_file
from diffscore.loading.legacy import modern_settings
from diffscore.loading.model import LoadedModel
from diffscore.loading.sd_backbone import PRECOND_NAME, folder_backbone, is_folder_record
from diffscore.loading.sd_model import finetuned_stable_diffusion
from diffscore.sampling.options import SamplerDefaults
from diffscore.sampling.speed import Speed

DIFFUSION_MODULE = "diffscore.lit.modules.diffusion.DiffusionModule"
EDM2_MODULE = "EDM2Module"  # diffscore.lit.modules.edm2.EDM2Module: EDM2's preconditioning, saved without a record
SD_MODULE = "StableDiffusionModule"  # a fine-tuning run of a Stable Diffusion folder (diffscore.lit.modules)


def _weights(state: Any, prefix: str, path: Path) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise DiffscoreError(f"{path} has no state_dict; pass a checkpoint written by `diffscore fit`")
    return {k[len(prefix) :]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}


def load_weights(module: torch.nn.Module, state: dict[str, Any], path: Path, whose: str) -> None:
    """Load ``state`` into ``module`` strictly; a mismatch, or a NaN/Inf weight (NaN samples with exit 0), is one
    line naming the file."""
    check_finite_weights(state, path)
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise DiffscoreError(f"{path}: {whose} weights do not fit the saved configuration ({str(e)[:200]})") from None


def _sampler_defaults(settings: dict[str, Any], path: Path) -> SamplerDefaults:
    try:
        return SamplerDefaults(**(settings.get("sampling") or {}))
    except TypeError as e:
        raise DiffscoreError(f"{path}: its sampling settings are not diffscore's ({e})") from None
    except DiffscoreError as e:
        raise DiffscoreError(f"{path}: {e}") from None


def _diffusion(ckpt: dict[str, Any], path: Path, trust: bool) -> LoadedModel:
    settings = modern_settings(ckpt.get("hyper_parameters") or {})
    owner = str(settings.get("_class_path", DIFFUSION_MODULE))
    if owner.endswith(SD_MODULE):
        model = finetuned_stable_diffusion(settings, path, trust, **_facts(ckpt))
        load_weights(model.network, _weights(ckpt.get("state_dict"), "denoiser.", path), path, "the denoiser's")
        return model
    if not owner.endswith(("DiffusionModule", EDM2_MODULE)) or "backbone" not in settings:
        held = owner if "backbone" in settings else "no backbone record"
        raise DiffscoreError(
            f"{path} is not a diffscore DiffusionModule checkpoint (it holds {held}); pass a checkpoint written by "
            "`diffscore fit`"
        )
    backbone = build(settings["backbone"], BACKBONES, "backbone")
    spec = settings.get("precond") or {}
    if owner.endswith(EDM2_MODULE):
        spec = {"name": edm2_spec().name, "kwargs": edm2_spec().kwargs}
    try:
        denoiser = build_denoiser(PrecondSpec(**spec), backbone, float(settings.get("sigma_data", 0.5)))
    except (TypeError, ValueError) as e:
        raise DiffscoreError(f"{path}: its preconditioning {spec} cannot be built ({e})") from None
    load_weights(denoiser, _weights(ckpt.get("state_dict"), "denoiser.", path), path, "the denoiser's")
    defaults = _sampler_defaults(settings, path)
    speed = settings.get("speed") or {}
    trained = Speed(defaults.precision == "bf16", bool(speed.get("channels_last")), bool(speed.get("compile")))
    return LoadedModel(path, "diffscore", denoiser, defaults, trained, trusted=trust, settings=settings, **_facts(ckpt))


def _one_step(ckpt: dict[str, Any], path: Path, trust: bool) -> LoadedModel:
    info = ckpt["one_step_generator"]
    if not isinstance(info, dict) or "backbone" not in info:
        raise DiffscoreError(f"{path}: its one_step_generator record is damaged")
    decoder = None
    if is_folder_record(info["backbone"]) and (info.get("precond") or {}).get("name") == PRECOND_NAME:
        backbone = folder_backbone(info["backbone"], trust, path)  # a latent generator distilled from SD
        generator, decoder = backbone.denoiser(), backbone.decoder()
    else:
        spec = info.get("precond") or {"name": "edm", "kwargs": None}  # EDM2's for an EDM2 teacher's generator
        backbone = build(info["backbone"], BACKBONES, "backbone")
        try:
            generator = build_denoiser(PrecondSpec(**spec), backbone, float(info.get("sigma_data", 0.5)))
        except (TypeError, ValueError) as e:
            raise DiffscoreError(f"{path}: the generator's preconditioning {spec} cannot be built ({e})") from None
    load_weights(generator, _weights(ckpt.get("state_dict"), "generator.", path), path, "the generator's")
    settings = dict(ckpt.get("hyper_parameters") or {})
    sigma_init = float(info.get("sigma_init", 1.0))
    return LoadedModel(
        path,
        "one-step",
        generator,
        sigma_init=sigma_init,
        trusted=trust,
        settings=settings,
        decoder=decoder,
        **_facts(ckpt),
    )


def _facts(ckpt: dict[str, Any]) -> dict[str, Any]:
    data = ckpt.get("datamodule_hyper_parameters")
    step = ckpt.get("global_step", 0)
    return {"data_config": dict(data) if isinstance(data, dict) else None, "step": step if isinstance(step, int) else 0}


def open_checkpoint(path: str | Path, trust: bool = False) -> LoadedModel:
    """The model of a `diffscore fit` checkpoint: a diffusion model's (EMA) denoiser or a DisBack generator."""
    path = Path(path)
    ckpt = read_torch_file(path, trust)
    if not isinstance(ckpt, dict):
        raise DiffscoreError(f"{path} is not a diffscore checkpoint (it holds a {type(ckpt).__name__})")
    if "one_step_generator" in ckpt:
        return _one_step(ckpt, path, trust)
    return _diffusion(ckpt, path, trust)


def checkpoint_of(model: LoadedModel, lightning_version: str) -> dict[str, Any]:
    """A checkpoint that loads with weights_only=True and opens as ``model`` does (a diffusion model's denoiser,
    its sampler settings and preconditioning; no training state): what `diffscore convert` writes."""
    denoiser = model.denoiser("a diffscore checkpoint")
    precond = spec_record(denoiser, model.settings.get("precond"))
    return {
        "state_dict": {f"denoiser.{k}": v.detach().clone() for k, v in denoiser.state_dict().items()},
        "hyper_parameters": {
            "_class_path": DIFFUSION_MODULE,
            "backbone": model.backbone_config,
            "sigma_data": float(getattr(denoiser, "sigma_data", 0.5)),
            "sampling": asdict(model.defaults),
            "speed": {"compile": model.trained.compiled, "channels_last": model.trained.channels_last},
            "precond": precond,
        },
        "imported_from": dict(model.info),
        "pytorch-lightning_version": lightning_version,
        "global_step": 0,
        "epoch": 0,
    }
