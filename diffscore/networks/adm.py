"""The ADM U-Net (Dhariwal & Nichol 2021) as EDM configures it for class-conditional ImageNet-64.

192 channels, multipliers [1, 2, 3, 4], 3 blocks per resolution, attention at 32, 16 and 8 (64 channels per
head), scale-shift conditioning, the class label added after the mapping MLP, dropout 0.10
(Karras et al. 2022, Appendix F.2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffscore.networks.backbone import Backbone
from diffscore.networks.embedding import ConditionEmbedding
from diffscore.networks.group_norm import group_norm
from diffscore.networks.init import init_weights
from diffscore.networks.unet import UNetBlock, check_image_shape

INIT = dict(mode="kaiming_uniform", scale=math.sqrt(1 / 3), bias_scale=math.sqrt(1 / 3))
INIT_ZERO = dict(mode="kaiming_uniform", scale=0.0)


def block_kwargs(emb_channels: int, dropout: float) -> dict:
    """UNetBlock options shared by every ADM block: scale-shift conditioning, 64 channels per attention head, no
    skip scaling, GroupNorm eps 1e-5, a parameter-free resampled skip, EDM's ADM initialisation."""
    return dict(
        emb_channels=emb_channels,
        num_heads=None,
        channels_per_head=64,
        dropout=dropout,
        skip_scale=1.0,
        eps=1e-5,
        resample_proj=False,
        adaptive_scale=True,
        init=INIT,
        init_zero=INIT_ZERO,
        init_attn=INIT,
    )


def build_encoder(
    in_channels: int,
    num_blocks: int,
    attn_resolutions: list[int],
    block: dict,
    *,
    resolution: int,
    model_channels: int,
    channel_mult: list[int],
) -> tuple[nn.ModuleDict, list[int]]:
    """ADM's encoder, named "{res}x{res}_conv|down|block{i}", and the channel count of each skip it leaves."""
    enc = nn.ModuleDict()
    cout = in_channels
    skips = []
    for level, mult in enumerate(channel_mult):
        res = resolution >> level
        if level == 0:
            cin, cout = cout, model_channels * mult
            enc[f"{res}x{res}_conv"] = init_weights(nn.Conv2d(cin, cout, 3, padding=1), **INIT)
        else:
            enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
        skips.append(cout)
        for idx in range(num_blocks):
            cin, cout = cout, model_channels * mult
            enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
            skips.append(cout)
    return enc, skips


def build_decoder(
    skips: list[int],
    num_blocks: int,
    attn_resolutions: list[int],
    block: dict,
    *,
    resolution: int,
    model_channels: int,
    channel_mult: list[int],
) -> tuple[nn.ModuleDict, int]:
    """ADM's decoder, named "{res}x{res}_in0|in1|up|block{i}", consuming the encoder's skips (a copy is popped);
    returns it and its output channel count. The innermost level starts with an attention block, always."""
    dec = nn.ModuleDict()
    skips = list(skips)
    cout = skips[-1]
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = resolution >> level
        if level == len(channel_mult) - 1:
            dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
            dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
        else:
            dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
    return dec, cout


class ADMUNet(Backbone):
    """Backbone F(x_in [B, C, H, W], c_noise [B], cond, aug_label) -> [B, out_channels (default C), H, W]."""

    def __init__(
        self,
        data_shape: list[int] = [3, 64, 64],  # noqa: B006 - [C, H, W] (linked from data)
        label_dim: int = 0,  # number of classes (0 = unconditional; ImageNet: 1000)
        augment_dim: int = 0,  # size of the augmentation label (0 = none)
        model_channels: int = 192,  # base channel count
        channel_mult: list[int] = [1, 2, 3, 4],  # noqa: B006 - per-resolution channel multipliers
        channel_mult_emb: int = 4,  # embedding width = model_channels * this
        num_blocks: int = 3,  # residual blocks per resolution
        attn_resolutions: list[int] = [32, 16, 8],  # noqa: B006 - resolutions with self-attention
        dropout: float = 0.10,  # dropout inside residual blocks
        label_dropout: float = 0.0,  # class-label dropout (classifier-free guidance)
        out_channels: int | None = None,  # output channels (None: as the input; iDDPM's learned variance: twice)
    ) -> None:
        super().__init__()
        in_channels, resolution = check_image_shape(data_shape)
        if resolution >> (len(channel_mult) - 1) < 1:
            raise ValueError(f"{len(channel_mult)} levels are too many for resolution {resolution}")
        self.data_shape = (in_channels, resolution, resolution)
        self.resolution, self.in_channels = resolution, in_channels
        self.label_dim, self.augment_dim = label_dim, augment_dim
        emb_channels = model_channels * channel_mult_emb
        block = block_kwargs(emb_channels, dropout)
        self.emb = ConditionEmbedding(
            model_channels,
            emb_channels,
            "positional",
            label_dim=label_dim,
            augment_dim=augment_dim,
            label_dropout=label_dropout,
            init_mode="kaiming_uniform",
            init_scale=math.sqrt(1 / 3),
            bias_scale=math.sqrt(1 / 3),
            label_stage="output",
            endpoint=False,
        )
        levels = dict(resolution=resolution, model_channels=model_channels, channel_mult=channel_mult)
        self.enc, skips = build_encoder(in_channels, num_blocks, attn_resolutions, block, **levels)
        self.dec, cout = build_decoder(skips, num_blocks, attn_resolutions, block, **levels)
        self.out_norm = group_norm(cout, 1e-5)
        out = in_channels if out_channels is None else out_channels
        self.out_conv = init_weights(nn.Conv2d(cout, out, 3, padding=1), **INIT_ZERO)

    def forward(
        self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None, aug_label: Tensor | None = None
    ) -> Tensor:
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"ADMUNet expects [B, {', '.join(map(str, self.data_shape))}], got {tuple(x.shape)}")
        emb = self.emb(c_noise, cond, aug_label)  # [B, emb_channels]
        skips = []
        for layer in self.enc.values():
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
        for layer in self.dec.values():
            if x.shape[1] != layer.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
        return self.out_conv(self.out_norm(x, silu=True))
