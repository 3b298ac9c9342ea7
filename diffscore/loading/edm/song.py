"""NVlabs/edm's SongUNet (DDPM++ "vp" and NCSN++ "ve" nets of the EDM pickles) as diffscore's UNet.

Pure functions from an inert record of the network (its constructor kwargs and its state_dict, EDM's key names) to
UNet kwargs, a UNet state_dict, and a loaded UNet. What differs, from EDM's ``training/networks.py`` (Karras et al.
2022; classes SongUNet, UNetBlock, Conv2d, Linear, GroupNorm, PositionalEmbedding, FourierEmbedding, AttentionOp):

- names: EDM keeps the mapping layers at the top (``map_noise``, ``map_label``, ``map_layer0``, ...), UNet under
  ``emb.``; EDM's standard decoder ends in ``dec.{R}x{R}_aux_norm`` / ``_aux_conv`` (R the input side), UNet in
  ``out_norm`` / ``out_conv``; NCSN++'s ``enc.{r}x{r}_aux_residual`` conv is UNet's ``..._aux_residual.0``. The
  blocks (norm0, conv0, affine, norm1, conv1, skip, norm2, qkv, proj) and ``enc.{R}x{R}_conv`` agree.
- noise embedding: SongUNet swaps its embedding's halves, so it feeds [sin, cos] for both embedding types. UNet's
  PositionalEmbedding gives [sin, cos] too, its FourierEmbedding [cos, sin]: for a Fourier net the halves of
  everything added into that vector (map_label's and map_augment's output rows) and of map_layer0's input columns
  are swapped, which is exact.
- class-label bias: SongUNet's map_label has a bias, UNet's none. EDM's preconditioning passes an all-zero label
  for ``class_labels=None`` (and label dropout zeroes it), so EDM adds that bias to the noise embedding whether or
  not a label is given. It is therefore folded into map_layer0's bias, b0 + W0 b_label, which is EDM's function
  with a label and, for ``cond=None`` (classifier-free guidance's unconditional half), EDM's zero-label output.
  An option adding a bias to UNet's map_label would not do that: UNet skips map_label when cond is None.
- attention: EDM reads qkv's 3C output channels as (head, channel, part), UNet as (part, head, channel); the rows
  of qkv.weight and qkv.bias are permuted (SongUNet has one head).
- resampling: EDM's up/down convs carry a persistent ``resample_filter`` buffer; UNet builds the same filter
  from ``resample_filter``, so a buffer that is given is checked and dropped.
- unsupported: encoder_type / decoder_type 'skip' (no published config uses them), out_channels != in_channels,
  sides other than powers of two >= 4, and channel counts EDM's GroupNorm (min(32, C // 4) groups) cannot split.
- precision: EDM's AttentionOp computes the softmax in float32 whatever the dtype, UNet in the input's; equal in
  float32, UNet is the exact function in float64.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from diffscore.errors import DiffscoreError
from diffscore.loading.edm.options import EDMOptions, meta_network
from diffscore.networks.unet import UNet

REQUIRED = ("img_resolution", "in_channels", "out_channels")  # SongUNet's arguments without a default
EDM_DEFAULTS = dict(  # SongUNet's defaults (EDM training/networks.py)
    label_dim=0,
    augment_dim=0,
    model_channels=128,
    channel_mult=[1, 2, 2, 2],
    channel_mult_emb=4,
    num_blocks=4,
    attn_resolutions=[16],
    dropout=0.10,
    label_dropout=0,
    embedding_type="positional",
    channel_mult_noise=1,
    encoder_type="standard",
    decoder_type="standard",
    resample_filter=[1, 1],
)
CHOICES = dict(  # the values UNet represents, of EDM's ('skip' encoder/decoder are EDM-only)
    embedding_type=("positional", "fourier"),
    encoder_type=("standard", "residual"),
    decoder_type=("standard",),
)
RESAMPLE_FILTER = re.compile(
    r"((?:enc\.\d+x\d+_down\.(?:conv0|skip))|(?:dec\.\d+x\d+_up\.(?:conv0|skip))|(?:enc\.\d+x\d+_aux_residual))"
    r"\.resample_filter"
)
AUX_RESIDUAL = re.compile(r"(enc\.\d+x\d+_aux_residual)\.0\.(weight|bias)")


def unet_kwargs_from_edm(init_kwargs: dict) -> dict:
    """UNet kwargs for the SongUNet that EDM built with ``init_kwargs`` (EDM's defaults fill missing ones);
    raises DiffscoreError, naming the option, on one UNet cannot represent."""
    opts = EDMOptions("SongUNet", init_kwargs, REQUIRED, EDM_DEFAULTS)
    kw = opts.kw
    resolution, in_channels = opts.int("img_resolution", 1), opts.int("in_channels", 1)
    if resolution < 4 or resolution & (resolution - 1):
        raise DiffscoreError(f"SongUNet img_resolution={resolution}: UNet takes powers of two >= 4")
    if kw["out_channels"] != in_channels:
        raise DiffscoreError(
            f"SongUNet out_channels={kw['out_channels']!r} with in_channels={in_channels}: UNet outputs in_channels"
        )
    channel_mult = opts.int_list("channel_mult", 1, 1)
    if resolution >> (len(channel_mult) - 1) < 1:
        raise DiffscoreError(f"SongUNet channel_mult={channel_mult}: too many levels for {resolution}x{resolution}")
    model_channels, noise_mult = opts.int("model_channels", 1), opts.int("channel_mult_noise", 1)
    if model_channels * noise_mult % 2:
        raise DiffscoreError(f"SongUNet model_channels={model_channels}: its noise embedding needs an even width")
    opts.choice("decoder_type", CHOICES["decoder_type"])
    return dict(
        **opts.unet_kwargs(model_channels, channel_mult),
        embedding_type=opts.choice("embedding_type", CHOICES["embedding_type"]),
        channel_mult_noise=noise_mult,
        encoder_type=opts.choice("encoder_type", CHOICES["encoder_type"]),
        resample_filter=opts.int_list("resample_filter", 1, 2),
    )


def _meta_unet(unet_kwargs: dict) -> UNet:
    return meta_network("SongUNet", UNet, unet_kwargs)


def _edm_key(key: str, side: int) -> str:
    """EDM's name for a UNet state_dict key (``side``: the input resolution, which names EDM's output layers)."""
    if key.startswith("emb."):
        return key.removeprefix("emb.")
    if key.startswith(("out_norm.", "out_conv.")):
        layer, param = key.split(".")
        return f"dec.{side}x{side}_aux_{layer.removeprefix('out_')}.{param}"
    match = AUX_RESIDUAL.fullmatch(key)
    return f"{match[1]}.{match[2]}" if match else key


def _qkv_rows(channels: int, heads: int) -> Tensor:
    """Indices taking EDM's qkv rows, ordered (head, channel, part), to UNet's (part, head, channel)."""
    rows = torch.arange(3 * channels).view(heads, channels // heads, 3)  # [h, D, 3]: EDM's row of each
    return rows.permute(2, 0, 1).reshape(-1)  # [3 * C], at UNet's row (part, head, channel)


def _swap_halves(t: Tensor, dim: int) -> Tensor:
    """[a, b] -> [b, a] along ``dim`` (EDM's [sin, cos] noise-embedding order <-> UNet Fourier's [cos, sin])."""
    a, b = t.chunk(2, dim=dim)
    return torch.cat([b, a], dim=dim)


def _convert(key: str, edm_state: dict[str, Tensor], net: UNet, side: int, fourier: bool) -> Tensor:
    """EDM's tensor for UNet's ``key`` in UNet's layout: permuted where the layouts differ, the label bias folded."""
    t = edm_state[_edm_key(key, side)]
    if key == "emb.map_layer0.bias" and net.label_dim:  # b0 + W0 b_label, in float64 (see the module docstring)
        w0, b_label = edm_state["map_layer0.weight"], edm_state["map_label.bias"]
        t = (t.double() + w0.double() @ b_label.double()).to(t.dtype)
    if fourier and key == "emb.map_layer0.weight":  # [E, M]: input columns [sin, cos] -> [cos, sin]
        t = _swap_halves(t, 1)
    if fourier and key in ("emb.map_label.weight", "emb.map_augment.weight"):  # [M, L]: output rows
        t = _swap_halves(t, 0)
    if key.endswith((".qkv.weight", ".qkv.bias")):  # [3C, C, 1, 1] / [3C]
        block = net.get_submodule(key.rsplit(".", 2)[0])
        t = t[_qkv_rows(t.shape[0] // 3, block.num_heads)]
    return t


def _check_shape(src: str, t: object, shape: tuple[int, ...]) -> None:
    if not isinstance(t, Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise DiffscoreError(f"EDM key {src!r} has shape {got}, the UNet of these kwargs expects {shape}")


def _check_extra(key: str, t: object, filt: Tensor, net: UNet) -> None:
    """An EDM key with no UNet tensor must be a resample_filter buffer that sits in a resampling layer of the net
    and holds the filter of ``resample_filter``; anything else is an error."""
    match = RESAMPLE_FILTER.fullmatch(key)
    block = match[1].removesuffix(".conv0").removesuffix(".skip") if match else ""
    if match is None or block not in dict(net.named_modules()):
        raise DiffscoreError(f"EDM key {key!r} has no place in the UNet these kwargs build")
    if not isinstance(t, Tensor) or t.shape != filt.shape or not torch.allclose(t.double().cpu(), filt):
        raise DiffscoreError(f"EDM key {key!r} is not the resample filter of these kwargs' resample_filter")


def unet_state_dict_from_edm(edm_state: dict[str, Tensor], init_kwargs: dict) -> dict[str, Tensor]:
    """UNet's state_dict (its key names and layouts) from a SongUNet state_dict built with ``init_kwargs``.

    Every UNet key's EDM tensor must be present with its shape (and map_label.bias for a conditional net), and
    every EDM key used or, for resample_filter buffers, checked; anything else is a DiffscoreError naming the key.
    The tensors keep their dtype; the input is not modified."""
    unet_kwargs = unet_kwargs_from_edm(init_kwargs)
    net = _meta_unet(unet_kwargs)
    side, fourier = unet_kwargs["data_shape"][1], unet_kwargs["embedding_type"] == "fourier"
    expected = {_edm_key(key, side): tuple(t.shape) for key, t in net.state_dict().items()}
    if net.label_dim:
        expected["map_label.bias"] = expected["map_label.weight"][:1]  # [noise_channels]
    for src, shape in expected.items():
        if src not in edm_state:
            raise DiffscoreError(f"EDM state_dict lacks {src!r}, which SongUNet with these kwargs has")
        _check_shape(src, edm_state[src], shape)
    f = torch.as_tensor(unet_kwargs["resample_filter"], dtype=torch.float64)
    filt = (torch.outer(f, f) / f.sum() ** 2)[None, None]  # [1, 1, k, k], EDM's buffer
    for key, t in edm_state.items():
        if key not in expected:
            _check_extra(key, t, filt, net)
    return {key: _convert(key, edm_state, net, side, fourier) for key in net.state_dict()}


def unet_from_edm(init_kwargs: dict, edm_state: dict[str, Tensor]) -> UNet:
    """The UNet computing what EDM's SongUNet(**init_kwargs) with ``edm_state`` computes, loaded strictly.

    Its parameters take the weights' dtype where they share one (float32 in EDM's pickles), else float32; it is
    in training mode, as any new module."""
    state = unet_state_dict_from_edm(edm_state, init_kwargs)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    net = UNet(**unet_kwargs_from_edm(init_kwargs)).to(dtypes.pop() if len(dtypes) == 1 else torch.float32)
    net.load_state_dict(state, strict=True)
    return net
