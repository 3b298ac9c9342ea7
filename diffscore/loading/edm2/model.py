"""An NVlabs/edm2 network pickle as a LoadedModel (kind "edm2-pickle"): the published ``edm2-img64-*.pkl``
post-hoc reconstructions and the ``network-snapshot-*.pkl`` / ``phema-*.pkl`` of EDM2's training loop.

The file is read once, without running its code (diffscore.loading.edm.pickle), and its EMA network is built by
diffscore.loading.edm2.network. Sampling defaults are those of EDM2's ``generate_images.py``: Heun, 32 steps, sigma
0.002..80, rho 7, fp32 (EDM2 runs its U-Net in fp16 on a GPU; diffscore samples it in fp32 unless --precision bf16).
A latent model (StabilityVAEEncoder) is refused: its samples are VAE latents, which the Stable Diffusion
support's decoder does not take yet (it reads diffusers folders, not EDM2's encoder record).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffscore.errors import DiffscoreError
from diffscore.loading.denoiser import spec_record
from diffscore.loading.edm.pickle import PersistentRecord, describe
from diffscore.loading.edm2.network import edm2_facts, load_edm2_network
from diffscore.loading.model import LoadedModel
from diffscore.sampling.options import SamplerDefaults

LATENT_REFUSAL = (
    "diffscore's VAE support is for Stable Diffusion folders (issue 33) and does not decode EDM2's latents yet; "
    "diffscore samples EDM2's pixel models (StandardRGBEncoder, edm2-img64-*.pkl)"
)


def is_edm2_pickle(data: dict[str, Any]) -> bool:
    """Whether a read network pickle holds NVlabs/edm2's network (its ``ema`` is EDM2's Precond, not one of EDM's
    preconditionings)."""
    net = data.get("ema")
    return isinstance(net, PersistentRecord) and net.class_name == "Precond"


def edm2_sampler_defaults(sampler: dict[str, Any]) -> SamplerDefaults:
    """SamplerDefaults of EDM2's generate_images.py settings (``EDM2Facts.sampler``), fp32."""
    return SamplerDefaults(
        sampler=sampler["sampler"],
        steps=int(sampler["num_steps"]),
        sigma_min=float(sampler["sigma_min"]),
        sigma_max=float(sampler["sigma_max"]),
        rho=float(sampler["rho"]),
        precision="32",
    )


def edm2_pickle_model(data: dict[str, Any], path: Path) -> LoadedModel:
    """The EMA network of an NVlabs/edm2 pickle (``read_edm_pickle(path)``'s dict) as a LoadedModel; a latent model
    is one DiffscoreError line naming the file."""
    facts = edm2_facts(data, path)
    if facts.latent:
        raise DiffscoreError(f"{path} is a latent EDM2 model ({facts.encoder}, {facts.vae_name}): {LATENT_REFUSAL}")
    denoiser, facts = load_edm2_network(data, path)
    info: dict[str, Any] = {"file": str(path), "network": facts.network, "encoder": facts.encoder}
    info["backbone"] = describe(data["ema"].state["_modules"]["unet"])
    if facts.dataset_path:  # named, never opened: the user passes --data / --ref
        info["dataset_path"] = facts.dataset_path
    if facts.training:
        info["training"] = dict(facts.training)
    settings = {"precond": spec_record(denoiser), "sigma_data": facts.sigma_data}
    defaults = edm2_sampler_defaults(facts.sampler)
    return LoadedModel(path, "edm2-pickle", denoiser, defaults, settings=settings, info=info)
