"""NVlabs/edm's DhariwalUNet (the ADM backbone of edm-imagenet-64x64-cond-adm.pkl) as diffscore's ADMUNet.

Pure functions from an inert record of the network (its constructor kwargs and its state_dict, EDM's key names) to
ADMUNet kwargs, an ADMUNet state_dict, and a loaded ADMUNet. What differs, from EDM's ``training/networks.py``
(Karras et al. 2022; classes DhariwalUNet, UNetBlock, Conv2d, Linear, GroupNorm, PositionalEmbedding, AttentionOp):

- names: EDM keeps the mapping layers at the top (``map_layer0``, ``map_label``, ...), ADMUNet under ``emb.``;
  ``enc.*``, ``dec.*``, ``out_norm.*``, ``out_conv.*`` and the block sub-layers (norm0, conv0, affine, norm1, conv1,
  skip, norm2, qkv, proj) agree.
- noise embedding: EDM's PositionalEmbedding gives [cos, sin], ADMUNet's [sin, cos] (same frequencies,
  endpoint=False). Absorbed exactly by swapping the two halves of map_layer0's input columns and of map_augment's
  output rows (map_augment adds into the embedding before map_layer0).
- attention: EDM reads qkv's 3C output channels as (head, channel, part), i.e. q, k, v interleaved per channel;
  ADMUNet as (part, head, channel). The rows of qkv.weight and qkv.bias are permuted.
- resampling: EDM's up/down convs (conv0, and the kernel-0 skip of an up/down block, which is *only* a resampling)
  carry a persistent ``resample_filter`` buffer, here always the [1, 1] box filter; ADMUNet has none, so it is
  checked and dropped.
- out_channels: as EDM's (the iDDPM baseline doubles it for a learned variance, which iDDPMPrecond drops).
- GroupNorm: EDM uses min(32, C // 4) groups and fails where that does not divide C; diffscore's group_norm then
  picks another count, so such a net is refused rather than imported as a different function.
- precision: EDM's AttentionOp computes softmax(q k / sqrt(d)) in float32 whatever the dtype, ADMUNet in the
  input's; ADMUNet's positional embedding reads c_noise in float32, EDM's in its dtype (both with float32
  frequencies). In float32 the two agree; in float64 they agree exactly for float32 noise levels.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from diffscore.errors import DiffscoreError
from diffscore.loading.edm.options import EDMOptions, meta_network
from diffscore.networks.adm import ADMUNet

REQUIRED = ("img_resolution", "in_channels", "out_channels")  # DhariwalUNet's arguments without a default
EDM_DEFAULTS = dict(  # DhariwalUNet's defaults (EDM training/networks.py)
    label_dim=0,
    augment_dim=0,
    model_channels=192,
    channel_mult=[1, 2, 3, 4],
    channel_mult_emb=4,
    num_blocks=3,
    attn_resolutions=[32, 16, 8],
    dropout=0.10,
    label_dropout=0,
)
CHANNELS_PER_HEAD = 64  # DhariwalUNet's block_kwargs: heads = out_channels // 64
RESAMPLE_FILTER = re.compile(r"((?:enc\.\d+x\d+_down)|(?:dec\.\d+x\d+_up))\.(?:conv0|skip)\.resample_filter")
BOX_FILTER = torch.full((1, 1, 2, 2), 0.25)  # EDM's [1, 1] filter: outer([1, 1], [1, 1]) / 4, as [1, 1, 2, 2]


def _meta_adm(adm_kwargs: dict) -> ADMUNet:
    return meta_network("DhariwalUNet", ADMUNet, adm_kwargs)


def adm_kwargs_from_edm(init_kwargs: dict) -> dict:
    """ADMUNet kwargs for the DhariwalUNet that EDM built with ``init_kwargs`` (its defaults fill missing ones);
    raises DiffscoreError on an option ADMUNet cannot represent."""
    opts = EDMOptions("DhariwalUNet", init_kwargs, REQUIRED, EDM_DEFAULTS)
    resolution, in_channels = opts.int("img_resolution", 1), opts.int("in_channels", 1)
    out_channels = opts.int("out_channels", 1)
    model_channels = opts.int("model_channels", 2)
    if model_channels % 2:
        raise DiffscoreError(f"DhariwalUNet model_channels={model_channels}: must be even (its noise embedding)")
    channel_mult = opts.int_list("channel_mult", 1, 1)
    if resolution >> (len(channel_mult) - 1) < 1:
        raise DiffscoreError(f"DhariwalUNet channel_mult={channel_mult}: too many levels for {resolution}x{resolution}")
    adm_kwargs = opts.unet_kwargs(model_channels, channel_mult)
    if out_channels != in_channels:  # the iDDPM baseline's learned variance: 2 * in_channels
        adm_kwargs["out_channels"] = out_channels
    _meta_adm(adm_kwargs)  # heads and group norms as EDM has them, or a DiffscoreError
    return adm_kwargs


def _edm_key(key: str) -> str:
    """EDM's name for an ADMUNet state_dict key: the mapping layers drop the ``emb.`` prefix."""
    return key.removeprefix("emb.")


def _qkv_rows(channels: int, edm_heads: int, adm_heads: int, key: str) -> Tensor:
    """Indices taking EDM's qkv rows, ordered (head, channel, part), to ADMUNet's (part, head, channel)."""
    if edm_heads != adm_heads:
        raise DiffscoreError(f"EDM key {key!r}: {edm_heads} attention heads in EDM, {adm_heads} in ADMUNet")
    rows = torch.arange(3 * channels).view(edm_heads, channels // edm_heads, 3)  # [h, D, 3]: EDM's row of each
    return rows.permute(2, 0, 1).reshape(-1)  # [3 * C], at ADMUNet's row (part, head, channel)


def _convert(key: str, t: Tensor, net: ADMUNet, half: int) -> Tensor:
    """EDM's tensor for ADMUNet's ``key`` in ADMUNet's layout (a permutation where they differ, else itself)."""
    if key == "emb.map_layer0.weight":  # [E, M]: input columns [cos, sin] -> [sin, cos]
        return torch.cat([t[:, half:], t[:, :half]], dim=1)
    if key == "emb.map_augment.weight":  # [M, A]: output rows [cos, sin] -> [sin, cos]
        return torch.cat([t[half:], t[:half]], dim=0)
    if key.endswith((".qkv.weight", ".qkv.bias")):  # [3C, C, 1, 1] / [3C]
        block = net.get_submodule(key.rsplit(".", 2)[0])
        channels = t.shape[0] // 3
        return t[_qkv_rows(channels, channels // CHANNELS_PER_HEAD, block.num_heads, key)]
    return t


def _check_resample_filter(key: str, t: object, net: ADMUNet) -> None:
    """EDM's resample_filter buffers must sit in an up/down block of the net and hold the [1, 1] box filter."""
    match = RESAMPLE_FILTER.fullmatch(key)
    if match is None or match.group(1) not in dict(net.named_modules()):
        raise DiffscoreError(f"EDM key {key!r} has no place in the ADMUNet these kwargs build")
    if not isinstance(t, Tensor) or tuple(t.shape) != (1, 1, 2, 2) or not torch.equal(t.float().cpu(), BOX_FILTER):
        raise DiffscoreError(f"EDM key {key!r} is not the [1, 1] box resample filter DhariwalUNet always uses")


def adm_state_dict_from_edm(edm_state: dict[str, Tensor], init_kwargs: dict) -> dict[str, Tensor]:
    """ADMUNet's state_dict (its key names and layouts) from a DhariwalUNet state_dict built with ``init_kwargs``.

    Every ADMUNet key must be present with its shape, and every EDM key used (or, for resample_filter buffers,
    checked); anything else is a DiffscoreError naming the key. The input is not modified."""
    adm_kwargs = adm_kwargs_from_edm(init_kwargs)
    net = _meta_adm(adm_kwargs)
    half = adm_kwargs["model_channels"] // 2
    out = {}
    for key, target in net.state_dict().items():
        src = _edm_key(key)
        if src not in edm_state:
            raise DiffscoreError(f"EDM state_dict lacks {src!r} (ADMUNet's {key!r})")
        t = edm_state[src]
        if not isinstance(t, Tensor) or t.shape != target.shape:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise DiffscoreError(f"EDM key {src!r} has shape {shape}, ADMUNet expects {tuple(target.shape)}")
        out[key] = _convert(key, t, net, half)
    used = {_edm_key(key) for key in out}
    for key in edm_state:
        if key not in used:
            _check_resample_filter(key, edm_state[key], net)
    return out


def adm_from_edm(init_kwargs: dict, edm_state: dict[str, Tensor]) -> ADMUNet:
    """The ADMUNet computing what EDM's DhariwalUNet(**init_kwargs) with ``edm_state`` computes, loaded strictly
    (float32 parameters, in training mode as any new module)."""
    state = adm_state_dict_from_edm(edm_state, init_kwargs)
    net = ADMUNet(**adm_kwargs_from_edm(init_kwargs))
    net.load_state_dict(state, strict=True)
    return net
