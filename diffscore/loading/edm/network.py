"""NVlabs/edm's network pickles as LoadedModels: the published ``edm-*.pkl`` / ``baseline-*.pkl`` files and the
``network-snapshot-*.pkl`` of EDM's training loop.

The file is read by diffscore.loading.edm.pickle, which never runs the Python source these pickles embed; the inert
record of the EMA network (a preconditioning wrapping SongUNet or DhariwalUNet) is mapped by class name and init
kwargs onto diffscore's own modules (diffscore.loading.edm.song / dhariwal, diffscore.core.precond), weight
for weight. Sampling defaults are those of EDM's README for each published model: Heun with 18 steps at 32x32, 40
steps at 64x64, 256 steps with churn (S_churn 40, S_min 0.05, S_max 50, S_noise 1.003) for class-conditional
ImageNet-64; sigma in [0.002, 80] clipped to the network's range, rho 7, as EDM's generate.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from diffscore.core.precond import PrecondSpec, build_precond, iddpm_u
from diffscore.errors import DiffscoreError
from diffscore.loading.edm.dhariwal import adm_from_edm
from diffscore.loading.edm.pickle import PersistentRecord, describe, read_edm_pickle, record_state_dict
from diffscore.loading.edm.song import unet_from_edm
from diffscore.loading.model import LoadedModel
from diffscore.sampling.options import SamplerDefaults

# EDM's preconditioning class -> (diffscore's name, its constants with EDM's defaults)
PRECONDS: dict[str, tuple[str, dict[str, float]]] = {
    "EDMPrecond": ("edm", {"sigma_data": 0.5, "sigma_min": 0.0, "sigma_max": math.inf}),
    "VPPrecond": ("vp", {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5}),
    "VEPrecond": ("ve", {"sigma_min": 0.02, "sigma_max": 100.0}),
    "iDDPMPrecond": ("iddpm", {"C_1": 0.001, "C_2": 0.008, "M": 1000}),
}
BACKBONES = {"SongUNet": unet_from_edm, "DhariwalUNet": adm_from_edm}
CHURN_IMAGENET = {"s_churn": 40.0, "s_min": 0.05, "s_max": 50.0, "s_noise": 1.003}  # EDM README, ImageNet-64


def sampler_defaults(backbone_class: str, resolution: int, label_dim: int) -> SamplerDefaults:
    """EDM's published sampler settings for a network of this kind (README, "Calculating FID"): Heun, sigma
    0.002..80 (clipped to the network's range), rho 7, fp32."""
    if backbone_class == "DhariwalUNet" and label_dim > 0:
        return SamplerDefaults(steps=256, sampler_kwargs=dict(CHURN_IMAGENET), precision="32")
    return SamplerDefaults(steps=18 if resolution <= 32 else 40, precision="32")


def _precond_kwargs(record: PersistentRecord) -> tuple[str, dict[str, float]]:
    name, defaults = PRECONDS[record.class_name]
    given = {**record.state, **record.init_kwargs}  # EDMPrecond keeps sigma_min/max as attributes too
    kwargs = {}
    for key, default in defaults.items():
        value = given.get(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(float(value)):
            raise DiffscoreError(f"{record.class_name}.{key} = {value!r} is not a number")
        if value != default:  # EDMPrecond's default range (0, inf) stays implicit
            kwargs[key] = int(value) if key == "M" else float(value)
    return name, kwargs


def _check_iddpm_table(state: dict[str, torch.Tensor], kwargs: dict[str, float], path: Path) -> None:
    """iDDPM's u table is recomputed from C_1, C_2, M; the file's copy must agree with it."""
    if "u" in state:
        defaults = PRECONDS["iDDPMPrecond"][1]
        expected = iddpm_u(*(kwargs.get(k, defaults[k]) for k in ("C_1", "C_2", "M")))
        if state["u"].shape != expected.shape or not torch.allclose(state["u"].float(), expected, rtol=1e-5):
            raise DiffscoreError(f"{path}: the iDDPM noise table u does not follow its C_1, C_2, M (tampered?)")


def network_record(data: dict[str, Any], path: Path) -> tuple[PersistentRecord, PersistentRecord]:
    """(preconditioning record, backbone record) of the pickle's EMA network, checked to be a kind diffscore maps."""
    net = data.get("ema")
    if not isinstance(net, PersistentRecord) or net.class_name not in PRECONDS:
        held = describe(net) if isinstance(net, PersistentRecord) else type(net).__name__
        raise DiffscoreError(
            f"{path}: its network is {held}, not one of EDM's preconditioned networks ({', '.join(PRECONDS)})"
        )
    model = net.state.get("_modules", {}).get("model")
    if not isinstance(model, PersistentRecord) or model.class_name not in BACKBONES:
        held = describe(model) if isinstance(model, PersistentRecord) else type(model).__name__
        raise DiffscoreError(f"{path}: {net.class_name} wraps {held}, not SongUNet or DhariwalUNet")
    return net, model


def open_edm_pickle(path: str | Path) -> LoadedModel:
    """The EMA network of an NVlabs/edm pickle as a LoadedModel (kind "edm-pickle"; fp32; no data section: the
    pickle names its data set's path, which is recorded, never opened)."""
    path = Path(path)
    return edm_pickle_model(read_edm_pickle(path), path)


def edm_pickle_model(data: dict[str, Any], path: Path) -> LoadedModel:
    """``open_edm_pickle`` on a pickle already read (``read_edm_pickle(path)``'s dict)."""
    net, model = network_record(data, path)
    precond, precond_kwargs = _precond_kwargs(net)
    state = record_state_dict(net)
    if precond == "iddpm":
        _check_iddpm_table(state, precond_kwargs, path)
    backbone_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    backbone = BACKBONES[model.class_name](model.init_kwargs, backbone_state).float()
    sigma_data = precond_kwargs.pop("sigma_data", PRECONDS["EDMPrecond"][1]["sigma_data"])
    spec = PrecondSpec(precond, precond_kwargs or None)
    denoiser = build_precond(spec, backbone, sigma_data)
    info = {"file": str(path), "network": describe(net), "backbone": describe(model)}
    dataset = data.get("dataset_kwargs")
    if isinstance(dataset, dict) and dataset.get("path"):  # named, never opened: the user passes --data
        info["dataset_path"] = str(dataset["path"])
    defaults = sampler_defaults(model.class_name, backbone.data_shape[-1], backbone.label_dim)
    settings = {"precond": {"name": spec.name, "kwargs": spec.kwargs}, "sigma_data": sigma_data}
    return LoadedModel(path, "edm-pickle", denoiser, defaults, settings=settings, info=info)
