"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", arXiv 2312.02696, config G: Sec. 2, Appendix B, Fig. 21) as a backbone
F(x_in, c_noise, cond, aug_label) -> [B, C, H, W].

The layout of NVlabs/edm2 ``training/networks_edm2.py`` (classes Block and UNet) with its parameter names, so an
EDM2 state_dict loads onto it key for key (``diffscore.loading.edm2``): no biases, no group norms; every conv and
linear layer is an :class:`~diffscore.networks.mp_layers.MPConv`; the encoder pixel-normalises its activations; the
residual branch is modulated by (emb_linear(emb) * emb_gain + 1); branches and skips join by magnitude-preserving
sums and concatenations; attention is cosine attention (pixel-normalised q, k, v per head); a constant ones channel
joins the input; the output layer's gain ``out_gain`` is learned and starts at 0 (F = 0 at initialisation).

What diffscore adds: an augmentation label (``augment_dim``, e.g. ScoreAug's) enters like the class label, through
an MPConv linear layer mixed into the embedding by mp_sum; a missing label (None) is the all-zero label, so "no
augmentation" and "zero label" are the same function, as EDM2 treats a missing class label. Class-label dropout
(``label_dropout``, for classifier-free guidance) zeroes the one-hot, EDM2's unconditional input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffscore.core.edm2_presets import edm2_size
from diffscore.networks.backbone import Backbone
from diffscore.networks.mp_layers import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize
from diffscore.networks.resample import Resample
from diffscore.networks.unet import check_image_shape


class EDM2Block(nn.Module):
    """EDM2's encoder/decoder block (Fig. 21): optional resampling, a 1x1 skip conv when the width changes (before
    the residual branch in the encoder, after it in the decoder), pixel norm (encoder), the modulated residual
    branch, mp_sum with res_balance, optional cosine self-attention joined by mp_sum with attn_balance, clipping."""

    def __init__(
        self,
        in_channels: int,  # input channels
        out_channels: int,  # output channels
        emb_channels: int,  # width of the embedding vector
        flavor: str = "enc",  # "enc" (encoder) or "dec" (decoder)
        resample_mode: str = "keep",  # "keep", "up" or "down"
        resample_filter: list[int] | tuple[int, ...] = (1, 1),  # FIR filter of the resampling
        attention: bool = False,  # self-attention after the residual branch
        channels_per_head: int = 64,  # attention heads = out_channels // this (0 heads: no attention)
        dropout: float = 0.0,  # dropout probability in the residual branch
        res_balance: float = 0.3,  # share of the residual branch in mp_sum (0 = main branch only)
        attn_balance: float = 0.3,  # share of the attention output in mp_sum
        clip_act: float | None = 256.0,  # clip the output activations to +-this (None = no clipping)
    ) -> None:
        super().__init__()
        if flavor not in ("enc", "dec") or resample_mode not in ("keep", "up", "down"):
            raise ValueError(f"EDM2Block: bad flavor {flavor!r} or resample_mode {resample_mode!r}")
        self.out_channels = out_channels
        self.flavor = flavor
        self.num_heads = out_channels // channels_per_head if attention else 0
        if self.num_heads and out_channels % self.num_heads:
            raise ValueError(f"{out_channels} channels do not split into {self.num_heads} attention heads")
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.resample = Resample(resample_mode, resample_filter) if resample_mode != "keep" else None
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.resample is not None:
            x = self.resample(x)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # [B, C]
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.dropout:
            y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)
        return x.clamp(-self.clip_act, self.clip_act) if self.clip_act is not None else x

    def _attention(self, x: Tensor) -> Tensor:
        """Cosine self-attention: qkv channels read as (head, channel, part); q, k, v pixel-normalised per head."""
        B, C, H, W = x.shape
        y = self.attn_qkv(x).reshape(B, self.num_heads, C // self.num_heads, 3, H * W)  # [B, h, D, 3, HW]
        q, k, v = normalize(y, dim=2).transpose(2, 4).unbind(3)  # each [B, h, HW, D]
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(D)) v: [B, h, HW, D]
        return self.attn_proj(a.transpose(2, 3).reshape(B, C, H, W))


class EDM2UNet(Backbone):
    """EDM2's U-Net (config G) as a diffscore backbone; ``preset`` picks EDM2's width and dropout by size name."""

    def __init__(
        self,
        data_shape: list[int] = [3, 64, 64],  # noqa: B006 - [C, H, W], square (linked from data)
        label_dim: int = 0,  # number of classes (0 = unconditional)
        augment_dim: int = 0,  # size of the augmentation label (0 = none)
        preset: str | None = None,  # EDM2 size "xxs", "xs", "s", "m", "l", "xl", "xxl": model_channels, dropout
        model_channels: int | None = None,  # base channel count (None: the preset's, else EDM2's 192)
        channel_mult: list[int] = [1, 2, 3, 4],  # noqa: B006 - per-resolution channel multipliers
        channel_mult_noise: int | None = None,  # noise-embedding width multiplier (None: channel_mult[0])
        channel_mult_emb: int | None = None,  # embedding width multiplier (None: max(channel_mult))
        num_blocks: int = 3,  # residual blocks per resolution
        attn_resolutions: list[int] = [16, 8],  # noqa: B006 - resolutions with self-attention
        label_balance: float = 0.5,  # share of the class embedding in mp_sum with the noise embedding
        augment_balance: float = 0.5,  # share of the augmentation embedding in mp_sum with the rest
        concat_balance: float = 0.5,  # share of the main path (vs. the encoder skip) in the decoder's mp_cat
        dropout: float | None = None,  # dropout in the residual branches (None: the preset's, else 0)
        label_dropout: float = 0.0,  # training: zero the class label with this probability (guidance)
        channels_per_head: int = 64,  # attention heads = channels // this
        res_balance: float = 0.3,  # share of the residual branch in each block's mp_sum
        attn_balance: float = 0.3,  # share of the attention output in each block's mp_sum
        clip_act: float | None = 256.0,  # clip block outputs to +-this (None = no clipping)
        resample_filter: list[int] = [1, 1],  # noqa: B006 - FIR filter of the up/down-sampling blocks
    ) -> None:
        super().__init__()
        model_channels, dropout = _width_and_dropout(preset, model_channels, dropout)
        img_channels, resolution = check_image_shape(data_shape)
        if resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f"{len(channel_mult)} levels do not halve resolution {resolution} evenly")
        if not 0 <= label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        self.data_shape = (img_channels, resolution, resolution)
        self.label_dim, self.augment_dim = label_dim, augment_dim
        self.label_balance, self.augment_balance = label_balance, augment_balance
        self.concat_balance, self.label_dropout = concat_balance, label_dropout
        widths = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None
        self.emb_augment = MPConv(augment_dim, cemb, kernel=[]) if augment_dim else None
        block = dict(
            emb_channels=cemb,
            resample_filter=resample_filter,
            channels_per_head=channels_per_head,
            dropout=dropout,
            res_balance=res_balance,
            attn_balance=attn_balance,
            clip_act=clip_act,
        )
        levels = [(resolution >> level, width) for level, width in enumerate(widths)]
        skips = self._build_encoder(levels, img_channels + 1, num_blocks, attn_resolutions, block)
        cout = self._build_decoder(levels, num_blocks, attn_resolutions, block, skips)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def _build_encoder(
        self, levels: list[tuple[int, int]], cin: int, num_blocks: int, attn_resolutions: list[int], block: dict
    ) -> list[int]:
        """``self.enc`` as EDM2's encoder; returns the output widths of its layers (the skips), in order."""
        self.enc = nn.ModuleDict()
        cout = cin
        for level, (res, width) in enumerate(levels):
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, width, kernel=[3, 3])
                cout = width
            else:
                self.enc[f"{res}x{res}_down"] = EDM2Block(cout, cout, flavor="enc", resample_mode="down", **block)
            for idx in range(num_blocks):
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = EDM2Block(cout, width, flavor="enc", attention=attn, **block)
                cout = width
        return [layer.out_channels for layer in self.enc.values()]

    def _build_decoder(
        self, levels: list[tuple[int, int]], num_blocks: int, attn_resolutions: list[int], block: dict, skips: list
    ) -> int:
        """``self.dec`` as EDM2's decoder (consumes ``skips`` from the end); returns its output width."""
        self.dec = nn.ModuleDict()
        cout = skips[-1]
        for level, (res, width) in reversed(list(enumerate(levels))):
            if level == len(levels) - 1:
                self.dec[f"{res}x{res}_in0"] = EDM2Block(cout, cout, flavor="dec", attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = EDM2Block(cout, cout, flavor="dec", **block)
            else:
                self.dec[f"{res}x{res}_up"] = EDM2Block(cout, cout, flavor="dec", resample_mode="up", **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), width
                attn = res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = EDM2Block(cin, cout, flavor="dec", attention=attn, **block)
        return cout

    def forward(
        self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None, aug_label: Tensor | None = None
    ) -> Tensor:
        C, H, W = self.data_shape
        if x.ndim != 4 or tuple(x.shape[1:]) != (C, H, W):
            raise ValueError(f"EDM2UNet expects [B, {C}, {H}, {W}], got {tuple(x.shape)}")
        emb = self._embedding(c_noise.reshape(-1), cond, aug_label, x.shape[0])  # [B, cemb]
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # the constant input channel
        skips = []
        for layer in self.enc.values():
            x = layer(x) if isinstance(layer, MPConv) else layer(x, emb)
            skips.append(x)
        for name, layer in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = layer(x, emb)
        return self.out_conv(x, gain=self.out_gain)

    def _embedding(self, c_noise: Tensor, cond: Tensor | None, aug_label: Tensor | None, batch: int) -> Tensor:
        """mp_silu(mp_sum(mp_sum(noise, label, label_balance), augment, augment_balance)); a missing label is 0."""
        if cond is not None and self.emb_label is None:
            raise ValueError("a class label was given but the backbone has label_dim=0; set label_dim")
        if aug_label is not None and self.emb_augment is None:
            raise ValueError("an augmentation label was given but the backbone has augment_dim=0; set augment_dim")
        emb = self.emb_noise(self.emb_fourier(c_noise))  # [B, cemb]
        if self.emb_label is not None:
            onehot = self._onehot(cond, batch, emb)  # [B, L]
            emb = mp_sum(emb, self.emb_label(onehot * math.sqrt(self.label_dim)), t=self.label_balance)
        if self.emb_augment is not None:
            aug = emb.new_zeros(batch, self.augment_dim) if aug_label is None else aug_label.to(emb.dtype)
            if aug.shape != (batch, self.augment_dim):
                raise ValueError(f"aug_label must be [{batch}, {self.augment_dim}], got {tuple(aug.shape)}")
            emb = mp_sum(emb, self.emb_augment(aug), t=self.augment_balance)
        return mp_silu(emb)

    def _onehot(self, cond: Tensor | None, batch: int, like: Tensor) -> Tensor:
        """One-hot [B, L] of labels [B] (long), a given [B, L] label vector, or zeros for None (EDM2's no label);
        zeroed for a ``label_dropout`` share of the samples in training."""
        if cond is None:
            return like.new_zeros(batch, self.label_dim)
        if cond.ndim == 1 and not cond.is_floating_point():
            onehot = F.one_hot(cond, self.label_dim).to(like.dtype)  # raises on a label outside [0, L)
        else:
            onehot = cond.to(like.dtype)
        if onehot.shape != (batch, self.label_dim):
            raise ValueError(f"cond must be labels [{batch}] or one-hot [{batch}, {self.label_dim}]")
        if self.training and self.label_dropout > 0:
            keep = torch.rand(batch, 1, device=onehot.device) >= self.label_dropout
            onehot = onehot * keep
        return onehot


def _width_and_dropout(preset: str | None, model_channels: int | None, dropout: float | None) -> tuple[int, float]:
    """(model_channels, dropout) from EDM2's size ``preset`` or the explicit values (EDM2's 192 and 0 by default)."""
    if preset is None:
        return (192 if model_channels is None else model_channels), (0.0 if dropout is None else dropout)
    channels, preset_dropout = edm2_size(preset)
    if model_channels is not None and model_channels != channels:
        raise ValueError(f"preset {preset!r} has model_channels {channels}; drop model_channels={model_channels}")
    return channels, (preset_dropout if dropout is None else dropout)
