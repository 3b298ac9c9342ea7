"""An NVlabs/edm2 network pickle's EMA network as diffscore's EDM2Precond(EDM2UNet, LogVarHead), weight for weight.

The file (EDM2 ``training/training_loop.py``) is ``EasyDict(encoder=..., dataset_kwargs=..., loss_fn=EDM2Loss,
ema=Precond(...).to(float16))``, read by ``diffscore.loading.edm.pickle.read_edm_pickle`` without running its code.
EDM2's Precond (``training/networks_edm2.py``) takes img_resolution, img_channels, label_dim, use_fp16, sigma_data,
logvar_channels and passes the rest to UNet (model_channels, channel_mult, channel_mult_noise, channel_mult_emb,
num_blocks, attn_resolutions, label_balance, concat_balance) and on to every Block (resample_filter,
channels_per_head, dropout, res_balance, attn_balance, clip_act). Those kwargs, with EDM2's defaults, build the same
network here; the state dict maps by name (``unet.*`` -> ``backbone.*``, ``logvar_fourier.*`` ->
``logvar.fourier.*``, ``logvar_linear.*`` -> ``logvar.linear.*``), and every tensor must be there with its shape,
with nothing left over, and each module record must carry EDM2's class name for its place: another version of
EDM2's code, or another network, is refused with one line naming the file and the tensor or module.

The encoder decides the data space: ``StandardRGBEncoder`` (pixels in [-1, 1]) or ``StabilityVAEEncoder``
(Stable Diffusion VAE latents scaled per channel); ``facts.latent`` lets a caller refuse the latter in one line.
Sampling defaults are those of EDM2's ``generate_images.py``: Heun, 32 steps, sigma 0.002..80, rho 7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffscore.core.precond_edm2 import EDM2Precond
from diffscore.errors import DiffscoreError
from diffscore.loading.edm.options import EDMOptions, meta_network
from diffscore.loading.edm.pickle import PersistentRecord, describe, record_state_dict
from diffscore.networks.edm2_unet import EDM2Block, EDM2UNet
from diffscore.networks.logvar import LogVarHead
from diffscore.networks.mp_layers import MPConv, MPFourier

REQUIRED = ("img_resolution", "img_channels", "label_dim")  # EDM2 Precond's arguments without a default
PRECOND_DEFAULTS = dict(use_fp16=True, sigma_data=0.5, logvar_channels=128)
UNET_DEFAULTS = dict(
    model_channels=192,
    channel_mult=[1, 2, 3, 4],
    channel_mult_noise=None,
    channel_mult_emb=None,
    num_blocks=3,
    attn_resolutions=[16, 8],
    label_balance=0.5,
    concat_balance=0.5,
)
BLOCK_DEFAULTS = dict(
    resample_filter=[1, 1], channels_per_head=64, dropout=0.0, res_balance=0.3, attn_balance=0.3, clip_act=256
)
EDM2_SAMPLER = dict(sampler="heun", num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0)  # generate_images.py
VAE_DEFAULTS = dict(  # StabilityVAEEncoder's defaults (training/encoders.py)
    vae_name="stabilityai/sd-vae-ft-mse",
    raw_mean=[5.81, 3.25, 0.12, -2.15],
    raw_std=[4.17, 4.62, 3.71, 3.28],
    final_mean=0.0,
    final_std=0.5,
    batch_size=8,
)
ENCODERS = ("StandardRGBEncoder", "StabilityVAEEncoder")
EDM2_CLASS = {EDM2UNet: "UNet", EDM2Block: "Block", MPConv: "MPConv", MPFourier: "MPFourier"}  # ours -> EDM2's
RENAMES = (("backbone.", "unet."), ("logvar.fourier.", "logvar_fourier."), ("logvar.linear.", "logvar_linear."))


@dataclass(frozen=True)
class EDM2Facts:
    """What an EDM2 pickle says besides its weights."""

    file: str  # the pickle's path
    network: str  # one line: EDM2's Precond record (class, kwargs, parameter count)
    resolution: int  # side of the network's input (pixels, or latent pixels)
    channels: int  # channels of the network's input (3 for RGB, 4 for VAE latents)
    label_dim: int  # number of classes (0 = unconditional)
    model_channels: int  # the U-Net's width (EDM2's size: 128 xs, 192 s, 256 m, 320 l, 384 xl, 448 xxl)
    encoder: str  # "StandardRGBEncoder" (pixels in [-1, 1]) or "StabilityVAEEncoder" (SD VAE latents)
    latent: bool  # True for a StabilityVAEEncoder model: its samples need the VAE to become images
    encoder_scale: tuple[float, ...] | None = None  # final = raw latent * scale + bias, per channel (latent only)
    encoder_bias: tuple[float, ...] | None = None
    vae_name: str | None = None  # the VAE a latent model decodes with
    sigma_data: float = 0.5
    training: dict[str, float] = field(default_factory=dict)  # EDM2Loss's P_mean, P_std (when the file has it)
    dataset_path: str | None = None  # the training set's path as pickled (never opened)
    sampler: dict[str, Any] = field(default_factory=lambda: dict(EDM2_SAMPLER))


def precond_record(data: dict[str, Any], path: Path) -> tuple[PersistentRecord, PersistentRecord]:
    """(Precond record, its UNet record) of the pickle's EMA network, or one DiffscoreError line."""
    net = data.get("ema")
    unet = net.state.get("_modules", {}).get("unet") if isinstance(net, PersistentRecord) else None
    if not isinstance(net, PersistentRecord) or net.class_name != "Precond" or not isinstance(unet, PersistentRecord):
        held = describe(net) if isinstance(net, PersistentRecord) else type(net).__name__
        raise DiffscoreError(f"{path}: its network is {held}, not NVlabs/edm2's Precond wrapping a UNet")
    if unet.class_name != "UNet":
        raise DiffscoreError(f"{path}: Precond wraps a {unet.class_name}, not NVlabs/edm2's UNet")
    if net.init_args:
        raise DiffscoreError(f"{path}: Precond was built with positional arguments; EDM2's takes keywords only")
    return net, unet


def _float_option(opts: EDMOptions, name: str, positive: bool = False) -> float:
    value = opts.kw[name]
    if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not math.isfinite(value):
        raise opts.fail(name, "expected a finite number")
    if positive and value <= 0:
        raise opts.fail(name, "expected a positive number")
    return float(value)


def _optional_int(opts: EDMOptions, name: str) -> int | None:
    return None if opts.kw[name] is None else opts.int(name, 1)


def network_kwargs(init_kwargs: dict) -> tuple[dict, dict]:
    """(EDM2UNet kwargs, EDM2Precond constants) for EDM2's Precond(**init_kwargs), EDM2's defaults filled in;
    DiffscoreError naming the option for one that is unknown or that diffscore's network cannot take."""
    opts = EDMOptions("Precond", init_kwargs, REQUIRED, {**PRECOND_DEFAULTS, **UNET_DEFAULTS, **BLOCK_DEFAULTS})
    resolution, channels = opts.int("img_resolution", 1), opts.int("img_channels", 1)
    clip = None if opts.kw["clip_act"] is None else _float_option(opts, "clip_act", positive=True)
    unet = dict(
        data_shape=[channels, resolution, resolution],
        label_dim=opts.int("label_dim", 0),
        model_channels=opts.int("model_channels", 1),
        channel_mult=opts.int_list("channel_mult", 1, 1),
        channel_mult_noise=_optional_int(opts, "channel_mult_noise"),
        channel_mult_emb=_optional_int(opts, "channel_mult_emb"),
        num_blocks=opts.int("num_blocks", 0),
        attn_resolutions=opts.int_list("attn_resolutions", 1, 0),
        label_balance=opts.probability("label_balance"),
        concat_balance=opts.probability("concat_balance"),
        dropout=opts.probability("dropout"),
        channels_per_head=opts.int("channels_per_head", 1),
        res_balance=opts.probability("res_balance"),
        attn_balance=opts.probability("attn_balance"),
        clip_act=clip,
        resample_filter=opts.int_list("resample_filter", 1, 2),
    )
    if unet["resample_filter"] != [1, 1]:
        raise opts.fail("resample_filter", "diffscore's EDM2UNet takes EDM2's [1, 1] only")
    constants = dict(sigma_data=_float_option(opts, "sigma_data", True), logvar_channels=opts.int("logvar_channels", 1))
    return unet, constants


def _edm2_key(key: str) -> str:
    """EDM2's state_dict key for one of EDM2Precond's."""
    for ours, theirs in RENAMES:
        if key.startswith(ours):
            return theirs + key.removeprefix(ours)
    raise AssertionError(f"EDM2Precond has an unexpected key {key!r}")


def _meta_precond(unet_kwargs: dict, constants: dict) -> EDM2Precond:
    """The network, without storage, to read its parameter names and shapes cheaply."""
    backbone = meta_network("Precond", EDM2UNet, unet_kwargs)
    with torch.device("meta"):
        return EDM2Precond(backbone, LogVarHead(constants["logvar_channels"]), constants["sigma_data"])


def _check_classes(record: PersistentRecord, net: EDM2Precond, path: Path) -> None:
    """Every module record sits where EDM2's network has a module, with EDM2's class name for that place."""
    expected = {"": "Precond", "unet.enc": "ModuleDict", "unet.dec": "ModuleDict"}
    for name, module in net.named_modules():
        if type(module) in EDM2_CLASS:
            expected[_edm2_key(name + ".x")[:-2]] = EDM2_CLASS[type(module)]
    stack = [("", record)]
    while stack:
        name, rec = stack.pop()
        if name not in expected:
            raise DiffscoreError(f"{path}: module {name!r} ({rec.class_name}) has no place in EDM2's network")
        if rec.class_name != expected[name]:
            raise DiffscoreError(f"{path}: module {name!r} is a {rec.class_name}, EDM2's is a {expected[name]}")
        children = rec.state.get("_modules", {}).items()
        stack += [(f"{name}.{k}" if name else k, child) for k, child in children if child is not None]


def precond_state_dict(record: PersistentRecord, net: EDM2Precond, path: Path) -> dict[str, Tensor]:
    """EDM2Precond's state_dict (float32) from the record's tensors: each one present, of its shape, none extra."""
    theirs = record_state_dict(record)
    ours = net.state_dict()
    for key, tensor in ours.items():
        src = _edm2_key(key)
        if src not in theirs:
            raise DiffscoreError(f"{path}: the network lacks tensor {src!r}, which EDM2's Precond of its kwargs has")
        if tuple(theirs[src].shape) != tuple(tensor.shape) or not theirs[src].is_floating_point():
            got = f"{theirs[src].dtype} {tuple(theirs[src].shape)}"
            raise DiffscoreError(
                f"{path}: tensor {src!r} is {got}, EDM2's Precond of its kwargs has {tuple(tensor.shape)}"
            )
    extra = sorted(set(theirs) - {_edm2_key(k) for k in ours})
    if extra:
        raise DiffscoreError(f"{path}: tensor {extra[0]!r} has no place in EDM2's Precond of its kwargs")
    return {key: theirs[_edm2_key(key)].to(torch.float32) for key in ours}


def _encoder_facts(encoder: Any, channels: int, path: Path) -> dict[str, Any]:
    """The encoder's class and, for the VAE one, its per-channel scale and bias (EDM2's float32 arithmetic)."""
    if encoder is None:  # a bare network: EDM2's rule, 3 channels are pixels, latents otherwise
        kind, kwargs = ("StandardRGBEncoder" if channels == 3 else "StabilityVAEEncoder"), {}
    elif isinstance(encoder, PersistentRecord) and encoder.class_name in ENCODERS:
        kind, kwargs = encoder.class_name, encoder.init_kwargs
    else:
        held = encoder.class_name if isinstance(encoder, PersistentRecord) else type(encoder).__name__
        raise DiffscoreError(f"{path}: its encoder is a {held}, not one of EDM2's ({', '.join(ENCODERS)})")
    if kind == "StandardRGBEncoder":
        return dict(encoder=kind, latent=False)
    opts = EDMOptions("StabilityVAEEncoder", kwargs, (), VAE_DEFAULTS).kw
    scale = np.float32(opts["final_std"]) / np.asarray(opts["raw_std"], dtype=np.float32)
    bias = np.float32(opts["final_mean"]) - np.asarray(opts["raw_mean"], dtype=np.float32) * scale
    return dict(
        encoder=kind,
        latent=True,
        encoder_scale=tuple(float(v) for v in scale),
        encoder_bias=tuple(float(v) for v in bias),
        vae_name=str(opts["vae_name"]),
    )


def _training_facts(data: dict[str, Any]) -> dict[str, float]:
    loss = data.get("loss_fn")
    if not isinstance(loss, PersistentRecord) or loss.class_name != "EDM2Loss":
        return {}
    given = {**loss.state, **loss.init_kwargs}
    return {k: float(given[k]) for k in ("P_mean", "P_std") if isinstance(given.get(k), int | float)}


def edm2_facts(data: dict[str, Any], path: str | Path) -> EDM2Facts:
    """The facts of an EDM2 pickle (``read_edm_pickle``'s dict), without building its network."""
    path = Path(path)
    net, unet = precond_record(data, path)
    try:
        unet_kwargs, constants = network_kwargs(net.init_kwargs)
        encoder = _encoder_facts(data.get("encoder"), unet_kwargs["data_shape"][0], path)
    except DiffscoreError as err:
        raise DiffscoreError(f"{path}: {err}") from None
    dataset = data.get("dataset_kwargs")
    return EDM2Facts(
        file=str(path),
        network=describe(net),
        resolution=unet_kwargs["data_shape"][1],
        channels=unet_kwargs["data_shape"][0],
        label_dim=unet_kwargs["label_dim"],
        model_channels=unet_kwargs["model_channels"],
        sigma_data=constants["sigma_data"],
        training=_training_facts(data),
        dataset_path=str(dataset["path"]) if isinstance(dataset, dict) and dataset.get("path") else None,
        **encoder,
    )


def load_edm2_network(data: dict[str, Any], path: str | Path) -> tuple[EDM2Precond, EDM2Facts]:
    """The EMA network of an NVlabs/edm2 pickle (``read_edm_pickle(path)``'s dict) as EDM2Precond(EDM2UNet,
    LogVarHead), float32, eval mode, with the pickle's facts; DiffscoreError (one line, naming the file) if the
    record is not EDM2's network of its kwargs."""
    path = Path(path)
    facts = edm2_facts(data, path)
    record = data["ema"]
    try:
        unet_kwargs, constants = network_kwargs(record.init_kwargs)
        meta = _meta_precond(unet_kwargs, constants)
    except DiffscoreError as err:
        raise DiffscoreError(f"{path}: {err}") from None
    _check_classes(record, meta, path)
    state = precond_state_dict(record, meta, path)
    net = EDM2Precond(EDM2UNet(**unet_kwargs), LogVarHead(constants["logvar_channels"]), constants["sigma_data"])
    net.load_state_dict(state, strict=True)
    return net.eval(), facts
