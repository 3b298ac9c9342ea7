"""The ADM U-Net (Dhariwal & Nichol 2021) as EDM configures it for class-conditional ImageNet-64.

192 channels, multipliers [1, 2, 3, 4], 3 blocks per resolution, attention at 32, 16 and 8 (64 channels per
head), scale-shift conditioning, the class label added after the mapping MLP, dropout 0.10
(Karras et al. 2022, Appendix F.2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffscore.networks.embedding import ConditionEmbedding
from diffscore.networks.init import init_weights
from diffscore.networks.unet import UNetBlock, check_image_shape, group_norm

INIT = dict(mode="kaiming_uniform", scale=math.sqrt(1 / 3), bias_scale=math.sqrt(1 / 3))
INIT_ZERO = dict(mode="kaiming_uniform", scale=0.0)


class ADMUNet(nn.Module):
    """Backbone F(x_in [B, C, H, W], c_noise [B], cond, aug_label) -> [B, C, H, W]."""

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
    ) -> None:
        super().__init__()
        in_channels, resolution = check_image_shape(data_shape)
        if resolution >> (len(channel_mult) - 1) < 1:
            raise ValueError(f"{len(channel_mult)} levels are too many for resolution {resolution}")
        self.data_shape = (in_channels, resolution, resolution)
        self.resolution, self.in_channels = resolution, in_channels
        self.label_dim, self.augment_dim = label_dim, augment_dim
        emb_channels = model_channels * channel_mult_emb
        block = dict(
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
        self.enc = nn.ModuleDict()
        cout = in_channels
        skips = []
        for level, mult in enumerate(channel_mult):
            res = resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = init_weights(nn.Conv2d(cin, cout, 3, padding=1), **INIT)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            skips.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
                skips.append(cout)
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        self.out_norm = group_norm(cout, 1e-5)
        self.out_conv = init_weights(nn.Conv2d(cout, in_channels, 3, padding=1), **INIT_ZERO)

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
        return self.out_conv(F.silu(self.out_norm(x)))
