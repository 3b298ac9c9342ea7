"""A denoiser from a saved record: the preconditioning a record names around a backbone built from the file.

Karras et al. 2022's preconditionings (edm, vp, ve, iddpm: diffscore.core.precond.build_precond) and EDM2's
(Karras et al. 2024, arXiv 2312.02696): "edm2" is EDM's preconditioning with the learned uncertainty u(sigma) beside
the backbone (diffscore.core.precond_edm2.EDM2Precond around the backbone, with a
diffscore.networks.logvar.LogVarHead), which EDM2's loss trains and sampling never runs. It lives here, above
core/ and networks/, because it joins the two.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from diffscore.core.precond import Preconditioning, PrecondSpec, build_precond
from diffscore.core.precond_edm2 import EDM2Precond
from diffscore.networks.logvar import LogVarHead

EDM2 = "edm2"
LOGVAR_CHANNELS = 128  # EDM2's Precond default (logvar_channels)


def edm2_spec(logvar_channels: int = LOGVAR_CHANNELS) -> PrecondSpec:
    """The record of EDM2's preconditioning with a logvar head of ``logvar_channels`` Fourier features."""
    return PrecondSpec(EDM2, {"logvar_channels": int(logvar_channels)})


def build_denoiser(spec: PrecondSpec, backbone: nn.Module, sigma_data: float) -> Preconditioning:
    """The preconditioning ``spec`` names around ``backbone``: one of Table 1's (edm, vp, ve, iddpm) or EDM2's
    (``edm2``, kwargs ``logvar_channels``); ValueError naming what is wrong."""
    if spec.name != EDM2:
        return build_precond(spec, backbone, sigma_data)
    kwargs = dict(spec.kwargs or {})
    channels = kwargs.pop("logvar_channels", LOGVAR_CHANNELS)
    if kwargs:
        raise ValueError(f"precond kwargs for edm2: {sorted(kwargs)} are not its options (logvar_channels)")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"precond kwargs for edm2: logvar_channels must be an integer >= 1, got {channels!r}")
    if not 0 < sigma_data < float("inf"):
        raise ValueError(f"sigma_data must be positive, got {sigma_data}")
    return EDM2Precond(backbone, LogVarHead(channels), sigma_data)


def spec_record(denoiser: nn.Module, saved: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"name", "kwargs"}`` of a denoiser's preconditioning: a Stable Diffusion folder's own record (rebuilt from
    the folder, in its preconditioning), EDM2's read off the network, else the saved record (EDM's when none)."""
    if hasattr(getattr(denoiser, "backbone", None), "precond_record"):  # loading.sd_backbone.StableDiffusionFolder
        return denoiser.backbone.precond_record()
    if isinstance(denoiser, EDM2Precond) and isinstance(denoiser.logvar, LogVarHead):
        spec = edm2_spec(denoiser.logvar.linear.in_channels)
        return {"name": spec.name, "kwargs": spec.kwargs}
    return saved or {"name": "edm", "kwargs": None}
